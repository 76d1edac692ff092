"""Pipeline stages built from coexit's own modules, and the loss that carries exit losses through the pipeline.

A stage is `EarlyExitLM(config, layers=(a, b))` (or `coexit.load(dir, layers=(a, b))`) whose children are adopted
under the same attribute names, so a stage's state_dict keys are coexit's (`model.layers.3.mlp.up_proj.weight`,
`exits.2.norm.weight`, `lm_head.weight`). Each stage is one PipelineModule layer (partition "uniform" over pp
layers), so DeepSpeed only prefixes the layer index.

Activation tuple between stages: (hidden (B,T,C), exit_losses (n_exits,), labels (B,T)). Stage 0 creates
exit_losses as zeros with requires_grad=True; a stage holding exit e adds that exit's mean cross-entropy in slot
e. The last stage returns (final logits, exit_losses) and `PipeLoss` adds the weighted final and exit losses.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.pipe import PipelineModule
from torch import Tensor, nn

from coexit.checkpoint import load
from coexit.config import Config
from coexit.model import EarlyExitLM
from training.tp import shard_block


def init_model(config: Config, seed: int, layers: tuple[int, int] | None = None, std: float = 0.02) -> EarlyExitLM:
    """Scratch initialisation keyed by parameter name, so every stage, every rank and a single-process reference
    draw the same values: N(0, std) for matrices, ones for norms. A tied LM head draws the embedding's values."""
    model = EarlyExitLM(config, layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            key = "model.embed_tokens.weight" if name == "lm_head.weight" and config.tie_word_embeddings else name
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
            p.copy_(std * torch.randn(p.shape, generator=gen))
    return model


def trainable(name: str, mode: str) -> bool:
    """EE-tuning trains only the exit heads (their norms, and their own LM heads when not shared)."""
    return mode != "ee-tune" or name.startswith("exits.")


class _ZeroGradLink(torch.autograd.Function):
    """Returns `x`; gives `anchor` a zero gradient. EE-tuning detaches the incoming hidden state (no backward
    through a frozen backbone) yet the pipeline must still send a gradient for it to the previous stage."""

    @staticmethod
    def forward(ctx, x: Tensor, anchor: Tensor) -> Tensor:
        ctx.shape, ctx.dtype = anchor.shape, anchor.dtype
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, torch.zeros(ctx.shape, dtype=ctx.dtype, device=grad.device)


class _JoinBackward(torch.autograd.Function):
    """(hidden, exit_losses) -> the same two tensors, made by one autograd node whose backward waits until it has
    both gradients and then propagates once. DeepSpeed 0.19 calls backward separately for each tensor a stage
    sends; without this the layers below an exit head would be back-propagated twice per micro-batch."""

    @staticmethod
    def forward(ctx, hidden: Tensor, losses: Tensor):
        ctx.set_materialize_grads(False)
        ctx.pending = None
        return hidden.clone(), losses.clone()

    @staticmethod
    def backward(ctx, g_hidden, g_losses):
        if g_hidden is not None and g_losses is not None:
            return g_hidden, g_losses
        if ctx.pending is None:  # first of two calls: hold the gradient, propagate nothing yet
            ctx.pending = (g_hidden, g_losses)
            return None, None
        held_h, held_l = ctx.pending
        ctx.pending = None
        return (g_hidden if g_hidden is not None else held_h), (g_losses if g_losses is not None else held_l)


@dataclass
class StagePlan:
    config: Config
    ranges: list[tuple[int, int]]
    mode: str
    source: str | None  # checkpoint dir, or None for scratch init
    seed: int
    tp_group: object = None
    tp_rank: int = 0
    tp_size: int = 1
    exit_index: dict[int, int] = field(default_factory=dict)
    distill: float = 0.0  # weight of KL(final || exit) in each exit's loss (exits on the last stage only)


class PipeStage(nn.Module):
    def __init__(self, plan: StagePlan, stage: int) -> None:
        super().__init__()
        cfg = plan.config
        a, b = plan.ranges[stage]
        lm = load(plan.source, layers=(a, b), dtype=torch.float32, early_exit=cfg.early_exit) if plan.source \
            else init_model(cfg, plan.seed, (a, b))
        self.config, self.start, self.stop, self.mode = cfg, a, b, plan.mode
        self.first, self.last = a == 0, b == cfg.num_hidden_layers
        self.exit_index = plan.exit_index
        self.distill = plan.distill
        self.model, self.exits, self.rotary = lm.model, lm.exits, lm.rotary
        if hasattr(lm, "lm_head"):
            self.lm_head = lm.lm_head
        for i in range(a, b):
            shard_block(self.model.layers[str(i)], plan.tp_group, plan.tp_rank, plan.tp_size)
        for name, p in self.named_parameters():
            p.requires_grad_(trainable(name, plan.mode))

    def _slot(self, e: int, losses: Tensor) -> Tensor:
        return F.one_hot(torch.tensor(self.exit_index[e], device=losses.device), losses.numel()).to(losses.dtype)

    def head_logits(self, e: int, hidden: Tensor) -> Tensor:
        if e == self.config.num_hidden_layers:
            return self.lm_head(self.model.norm(hidden))
        head = self.exits[str(e)]
        return (head.lm_head if hasattr(head, "lm_head") else self.lm_head)(head.norm(hidden))

    def forward(self, inputs):
        frozen = self.mode == "ee-tune"
        if self.first:
            ids, labels = inputs
            hidden = self.model.embed_tokens(ids)
            device = hidden.device
            losses = torch.zeros(max(1, len(self.exit_index)), device=device, requires_grad=True)
            incoming = None
        else:
            incoming, losses, labels = inputs
            hidden = incoming.detach() if frozen else incoming
        b, t = labels.shape
        positions = torch.arange(t, device=labels.device)[None, :].expand(b, -1)
        cos, sin = self.rotary(positions, hidden.dtype)
        students = {}  # exit -> logits, for self-distillation once the final head is computed
        for i in range(self.start, self.stop):
            hidden = self.model.layers[str(i)](hidden, cos, sin, positions, None)
            e = i + 1
            if e < self.config.num_hidden_layers and str(e) in self.exits:
                logits = self.head_logits(e, hidden)
                loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
                losses = losses + self._slot(e, losses) * loss.to(losses.dtype)
                if self.distill > 0:
                    students[e] = logits
        if frozen and incoming is not None:
            losses = _ZeroGradLink.apply(losses, incoming)
        if self.last:
            final = self.head_logits(self.stop, hidden)
            if students:  # KL(final || exit): the exit learns the final head's whole distribution
                teacher = torch.log_softmax(final.detach().float(), -1)
                for e, logits in students.items():
                    kl = F.kl_div(torch.log_softmax(logits.float(), -1).flatten(0, 1), teacher.flatten(0, 1),
                                  log_target=True, reduction="batchmean")
                    losses = losses + self._slot(e, losses) * (self.distill * kl).to(losses.dtype)
            return final, losses
        if frozen:
            hidden = hidden.detach().requires_grad_()
        else:
            hidden, losses = _JoinBackward.apply(hidden, losses)
        return hidden, losses, labels


class PipeLoss:
    """Weighted sum of the final cross-entropy and the carried exit losses; keeps detached values for logging.

    Exit weight schedule (EE-LLM style warm-up): w_e(step) = w_e * min(1, (step + 1) / exit_warmup_steps), or
    w_e when exit_warmup_steps is 0; the final head's weight is constant.
    """

    def __init__(self, config: Config, warmup: int) -> None:
        self.config, self.warmup = config, warmup
        self.exits = list(config.exit_layers)
        self.step = 0
        self.records: list[Tensor] = []

    def weights(self, step: int | None = None) -> list[float]:
        step = self.step if step is None else step
        ramp = 1.0 if self.warmup <= 0 else min(1.0, (step + 1) / self.warmup)
        return [self.config.loss_weight(e) * ramp for e in self.exits]

    def __call__(self, outputs, labels: Tensor) -> Tensor:
        logits, losses = outputs
        final = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        total = self.config.loss_weight(self.config.num_hidden_layers) * final
        w = torch.zeros(losses.numel(), dtype=losses.dtype, device=losses.device)  # a slot even without exits,
        w[:len(self.exits)] = torch.tensor(self.weights(), dtype=losses.dtype)   # so the carried tensor gets a grad
        total = total + (w * losses).sum()
        self.records.append(torch.cat([losses.detach().float()[:len(self.exits)], final.detach()[None].float()]))
        return total


class EEPipelineModule(PipelineModule):
    """PipelineModule whose LM head copies on several stages (exit heads sharing it, or an embedding tied to it)
    stay one weight: their gradients are summed across those stages, like DeepSpeed's tied layers."""

    def setup_head_ties(self, holders: list[int]) -> None:
        self._head_group = None
        if len(holders) < 2:
            return
        topo = self._topo
        me = topo.get_coord(dist.get_rank())
        for dp in range(topo.get_dim("data")):
            for mp in range(topo.get_dim("model")):
                ranks = sorted(topo.get_rank(pipe=s, data=dp, model=mp) for s in holders)
                group = dist.new_group(ranks)
                if dp == me.data and mp == me.model and me.pipe in holders:
                    self._head_group = group
        w = self.head_weight()
        if w is not None and me.pipe != holders[0]:
            w.ds_pipe_replicated = True  # count the shared head once in the gradient norm (as DeepSpeed's ties do)

    def head_weight(self) -> nn.Parameter | None:
        stage = self.forward_funcs[0]
        if hasattr(stage, "lm_head"):
            return stage.lm_head.weight
        if stage.config.tie_word_embeddings and stage.first:
            return stage.model.embed_tokens.weight
        return None

    def get_tied_weights_and_groups(self):
        pairs = list(super().get_tied_weights_and_groups())
        w = self.head_weight()
        if getattr(self, "_head_group", None) is not None and w is not None and w.requires_grad:
            pairs.append((w, self._head_group))
        return pairs

    def allreduce_tied_weight_gradients(self):
        for weight, group in self.get_tied_weights_and_groups():
            if weight.grad is not None:
                dist.all_reduce(weight.grad, group=group)


def head_holders(config: Config, ranges: list[tuple[int, int]]) -> list[int]:
    """Stages that hold a copy of the LM head weight."""
    out = []
    n = config.num_hidden_layers
    for s, (a, b) in enumerate(ranges):
        has_exit = any(a < e <= b for e in config.exit_layers)
        if b == n or (config.early_exit.share_lm_head and has_exit) or (config.tie_word_embeddings and a == 0):
            out.append(s)
    return out
