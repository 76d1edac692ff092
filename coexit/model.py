"""The shared early-exit Llama-family decoder: one torch-only model file used by edge, cloud and training.

Owns the layers (RMSNorm, RoPE with llama3 scaling, GQA attention with optional Qwen2 qkv bias, SwiGLU MLP),
the exit heads, the full-model forward, and stage views over a layer range. Parameter names equal HF's
(`model.layers.{i}...`, `lm_head.weight`), plus `exits.{e}.norm.weight` / `exits.{e}.lm_head.weight`.

A model may hold only a layer range (`EarlyExitLM(config, layers=(a, b))`): the other layers are simply absent
from the ModuleDict, which is how the edge avoids loading deep layers and the cloud shallow ones.

Shapes: B batch, T new positions, S cached + new positions, H heads, K kv heads, D head dim, C hidden, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coexit.attention import attend
from coexit.config import Config
from coexit.kv_cache import CacheError, KVCache

ExitSpec = Union[None, str, int, Sequence[int]]  # None, "all", one exit layer, or several


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and x.device.type == "cpu" and self.weight.dtype == dtype and not (
                torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            # inference on CPU in fp32: the fused op, elementwise the same values as the lines below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(config: Config) -> Tensor:
    """Inverse RoPE frequencies (D/2,), with llama3 wavelength-dependent scaling when configured."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = config.rope_scaling
    if rs is None:
        return inv
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self._tables: dict[torch.dtype, tuple] = {}  # dtype -> (inv_freq, its version, positions, cos, sin)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # positions (B, T) -> cos, sin (B, 1, T, D)
        freqs = positions[..., None].float() * self.inv_freq.float()
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def _table(self, stop: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """positions (n,), cos, sin (n, D) for positions [0, n), n >= stop: computed once by `forward` (growing by
        doubling)."""
        inv = self.inv_freq
        src, version, pos, cos, sin = self._tables.get(dtype, (None, -1, None, None, None))
        if src is not inv or version != inv._version or pos.shape[0] < stop:  # inv_freq may be reassigned
            n = max(stop, 2 * pos.shape[0] if src is inv and version == inv._version else 0, 256)
            with torch.inference_mode(False):  # a table made under inference_mode must still serve autograd
                pos = torch.arange(n, device=inv.device)
                cos, sin = (x[0, 0] for x in self.forward(pos[None], dtype))
            self._tables[dtype] = (inv, inv._version, pos, cos, sin)
        return pos, cos, sin

    def span(self, first: int, t: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """positions (1, T), cos, sin (1, 1, T, D) for the contiguous positions [first, first + t): views of
        the tables; cos and sin are elementwise the values `forward` computes."""
        pos, cos, sin = self._table(first + t, dtype)
        return (pos.narrow(0, first, t).unsqueeze(0), cos.narrow(0, first, t).unsqueeze(0).unsqueeze(0),
                sin.narrow(0, first, t).unsqueeze(0).unsqueeze(0))

    def gather(self, positions: Tensor, stop: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin (1, 1, T, D) for any positions (1, T) below `stop`, gathered from the tables: elementwise the
        values `forward` computes."""
        _, cos, sin = self._table(stop, dtype)
        flat = positions.reshape(-1)
        return (cos.index_select(0, flat).view(1, 1, flat.shape[0], -1),
                sin.index_select(0, flat).view(1, 1, flat.shape[0], -1))


def _rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: Config, layer_idx: int) -> None:
        super().__init__()
        c, h, k, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.layer_idx, self.n_heads, self.n_kv, self.head_dim = layer_idx, h, k, d
        self.q_proj = nn.Linear(c, h * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(c, k * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(c, k * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(h * d, c, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, cache: KVCache | None,
                keep: Tensor | None = None) -> Tensor:
        """keep (Tq,): indices of the rows that query (the others only store their k, v); output (B, Tq, C)."""
        b, t, _ = x.shape
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        k, key_pos = apply_rope(k, cos, sin), positions
        if keep is not None:
            x, cos, sin, positions = x[:, keep], cos[:, :, keep], sin[:, :, keep], positions[:, keep]
        tq = x.shape[1]
        q = apply_rope(self.q_proj(x).view(b, tq, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)  # (B,H,Tq,D)
        if cache is not None:  # the cache stores k, v and attends over everything it holds
            y = cache.attend(self.layer_idx, q, k, v, positions)
        else:
            y = attend(q, k, v, positions, key_pos)  # (B, H, Tq, D)
        return self.o_proj(y.transpose(1, 2).reshape(b, tq, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: Config, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, cache: KVCache | None,
                fill: Tensor | None = None) -> Tensor:
        """fill (T,) bool: rows whose k, v are stored from x as it is and which leave unchanged (propagated KV);
        only the other rows attend and run the MLP."""
        if fill is None or not bool(fill.any()):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache)
            return x + self.mlp(self.post_attention_layernorm(x))
        keep = (~fill).nonzero().flatten()
        y = self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, keep)
        if keep.numel() == 0:
            return x
        xk = x.index_select(1, keep) + y
        return x.index_copy(1, keep, xk + self.mlp(self.post_attention_layernorm(xk)))


class ExitHead(nn.Module):
    """Norm plus, unless the config shares the final LM head, a projection of its own."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.early_exit.share_lm_head:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class Backbone(nn.Module):
    """Holds `embed_tokens`, `layers` (ModuleDict keyed by index) and `norm`, so names match HF's `model.*`."""

    def __init__(self, config: Config, start: int, stop: int) -> None:
        super().__init__()
        if start == 0:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleDict({str(i): Block(config, i) for i in range(start, stop)})
        if stop == config.num_hidden_layers:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class ModelOutput:
    """logits (B, T, V) of the final head when computed; exit_logits {exit layer: (B, T, V)}; hidden (B, T, C)
    is the residual stream where the computation stopped."""

    hidden: Tensor
    logits: Tensor | None = None
    exit_logits: dict[int, Tensor] = field(default_factory=dict)


class EarlyExitLM(nn.Module):
    """A Llama-family decoder with exit heads after `config.exit_layers`, holding layers [start, stop)."""

    def __init__(self, config: Config, layers: tuple[int, int] | None = None) -> None:
        super().__init__()
        n = config.num_hidden_layers
        start, stop = layers if layers is not None else (0, n)
        if not 0 <= start < stop <= n:
            raise ValueError(f"layer range [{start}, {stop}) is not inside [0, {n})")
        self.config, self.start, self.stop = config, start, stop
        self.model = Backbone(config, start, stop)
        self.exits = nn.ModuleDict({str(e): ExitHead(config) for e in config.exit_layers if start < e <= stop})
        needs_head = stop == n or (config.early_exit.share_lm_head and len(self.exits) > 0)
        if needs_head:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            if config.tie_word_embeddings and start == 0:
                self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = Rotary(config)
        self.tokenizer = None  # set by coexit.load when the checkpoint has a tokenizer.json
        self.fingerprint = ""  # set by coexit.load: sha256 of config + weights
        self.initialised_exits: tuple[int, ...] = ()

    # ---- pieces --------------------------------------------------------------------------------------------
    @property
    def layer_range(self) -> tuple[int, int]:
        return self.start, self.stop

    def head_logits(self, exit_layer: int, hidden: Tensor) -> Tensor:
        """Logits (.., V) of the head after `exit_layer` layers (`num_hidden_layers` = the final head)."""
        if exit_layer == self.config.num_hidden_layers:
            return self.lm_head(self.model.norm(hidden))
        head = self.exits[str(exit_layer)]
        proj = head.lm_head if hasattr(head, "lm_head") else self.lm_head
        return proj(head.norm(hidden))

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)

    def positions_for(self, x: Tensor, positions: Tensor | None, cache: KVCache | None, layer: int) -> Tensor:
        b, t = x.shape[:2]
        if positions is None:
            first = cache.length(layer) if cache is not None else 0
            positions = torch.arange(first, first + t, device=x.device)
        if positions.dim() == 1:
            positions = positions[None, :].expand(b, -1)
        return positions

    def run_layers(self, hidden: Tensor, positions: Tensor | int | None, cache: KVCache | None, start: int, stop: int,
                   exits: ExitSpec = None, head_rows: str = "all", fill: Tensor | None = None) -> ModelOutput:
        """Run layers [start, stop) on hidden (B, T, C) at positions (T,) or (B, T), or given as the first of T
        contiguous positions (an int; None: the cache's length at `start`, else 0), which takes RoPE from the
        rotary table; compute the asked exits e with start < e <= stop, and
        the final logits when stop == L. head_rows="last" applies heads to the last position only (decoding),
        "none" skips the final head (KV catch-up). fill (T,) bool marks rows whose KV is propagated: each
        layer stores its k, v projections of the row as given, and the row comes out unchanged."""
        if not (self.start <= start <= stop <= self.stop):
            raise ValueError(f"layers [{start}, {stop}) are not held by this model, which holds "
                             f"[{self.start}, {self.stop})")
        want = self._exit_set(exits, start, stop)
        if positions is None or isinstance(positions, int):  # contiguous: cos, sin from the rotary table
            b, t = hidden.shape[:2]
            first = positions if positions is not None else cache.length(start) if cache is not None else 0
            positions, cos, sin = self.rotary.span(first, t, hidden.dtype)
            if b > 1:
                positions = positions.expand(b, -1)
        else:
            positions = self.positions_for(hidden, positions, cache, start)
            first = int(positions[0, 0]) if cache is not None else 0
            cos, sin = self.rotary(positions, hidden.dtype)
        if cache is not None:
            for i in range(start, stop):
                if cache.length(i) != first:
                    raise CacheError(f"layer {i} holds {cache.length(i)} positions but the new rows start at "
                                     f"position {first}; rows must continue each layer without gap or overlap")
        out = ModelOutput(hidden=hidden)
        last = head_rows == "last"
        for i in range(start, stop):
            hidden = self.model.layers[str(i)](hidden, cos, sin, positions, cache, fill)
            if i + 1 in want and i + 1 < self.config.num_hidden_layers:
                out.exit_logits[i + 1] = self.head_logits(i + 1, hidden[:, -1:] if last else hidden)
        out.hidden = hidden
        if stop == self.config.num_hidden_layers and head_rows != "none":
            out.logits = self.head_logits(stop, hidden[:, -1:] if last else hidden)
        return out

    def _exit_set(self, exits: ExitSpec, start: int, stop: int) -> set[int]:
        if exits is None:
            return set()
        if exits == "all":
            return {e for e in self.config.exit_layers if start < e <= stop}
        wanted = {int(exits)} if isinstance(exits, int) else {int(e) for e in exits}
        n = self.config.num_hidden_layers
        bad = [e for e in wanted if e != n and (e not in self.config.exit_layers or not start < e <= stop)]
        if bad:
            raise ValueError(f"no exit head at {bad} within layers ({start}, {stop}]; exits are "
                             f"{list(self.config.exit_layers)}")
        return wanted

    # ---- public API ----------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, positions: Tensor | None = None, cache: KVCache | None = None,
                exits: ExitSpec = None, head_rows: str = "all") -> ModelOutput:
        """input_ids (B, T) -> final logits (B, T, V) plus the logits of the asked exits ("all", a list, or one).

        positions (T,) or (B, T) default to the cache's length onward. The cache is filled in place.
        """
        if self.start != 0 or self.stop != self.config.num_hidden_layers:
            raise ValueError(f"this model holds only layers [{self.start}, {self.stop}); use stage() instead")
        return self.run_layers(self.embed(input_ids), positions, cache, 0, self.stop, exits, head_rows)

    def stage(self, start: int, stop: int) -> Stage:
        """A view over layers [start, stop) with their exits, sharing this model's parameters."""
        return Stage(self, start, stop)

    def new_cache(self, batch_size: int = 1, max_len: int | None = None, device=None, dtype=None,
                  layers: range | None = None) -> KVCache:
        """A KV cache for `layers` (default: every layer this model holds), with the KV heads its attention layers
        hold (fewer than the config's on a tensor-parallel rank)."""
        p = next(self.parameters())
        n_kv = getattr(next(iter(self.model.layers.values())).self_attn, "n_kv", None)
        return KVCache(self.config, layers or range(self.start, self.stop), batch_size, max_len,
                       dtype or p.dtype, device or p.device, n_kv=n_kv)


class Stage(nn.Module):
    """Layers [start, stop) of an EarlyExitLM: takes token ids (when start == 0) or hidden states (B, T, C) and
    returns the hidden state after `stop` layers plus the asked exits (and final logits when stop == L).

    Its submodules are the model's own objects, so parameters are shared, never copied.
    """

    def __init__(self, model: EarlyExitLM, start: int, stop: int) -> None:
        super().__init__()
        if not (model.start <= start < stop <= model.stop):
            raise ValueError(f"stage [{start}, {stop}) is not inside the model's layers "
                             f"[{model.start}, {model.stop})")
        self.start, self.stop, self.config = start, stop, model.config
        self.layers = nn.ModuleDict({str(i): model.model.layers[str(i)] for i in range(start, stop)})
        self.exits = nn.ModuleDict({k: h for k, h in model.exits.items() if start < int(k) <= stop})
        if start == 0:
            self.embed_tokens = model.model.embed_tokens
        if stop == model.config.num_hidden_layers:
            self.norm = model.model.norm
        if hasattr(model, "lm_head") and (stop == model.config.num_hidden_layers or (
                model.config.early_exit.share_lm_head and len(self.exits) > 0)):
            self.lm_head = model.lm_head
        object.__setattr__(self, "_model", model)  # not registered: avoids a module cycle

    @property
    def model(self) -> EarlyExitLM:
        return self._model

    def forward(self, x: Tensor, positions: Tensor | None = None, cache: KVCache | None = None,
                exits: ExitSpec = None, head_rows: str = "all") -> ModelOutput:
        if self.start == 0 and not x.is_floating_point():
            x = self._model.embed(x)
        return self._model.run_layers(x, positions, cache, self.start, self.stop, exits, head_rows)
