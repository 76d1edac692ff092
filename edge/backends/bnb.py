"""The bitsandbytes edge backend: coexit's torch edge stage with the Linear layers of blocks [0, split) replaced
by bitsandbytes Linear8bitLt (LLM.int8(), outlier threshold 6.0) or Linear4bit (NF4, blocksize 64, fp32 compute).

The model code is coexit's own: `quantize_layers` swaps modules in place (module selection: every nn.Linear inside
`model.model.layers`), so attention, RoPE, the KV cache and coexit.decoding.LayerRunner are unchanged and an early
exit still skips the remaining edge layers. Embeddings and exit heads stay fp32 (bitsandbytes' usual practice of
keeping the LM head in full precision; the heads decide exits). On CPU, bitsandbytes saves weight memory (about
4x for int8, 8x for NF4) but is slower than fp32: its CPU kernels dequantize the weight on every forward.

A compression policy (edge/export/policy.py, backend "bnb", from `coexit compress --backend bnb`) sets the type of
each matrix instead of one mode: "bnb-nf4" or "bnb-int8" per `blk.N.<kind>.weight`. `rounders()` gives the same
modules to edge/export/sensitivity.py, so the damage it measures is this backend's own.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn

from coexit.model import EarlyExitLM
from edge.backends.torch_backend import TorchBackend, load_edge

MODES = ("int8", "nf4")


@contextmanager
def _quiet(*loggers: str):
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def _bnb():
    # bitsandbytes warns at import that an optional hub-downloaded CPU kernel is missing: not an error here
    with _quiet("bitsandbytes.backends.cpu.ops", "bitsandbytes"):
        import bitsandbytes

    # int8 logs a dtype-cast warning on every forward; it is expected on CPU
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return bitsandbytes


def quantized_linear(lin: nn.Linear, mode: str) -> nn.Module:
    """A bitsandbytes copy of `lin` (weights quantized on the CPU)."""
    bnb = _bnb()
    w = lin.weight.data.detach().float().contiguous()
    bias = lin.bias is not None
    if mode == "int8":
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=bias, has_fp16_weights=False,
                                threshold=6.0)
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    elif mode == "nf4":
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias, compute_dtype=torch.float32,
                              compress_statistics=False, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=False,
                                     blocksize=64)
    else:
        raise ValueError(f"unknown bitsandbytes mode {mode!r}; use one of {MODES}")
    if bias:
        q.bias = nn.Parameter(lin.bias.data.detach().float().clone(), requires_grad=False)
    return q.to("cpu")  # moving to the device is what quantizes the weight


def rounders() -> dict:
    """Policy type -> a function from an nn.Linear to this backend's quantized copy of it."""
    return {"bnb-nf4": lambda lin: quantized_linear(lin, "nf4"), "bnb-int8": lambda lin: quantized_linear(lin, "int8")}


def quantize_layers(model: EarlyExitLM, mode: str, stop: int | None = None, policy=None) -> int:
    """Replace every nn.Linear inside blocks [model.start, stop) in place (each at the policy's type when a policy
    is given); returns how many were replaced."""
    from edge.export.imatrix import LINEAR_NAMES

    stop = model.stop if stop is None else stop
    if policy is not None and policy.backend != "bnb":
        raise ValueError(f"this policy is for the {policy.backend} backend; choose one for bitsandbytes with "
                         f"`coexit compress --backend bnb`")
    n = 0
    for i in range(model.start, stop):
        block = model.model.layers[str(i)]
        for path, child in list(block.named_modules()):
            if type(child) is not nn.Linear:
                continue
            owner, _, attr = path.rpartition(".")
            kind = mode
            if policy is not None:
                name = f"blk.{i}.{LINEAR_NAMES[path]}.weight"
                if name not in policy.types:
                    raise ValueError(f"the policy has no type for {name}")
                kind = policy.types[name].removeprefix("bnb-")
            setattr(block.get_submodule(owner), attr, quantized_linear(child, kind))
            n += 1
    return n


class BnbBackend(TorchBackend):
    """TorchBackend over a model whose edge blocks hold bitsandbytes layers (mode "int8" or "nf4")."""

    def __init__(self, model: EarlyExitLM, mode: str, max_len: int | None = None, policy=None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown bitsandbytes mode {mode!r}; use one of {MODES}")
        if policy is not None and not hasattr(policy, "types"):
            from edge.export.policy import Policy

            policy = Policy.load(policy)
        if policy is not None and policy.fingerprint != model.fingerprint:
            raise ValueError(f"the policy was chosen for another checkpoint (fingerprint {policy.fingerprint[:12]}, "
                             f"this one {model.fingerprint[:12]})")
        quantize_layers(model, mode, model.config.split_layer, policy)
        self.mode, self.name = ("policy", f"bnb-policy-{policy.budget_bpw:g}bpw") if policy else (mode, f"bnb-{mode}")
        self.policy = policy
        super().__init__(model, max_len=max_len)

    @classmethod
    def from_checkpoint(cls, path, mode: str = "nf4", max_len: int | None = None, adapter=None,
                        policy=None) -> BnbBackend:
        """adapter: a LoRA adapter directory, merged into the fp32 weights before they are quantized. policy: a
        bitsandbytes compression policy (or its file): each matrix at its type, `mode` unused."""
        return cls(load_edge(path, torch.float32, adapter), mode, max_len=max_len, policy=policy)
