"""Model configuration: a frozen dataclass read from, and written to, an HF-style config.json.

Owns the Llama/Qwen2 fields coexit understands, the `early_exit` block (exit layers, split layer, head sharing,
loss weights), validation with actionable messages, and the named tiny flavours used by tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coexit.errors import ConfigError

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (`rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"


@dataclass(frozen=True)
class EarlyExitConfig:
    """Where the exit heads sit and where the edge hands over to the cloud.

    exit_layers: layer counts after which an exit head sits (1 <= e < num_hidden_layers), ascending.
    split_layer: the edge runs layers [0, split_layer), the cloud [split_layer, L); must be an exit layer.
    share_lm_head: exit heads use the final LM head weight (each keeps its own norm).
    loss_weights: one weight per exit layer, then one for the final head.
    """

    exit_layers: tuple[int, ...] = ()
    split_layer: int = 0
    share_lm_head: bool = True
    loss_weights: tuple[float, ...] = ()

    @staticmethod
    def default_for(num_layers: int) -> EarlyExitConfig:
        """Exits at the quarter points, the split in the middle: what a plain HF checkpoint gets."""
        exits = sorted({max(1, round(num_layers * q)) for q in (0.25, 0.5, 0.75)} - {num_layers})
        split = exits[len(exits) // 2] if exits else 0
        return EarlyExitConfig(exit_layers=tuple(exits), split_layer=split, share_lm_head=True,
                               loss_weights=tuple([1.0] * (len(exits) + 1)))


@dataclass(frozen=True)
class Config:
    """A Llama-family decoder with early-exit heads. Field names follow HF's config.json."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 0  # 0 means hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    early_exit: EarlyExitConfig = field(default_factory=EarlyExitConfig)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // max(1, self.num_attention_heads))
        self.validate()

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def exit_layers(self) -> tuple[int, ...]:
        return self.early_exit.exit_layers

    @property
    def split_layer(self) -> int:
        return self.early_exit.split_layer

    @property
    def edge_exit_layers(self) -> list[int]:
        """The exits the edge evaluates, in order: those in (0, split]."""
        return [e for e in self.exit_layers if e <= self.split_layer]

    def loss_weight(self, exit_layer: int) -> float:
        """Weight of an exit's loss; `num_hidden_layers` names the final head."""
        heads = list(self.exit_layers) + [self.num_hidden_layers]
        weights = self.early_exit.loss_weights or tuple([1.0] * len(heads))
        return float(weights[heads.index(exit_layer)])

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def with_exits(self, exit_layers, split_layer: int, share_lm_head: bool = True,
                   loss_weights=None) -> Config:
        exits = tuple(int(e) for e in exit_layers)
        weights = tuple(loss_weights) if loss_weights is not None else tuple([1.0] * (len(exits) + 1))
        return self.replace(early_exit=EarlyExitConfig(exits, int(split_layer), share_lm_head, weights))

    # ---- validation ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            need(int(getattr(self, name)) > 0, f"config field {name} must be a positive integer, got "
                                               f"{getattr(self, name)!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
             f"({self.num_key_value_heads})")
        need(self.head_dim % 2 == 0, f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        need(self.model_type in SUPPORTED_ARCHITECTURES,
             f"unknown model_type {self.model_type!r}; coexit supports {sorted(SUPPORTED_ARCHITECTURES)}")
        ee, n = self.early_exit, self.num_hidden_layers
        need(list(ee.exit_layers) == sorted(set(ee.exit_layers)),
             f"early_exit.exit_layers must be strictly ascending, got {list(ee.exit_layers)}")
        for e in ee.exit_layers:
            need(1 <= e < n, f"early_exit.exit_layers entry {e} is out of range: exits sit after 1.."
                             f"{n - 1} layers for a {n}-layer model (the final head is always there)")
        if ee.exit_layers or ee.split_layer:
            need(0 < ee.split_layer < n,
                 f"early_exit.split_layer {ee.split_layer} is out of range: it must be in 1..{n - 1} for a "
                 f"{n}-layer model")
            need(ee.split_layer in ee.exit_layers,
                 f"early_exit.split_layer {ee.split_layer} is not an exit layer; the edge/cloud boundary must "
                 f"carry an exit head, choose one of {list(ee.exit_layers)}")
        if ee.loss_weights:
            need(len(ee.loss_weights) == len(ee.exit_layers) + 1,
                 f"early_exit.loss_weights needs {len(ee.exit_layers) + 1} entries (one per exit, then the "
                 f"final head), got {len(ee.loss_weights)}")
            need(all(w >= 0 and math.isfinite(w) for w in ee.loss_weights),
                 "early_exit.loss_weights must be finite and non-negative")

    # ---- HF config.json ------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], early_exit: EarlyExitConfig | None = None) -> Config:
        """Read an HF config dict (transformers v4 `rope_scaling` or v5 `rope_parameters`)."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            arch = d.get("architectures") or [model_type]
            raise ConfigError(f"unknown architecture {arch[0]!r} (model_type {model_type!r}); coexit loads "
                              f"{', '.join(SUPPORTED_ARCHITECTURES.values())}")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {d['hidden_act']!r} is not supported; Llama-family models use silu")
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_scaling = None
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind != "llama3":
                raise ConfigError(f"rope scaling type {kind!r} is not supported; coexit implements 'llama3'")
            rope_scaling = RopeScaling(
                factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
        try:
            num_layers = int(d["num_hidden_layers"])
            ee = early_exit
            if ee is None and d.get("early_exit") is not None:
                block = d["early_exit"]
                unknown = set(block) - {"exit_layers", "split_layer", "share_lm_head", "loss_weights"}
                if unknown:
                    raise ConfigError(f"unknown keys in early_exit block: {sorted(unknown)}")
                ee = EarlyExitConfig(
                    exit_layers=tuple(int(e) for e in block.get("exit_layers", ())),
                    split_layer=int(block.get("split_layer", 0)),
                    share_lm_head=bool(block.get("share_lm_head", True)),
                    loss_weights=tuple(float(w) for w in block.get("loss_weights", ())))
            if ee is None:
                ee = EarlyExitConfig.default_for(num_layers)
            bias = d.get("attention_bias", model_type == "qwen2")
            eos = d.get("eos_token_id")
            return cls(
                vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]), num_hidden_layers=num_layers,
                num_attention_heads=int(d["num_attention_heads"]),
                num_key_value_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
                head_dim=int(d.get("head_dim") or 0), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta), rope_scaling=rope_scaling,
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(bias), model_type=model_type,
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=eos[0] if isinstance(eos, list) else eos,
                early_exit=ee)
        except KeyError as exc:
            raise ConfigError(f"config.json lacks the required field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"config.json has a field of the wrong type: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": [SUPPORTED_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dataclasses.asdict(self.rope_scaling) if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "early_exit": {
                "exit_layers": list(self.early_exit.exit_layers), "split_layer": self.early_exit.split_layer,
                "share_lm_head": self.early_exit.share_lm_head,
                "loss_weights": list(self.early_exit.loss_weights)},
        }
        return d

    @classmethod
    def from_json(cls, path: str | Path) -> Config:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(d)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def flavour(cls, name: str) -> Config:
        try:
            return FLAVOURS[name]
        except KeyError:
            raise ConfigError(f"unknown flavour {name!r}; known: {sorted(FLAVOURS)}") from None


def _tiny(**kw: Any) -> Config:
    base: dict[str, Any] = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                bos_token_id=1, eos_token_id=2,
                                early_exit=EarlyExitConfig((2, 3, 4), 3, True, (0.3, 0.3, 0.3, 1.0)))
    base.update(kw)
    return Config(**base)


# Named tiny flavours: small enough that a test builds and runs one in milliseconds on a CPU.
FLAVOURS: dict[str, Config] = {
    "tiny": _tiny(),
    "tiny-mha": _tiny(num_key_value_heads=4, early_exit=EarlyExitConfig((1, 2, 4), 2, False, ())),
    "tiny-tied": _tiny(tie_word_embeddings=True),
    "tiny-llama3": _tiny(rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32), rope_theta=500000.0),
    "tiny-qwen2": _tiny(model_type="qwen2", attention_bias=True, tie_word_embeddings=True),
}
