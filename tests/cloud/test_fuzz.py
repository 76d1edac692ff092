"""Seeded fuzzing of the Session stream with malformed and mutated wire messages (a fast subset; bench/fuzz.py
runs the long form): every case ends with a client-fault status or OK, never INTERNAL or UNKNOWN; the server keeps
serving a legitimate session the right tokens throughout, and client faults do not flood the log."""

from __future__ import annotations

import logging
import random

import grpc
import pytest
import torch

import coexit
from bench.fuzz import CLIENT_FAULTS, run_case, seeds
from cloud.server import ServerThread
from coexit.v1 import coexit_pb2 as pb
from coexit.v1.convert import tensor_to_proto
from edge.link import CloudLink

CASES = 600


def test_fuzzed_messages_get_client_fault_statuses(tiny_dir, caplog):
    model = coexit.load(tiny_dir)
    ids = torch.tensor([model.tokenizer.encode("def add(a, b):\n    return a + b\n\nfor i in range(10):",
                                               add_bos=True)])
    with torch.no_grad():
        rows = model.stage(0, model.config.split_layer)(ids).hidden[0]
        want = model(ids).logits[0].argmax(-1)  # the full model's greedy token after each prefix
    rng = random.Random(1234)
    pool = seeds(model, rows)
    codes: dict[str, int] = {}
    caplog.set_level(logging.INFO, logger="coexit.cloud")
    with ServerThread(model) as srv:
        channel = grpc.insecure_channel(srv.address)
        raw = channel.stream_stream("/coexit.v1.Coexit/Session", request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)
        legit = CloudLink(srv.address).stream()
        legit.request(pb.SessionRequest(open=pb.OpenRequest(fingerprint=model.fingerprint)))
        pos = 0
        for case in range(CASES):
            code, details = run_case(raw, rng, pool)
            assert code in CLIENT_FAULTS, (case, code, details)
            assert len(details) < 600, details
            codes[code.name] = codes.get(code.name, 0) + 1
            if case % 40 == 0 and pos < rows.shape[0]:  # the legitimate session keeps getting the right tokens
                reply = legit.request(pb.SessionRequest(append=pb.AppendRequest(
                    first_position=pos, hidden=tensor_to_proto(rows[pos:pos + 1], "fp32"), want_token=True)))
                assert reply.appended.token_id == int(want[pos])
                pos += 1
        channel.close()
    assert sum(codes.values()) == CASES and codes.get("INVALID_ARGUMENT", 0) > CASES // 4, codes
    lines = [r for r in caplog.records if r.name == "coexit.cloud"]
    assert len(lines) < 20, f"{len(lines)} log lines for {CASES} bad messages"
    assert not [r for r in lines if r.levelno >= logging.ERROR], [r.getMessage() for r in lines][:5]


@pytest.mark.parametrize("field,value,match", [("input", 7, "unknown input 7"), ("encoding", 9, "unknown encoding"),
                                               ("resume_id", "r" * 100_000, "100000 characters")])
def test_bad_open_fields_are_refused_with_short_messages(tiny_dir, field, value, match):
    model = coexit.load(tiny_dir)
    with ServerThread(model) as srv:
        stream = CloudLink(srv.address).stream()
        from edge.link import CloudError

        with pytest.raises(CloudError) as info:
            stream.request(pb.SessionRequest(open=pb.OpenRequest(fingerprint=model.fingerprint, **{field: value})))
        assert info.value.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        assert match in info.value.details and len(info.value.details) < 400
