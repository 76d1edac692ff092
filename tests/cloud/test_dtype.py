"""`coexit serve --dtype`: the cloud computes in the dtype asked for, in one process and in the engine process
behind front ends. bfloat16 on a CPU is the operator's choice on hosts with AMX (about 1.7x faster there); the
default stays float32, which every other test checks exactly."""

from __future__ import annotations

import pytest
import torch

import coexit
from cloud.launch import start_cloud
from coexit.v1 import coexit_pb2 as pb
from coexit.v1.convert import tensor_from_proto, tensor_to_proto
from edge.link import CloudLink


@pytest.mark.parametrize("extra", [[], ["--frontends", "1"]], ids=["one-process", "front-ends"])
def test_a_bfloat16_server_gives_the_bfloat16_models_logits(tiny_dir, extra):
    full32 = coexit.load(tiny_dir, dtype=torch.float32)
    full16 = coexit.load(tiny_dir, dtype=torch.bfloat16)
    split, layers = full32.config.split_layer, full32.config.num_hidden_layers
    ids = torch.tensor([full32.tokenizer.encode("def add(a, b):\n    return a + b", add_bos=True)])
    n = ids.shape[1]
    with torch.no_grad():
        rows = full32.stage(0, split)(ids).hidden[0]  # the edge's rows, sent as fp32

        def reference(model, dtype, upto):  # the deep layers alone over rows [0, upto), in that dtype
            return model.stage(split, layers)(rows[None, :upto].to(dtype)).logits[0, -1].float()

        expect16 = [reference(full16, torch.bfloat16, upto) for upto in (n - 1, n)]
        expect32 = [reference(full32, torch.float32, upto) for upto in (n - 1, n)]
    proc, address = start_cloud(tiny_dir, extra_args=["--dtype", "bfloat16", *extra])
    try:
        link = CloudLink(address)
        stream = link.stream()
        stream.request(pb.SessionRequest(open=pb.OpenRequest(fingerprint=full32.fingerprint)))
        got = []
        for first, upto in ((0, n - 1), (n - 1, n)):  # a prompt, then one decode row
            reply = stream.request(pb.SessionRequest(append=pb.AppendRequest(
                first_position=first, hidden=tensor_to_proto(rows[first:upto], "fp32"), want_token=True,
                want_logits=True))).appended
            got.append(tensor_from_proto(reply.logits).reshape(-1))
            assert reply.token_id == int(got[-1].argmax())
        link.close()
    finally:
        proc.kill()
        proc.wait()
    for g, e16, e32 in zip(got, expect16, expect32):
        gap = (e16 - e32).abs().max()  # what computing in bf16 changes
        assert gap > 1e-3
        assert (g - e16).abs().max() <= 0.1 * gap, "the server did not compute in bfloat16"
