"""Test helpers for outages: kill the cloud process mid-generation and start it again on the same port, and check
tokens against the full model on the sequence actually emitted."""

from __future__ import annotations

import time

import torch

from cloud.launch import start_cloud


def drive_through_restart(run, client, model_dir, port: int, proc, kill_at: int = 8, restart_at: int = 14,
                          settle_s: float = 0.0) -> list:
    """Consume `run`, killing the cloud after `kill_at` events and restarting it after `restart_at`; returns the
    events. The cloud is killed and the client closed at the end, whatever happens."""
    events = []
    try:
        for ev in run:
            events.append(ev)
            if len(events) == kill_at:
                proc.kill()
                proc.wait()
            if len(events) == restart_at:
                proc, _ = start_cloud(model_dir, port)
                time.sleep(settle_s)
    finally:
        proc.kill()
        proc.wait()
        client.close()
    return events


def assert_full_model_greedy(full, prompt_ids: list[int], events: list, events_to_check: list) -> None:
    """Each of events_to_check holds the full model's greedy choice for the sequence `events` emitted."""
    seq = prompt_ids + [e.token_id for e in events]
    with torch.no_grad():
        logits = full(torch.tensor([seq])).logits[0]
    for e in events_to_check:
        assert e.token_id == int(logits[e.position - 1].argmax())
