"""Kill the cloud process mid-generation and restart it: the edge goes standalone (marked), emitted tokens never
change, and once the cloud is back the edge opens a new session, replays what it lacks, and falls back to it."""

from __future__ import annotations

import coexit
from cloud.launch import free_port, start_cloud
from coexit.decoding import generate_full
from coexit.exits import ExitPolicy
from edge.backends import TorchBackend
from edge.client import EdgeClient
from tests.edge.cloud_restart import assert_full_model_greedy, drive_through_restart


def test_cloud_restart_mid_generation(tiny_dir):
    full = coexit.load(tiny_dir)
    port = free_port()
    proc, _ = start_cloud(tiny_dir, port)
    retry_s = 0.3
    client = EdgeClient(TorchBackend.from_checkpoint(tiny_dir), full.tokenizer, cloud=f"127.0.0.1:{port}",
                        deadline_s=3.0, retry_s=retry_s)
    ids = full.tokenizer.encode("class Point:\n    def __init__(self, x, y):", add_bos=True)
    expected = generate_full(full, ids, 8)
    run = client.stream(ids, 30, policy=ExitPolicy.never(), stop_at_eos=False)
    events = drive_through_restart(run, client, tiny_dir, port, proc, settle_s=retry_s)
    origins = [e.origin for e in events]
    assert len(events) == 30
    assert [e.token_id for e in events[:8]] == expected and set(origins[:8]) == {"cloud"}
    assert set(origins[8:14]) == {"edge-standalone"}
    assert origins[14] == "cloud" and set(origins[14:]) == {"cloud"}
    c = run.counters
    assert c.sessions_opened == 2 and c.standalone == 6
    first_session, second_session = c.uploads
    assert second_session == list(range(len(second_session)))  # the new cloud got the whole context replayed
    assert len(second_session) == events[-1].position
    # every token the new cloud made is the full model's greedy choice for the sequence actually emitted
    assert_full_model_greedy(full, ids, events, events[14:])
