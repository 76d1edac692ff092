"""Conversion between protobuf messages and coexit's torch-side values: the only place either side touches
wire tensors or sampling messages. Used by cloud/ and edge/ at their gRPC boundary."""

from __future__ import annotations

from torch import Tensor

from coexit import wire
from coexit.sampling import SamplingParams
from coexit.v1 import coexit_pb2 as pb

ENCODING_NAMES = {pb.FP32: "fp32", pb.FP16: "fp16", pb.BF16: "bf16", pb.INT8: "int8"}
ENCODING_CODES = {v: k for k, v in ENCODING_NAMES.items()}


def encoding_name(code: int) -> str:
    if code not in ENCODING_NAMES:
        raise ValueError(f"unknown encoding {code}; use one of {sorted(ENCODING_NAMES.values())}")
    return ENCODING_NAMES[code]


def tensor_to_proto(rows: Tensor, encoding: str) -> pb.Tensor:
    data, scales = wire.encode(rows, encoding)
    return pb.Tensor(encoding=ENCODING_CODES[encoding], rows=rows.shape[0], cols=rows.shape[1], data=data,
                     scales=scales)


def tensor_from_proto(t: pb.Tensor) -> Tensor:
    """fp32 rows (rows, cols); ValueError when the payload does not match its header."""
    return wire.decode(t.data, t.scales, t.rows, t.cols, encoding_name(t.encoding))


def sampling_to_proto(p: SamplingParams) -> pb.Sampling:
    return pb.Sampling(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed)


def sampling_from_proto(s: pb.Sampling) -> SamplingParams:
    return SamplingParams(temperature=float(s.temperature), top_k=int(s.top_k),
                          top_p=float(s.top_p) if s.top_p > 0 else 1.0, seed=int(s.seed))
