"""LoRA adapters on coexit's model, stored in PEFT's layout so users' tools read them.

An adapter directory holds `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules,
layers_to_transform, and a `coexit` block with the base checkpoint's fingerprint) and `adapter_model.safetensors`
with PEFT's names (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, `...lora_B.weight`).
A LoRA linear computes W x + (alpha / r) B A x; `merge_adapter` folds that into W (exact, no run-time cost: what the
torch and bitsandbytes edges do), `add_lora` wraps the linears for training, and `adapter_weights` reads them back.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from coexit.errors import CheckpointError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = TARGETS
    layers: tuple[int, ...] = ()  # the decoder layers that carry adapters
    base_fingerprint: str = ""
    extra: dict = field(default_factory=dict)  # recorded with the adapter (e.g. how it was trained)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_peft(self) -> dict:
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.r, "lora_alpha": self.alpha,
                "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
                "target_modules": list(self.targets), "layers_to_transform": list(self.layers),
                "coexit": {"base_fingerprint": self.base_fingerprint, **self.extra}}

    @classmethod
    def from_peft(cls, d: dict) -> LoraConfig:
        if d.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"not a LoRA adapter: peft_type {d.get('peft_type')!r}")
        extra = dict(d.get("coexit") or {})
        fp = extra.pop("base_fingerprint", "")
        return cls(int(d["r"]), float(d.get("lora_alpha", d["r"])), tuple(d.get("target_modules") or TARGETS),
                   tuple(int(i) for i in d.get("layers_to_transform") or ()), fp, extra)


def module_name(layer: int, target: str) -> str:
    return f"model.layers.{layer}.{PARENT[target]}.{target}"


class LoRALinear(nn.Module):
    """A frozen linear plus a trainable low-rank update: y = W x + scale * B (A x). B starts at zero, so a fresh
    adapter leaves the model unchanged. The adapter keeps fp32 weights whatever the base's dtype (a bf16 base
    computes the update in bf16; the gradients reach the fp32 weights). `enabled` False: the base alone."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / r, True
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        base.weight.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        return y + (x @ self.lora_A.t().to(x.dtype) @ self.lora_B.t().to(x.dtype)) * self.scale


@contextlib.contextmanager
def lora_disabled(model):
    """The base model: every LoRALinear of `model` off inside the block (no copy of the weights needed)."""
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


def _owner(model, layer: int, target: str) -> nn.Module:
    return getattr(model.model.layers[str(layer)], PARENT[target])


def add_lora(model, cfg: LoraConfig) -> list[LoRALinear]:
    """Wrap the target linears of cfg.layers (those the model holds) in LoRALinear; returns the new modules."""
    out = []
    for i in cfg.layers:
        if str(i) not in model.model.layers:
            continue
        for t in cfg.targets:
            owner = _owner(model, i, t)
            lora = LoRALinear(getattr(owner, t), cfg.r, cfg.alpha)
            setattr(owner, t, lora)
            out.append(lora)
    return out


def set_lora(model, weights: dict[tuple[int, str], tuple[Tensor, Tensor]]) -> None:
    """Load (A, B) pairs (read_adapter's) into the model's LoRALinear modules where it has them."""
    with torch.no_grad():
        for (i, t), (a, b) in weights.items():
            if str(i) in model.model.layers and isinstance(m := getattr(_owner(model, i, t), t), LoRALinear):
                m.lora_A.copy_(a)
                m.lora_B.copy_(b)


def remove_lora(model) -> None:
    """Put the plain linears back (the adapters' weights are dropped: save or merge them first)."""
    for block in model.model.layers.values():
        for t in TARGETS:
            owner = getattr(block, PARENT[t])
            if isinstance(getattr(owner, t), LoRALinear):
                setattr(owner, t, getattr(owner, t).base)


def lora_state(model) -> dict[str, Tensor]:
    """PEFT-named A and B of every LoRALinear in the model."""
    out = {}
    for i, block in model.model.layers.items():
        for t in TARGETS:
            m = getattr(getattr(block, PARENT[t]), t)
            if isinstance(m, LoRALinear):
                name = f"base_model.model.{module_name(int(i), t)}"
                out[f"{name}.lora_A.weight"] = m.lora_A.detach().float().contiguous()
                out[f"{name}.lora_B.weight"] = m.lora_B.detach().float().contiguous()
    return out


def save_adapter(model, cfg: LoraConfig, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(lora_state(model), str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(cfg.to_peft(), indent=2) + "\n")
    return out


def read_adapter(adapter_dir: str | Path) -> tuple[LoraConfig, dict[tuple[int, str], tuple[Tensor, Tensor]]]:
    """(config, {(layer, target): (A (r, in), B (out, r))}) of an adapter directory."""
    d = Path(adapter_dir)
    if not (d / CONFIG_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{d} is not a LoRA adapter directory: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    cfg = LoraConfig.from_peft(json.loads((d / CONFIG_FILE).read_text()))
    tensors = load_file(str(d / WEIGHTS_FILE))
    weights = {}
    for name, a in tensors.items():
        if not name.endswith(".lora_A.weight"):
            continue
        path = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        parts = path.split(".")  # model.layers.{i}.{parent}.{target}
        if len(parts) != 5 or parts[:2] != ["model", "layers"] or parts[4] not in TARGETS:
            raise CheckpointError(f"{d / WEIGHTS_FILE}: tensor {name} is not a LoRA of a decoder linear")
        b = tensors.get(name.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise CheckpointError(f"{d / WEIGHTS_FILE}: {name} has no lora_B")
        weights[(int(parts[2]), parts[4])] = (a, b)
    return cfg, weights


def merge_adapter(model, adapter_dir: str | Path) -> LoraConfig:
    """Fold the adapter into the model's weights, for the layers the model holds (W += scale * B @ A)."""
    cfg, weights = read_adapter(adapter_dir)
    if cfg.base_fingerprint and model.fingerprint and cfg.base_fingerprint != model.fingerprint:
        raise CheckpointError(f"the adapter in {adapter_dir} was trained on another checkpoint (fingerprint "
                              f"{cfg.base_fingerprint[:12]}…, this one {model.fingerprint[:12]}…)")
    with torch.no_grad():
        for (i, t), (a, b) in weights.items():
            if str(i) not in model.model.layers:
                continue
            lin = getattr(_owner(model, i, t), t)
            if isinstance(lin, LoRALinear):
                raise ValueError("merge into a model without LoRA wrappers (remove_lora first)")
            lin.weight += (cfg.scale * (b.double() @ a.double())).to(lin.weight.dtype)
    return cfg
