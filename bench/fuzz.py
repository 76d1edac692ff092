"""Fuzz the cloud's Session stream with malformed and mutated wire messages, against a real `coexit serve`.

Prints the count of each status code, whether a legitimate session's tokens stayed right, and how many lines the
server logged. tests/cloud/test_fuzz.py runs a seeded subset of the same cases in CI.

    python bench/fuzz.py [--cases 100000] [--seed 0] [--model DIR]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time

import grpc
import torch

from coexit.v1 import coexit_pb2 as pb
from coexit.v1.convert import tensor_to_proto

CLIENT_FAULTS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}


def seeds(model, rows) -> list[bytes]:
    """Valid serialized SessionRequests to mutate."""
    fp = model.fingerprint
    msgs = [
        pb.SessionRequest(open=pb.OpenRequest(fingerprint=fp, max_length=64)),
        pb.SessionRequest(open=pb.OpenRequest(fingerprint=fp, input=pb.TOKENS, encoding=pb.INT8)),
        pb.SessionRequest(open=pb.OpenRequest(fingerprint=fp, cloud_exits=[pb.CloudExit(layer=4, threshold=0.5)])),
        pb.SessionRequest(open=pb.OpenRequest(fingerprint=fp, resume_id="x" * 40)),
        pb.SessionRequest(append=pb.AppendRequest(first_position=0, hidden=tensor_to_proto(rows[:3], "fp32"),
                                                  want_token=True, top_logprobs=3, want_logits=True)),
        pb.SessionRequest(append=pb.AppendRequest(first_position=0, token_ids=[5, 6, 7], want_token=True,
                                                  sampling=pb.Sampling(temperature=0.7, top_k=5, seed=1))),
        pb.SessionRequest(close=pb.CloseRequest()),
    ]
    return [m.SerializeToString() for m in msgs]


def mutate(rng: random.Random, pool: list[bytes]) -> bytes:
    data = bytearray(rng.choice(pool))
    op = rng.randrange(6)
    if op == 0 and data:  # flip bytes
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif op == 1 and data:  # truncate
        del data[rng.randrange(len(data)):]
    elif op == 2:  # insert random bytes
        i = rng.randrange(len(data) + 1)
        data[i:i] = rng.randbytes(rng.randint(1, 16))
    elif op == 3:  # random bytes
        data = bytearray(rng.randbytes(rng.randint(0, 64)))
    elif op == 4:  # two messages glued together (later fields win, oneofs collide)
        data += rng.choice(pool)
    else:  # a varint field with a huge or unknown value
        data += bytes([rng.choice([0x08, 0x10, 0x18, 0x28, 0x30]), 0xFF, 0xFF, 0xFF, 0xFF, 0x0F])
    return bytes(data)


def run_case(raw, rng: random.Random, pool: list[bytes]) -> tuple[grpc.StatusCode, str]:
    """One fuzz case on a raw-bytes Session stub: 1-3 mutated messages, half the time behind a valid Open (so
    mutated Appends reach the session code). Returns the status code and its details."""
    msgs = [mutate(rng, pool) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.5:
        msgs.insert(0, pool[0])
    try:
        for _ in raw(iter(msgs), timeout=20):
            pass
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", help="checkpoint to serve (default: a tiny random one)")
    args = ap.parse_args()

    import coexit
    from cloud.launch import server_log, start_cloud
    from coexit.tiny import make_checkpoint
    from edge.link import CloudLink

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_checkpoint(f"{tmp}/tiny", "tiny")
        model = coexit.load(model_dir)
        ids = torch.tensor([model.tokenizer.encode("def add(a, b):\n    return a + b\n", add_bos=True)])
        with torch.no_grad():
            rows = model.stage(0, model.config.split_layer)(ids).hidden[0]
            want = model(ids).logits[0].argmax(-1)
        proc, address = start_cloud(model_dir)
        rng, pool, codes, bad, legit_ok = random.Random(args.seed), seeds(model, rows), {}, 0, True
        t0 = time.monotonic()
        try:
            channel = grpc.insecure_channel(address)
            raw = channel.stream_stream("/coexit.v1.Coexit/Session", request_serializer=lambda b: b,
                                        response_deserializer=lambda b: b)
            legit = CloudLink(address).stream()
            legit.request(pb.SessionRequest(open=pb.OpenRequest(fingerprint=model.fingerprint)))
            pos = 0
            for case in range(args.cases):
                code, _ = run_case(raw, rng, pool)
                codes[code.name] = codes.get(code.name, 0) + 1
                bad += code not in CLIENT_FAULTS
                if case % 1000 == 0:
                    reply = legit.request(pb.SessionRequest(append=pb.AppendRequest(
                        first_position=pos, hidden=tensor_to_proto(rows[pos:pos + 1], "fp32"), want_token=True)))
                    legit_ok &= reply.appended.token_id == int(want[pos])
                    pos = (pos + 1) % rows.shape[0]
                    if pos == 0:  # start the legitimate session over
                        legit.request(pb.SessionRequest(close=pb.CloseRequest()))
                        legit = CloudLink(address).stream()
                        legit.request(pb.SessionRequest(open=pb.OpenRequest(fingerprint=model.fingerprint)))
            alive = proc.poll() is None
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log_lines = len(server_log(proc).splitlines())
    print(f"{args.cases} cases in {time.monotonic() - t0:.0f} s; status codes: "
          + ", ".join(f"{k} {v}" for k, v in sorted(codes.items(), key=lambda kv: -kv[1])))
    print(f"server alive: {alive}; statuses other than client faults: {bad}; legitimate session's tokens right "
          f"throughout: {legit_ok}; server log lines: {log_lines}")
    return 0 if alive and bad == 0 and legit_ok else 1


if __name__ == "__main__":
    sys.exit(main())
