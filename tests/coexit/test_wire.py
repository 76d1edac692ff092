"""The wire codec (coexit/wire.py): every encoding decodes to exactly what torch's own casts give, into a writable
fp32 tensor the caller owns, and a payload that does not match its header is refused."""

import pytest
import torch

from coexit import wire


@pytest.mark.parametrize("encoding", wire.ENCODINGS)
def test_decode_equals_torch_casts(encoding):
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(0)) * 3
    x[0, 0] = 65504.0 if encoding == "fp16" else 1e30  # the type's largest values survive the round trip
    data, scales = wire.encode(x, encoding)
    got = wire.decode(data, scales, 5, 48, encoding)
    if encoding == "int8":
        scale = x.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        want = torch.round(x / scale[:, None]).clamp(-127, 127).to(torch.int8).float() * scale[:, None]
    else:
        want = x.to(wire._FLOAT[encoding]).float()
    assert got.dtype == torch.float32 and got.shape == (5, 48)
    assert torch.equal(got, want)
    got.add_(1)  # writable, and not a view of the message's bytes
    assert wire.decode(data, scales, 5, 48, encoding).equal(want)


@pytest.mark.parametrize("encoding", wire.ENCODINGS)
def test_zero_rows(encoding):
    assert wire.decode(b"", b"", 0, 48, encoding).shape == (0, 48)


def test_mismatched_payloads_are_refused():
    data, scales = wire.encode(torch.randn(2, 8), "int8")
    with pytest.raises(ValueError, match="must be 16 bytes, got 15"):
        wire.decode(data[:-1], scales, 2, 8, "int8")
    with pytest.raises(ValueError, match="needs 2 fp32 scales"):
        wire.decode(data, scales[:-4], 2, 8, "int8")
    with pytest.raises(ValueError, match="must be 64 bytes"):
        wire.decode(b"\0" * 32, b"", 2, 8, "fp32")
    with pytest.raises(ValueError, match="unknown encoding"):
        wire.decode(b"", b"", 0, 8, "fp8")
