"""Tensor parallelism inside a pipeline stage: Megatron-style column/row-parallel linears on a process group.

`shard_block` swaps a coexit Block's projections in place, keeping parameter names (`self_attn.q_proj.weight`
is then this rank's slice): q/k/v and gate/up are split by output rows (column parallel, heads split
contiguously, so each rank keeps whole GQA groups), o_proj and down_proj by input columns (row parallel, one
all-reduce each). Norms, embeddings and LM heads stay replicated. `TP_DIMS` says how export merges the slices.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# parameter-name suffix -> dimension along which the tensor-parallel slices concatenate
TP_DIMS = {
    "self_attn.q_proj.weight": 0, "self_attn.q_proj.bias": 0,
    "self_attn.k_proj.weight": 0, "self_attn.k_proj.bias": 0,
    "self_attn.v_proj.weight": 0, "self_attn.v_proj.bias": 0,
    "self_attn.o_proj.weight": 1,
    "mlp.gate_proj.weight": 0, "mlp.up_proj.weight": 0, "mlp.down_proj.weight": 1,
}


def tp_dim(name: str) -> int | None:
    for suffix, dim in TP_DIMS.items():
        if name.endswith(suffix):
            return dim
    return None


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the input gradient backward (each rank saw only its slice's share)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce of partial sums forward; identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def _mark(p: nn.Parameter, dim: int) -> nn.Parameter:
    p.tensor_model_parallel = True  # DeepSpeed counts such tensors once per rank in the gradient norm
    p.partition_dim = dim
    return p


class ColumnParallelLinear(nn.Module):
    """y_r = x W_r^T (+ b_r): this rank's slice of the output features."""

    def __init__(self, full: nn.Linear, group, rank: int, world: int) -> None:
        super().__init__()
        self.group = group
        self.weight = _mark(nn.Parameter(full.weight.detach().chunk(world, 0)[rank].clone()), 0)
        self.bias = None
        if full.bias is not None:
            self.bias = _mark(nn.Parameter(full.bias.detach().chunk(world, 0)[rank].clone()), 0)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(_CopyToTP.apply(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum_r x_r W_r^T (+ b): input features split, partial products all-reduced."""

    def __init__(self, full: nn.Linear, group, rank: int, world: int) -> None:
        super().__init__()
        self.group = group
        self.weight = _mark(nn.Parameter(full.weight.detach().chunk(world, 1)[rank].clone()), 1)
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        y = _ReduceFromTP.apply(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


def shard_block(block: nn.Module, group, rank: int, world: int) -> None:
    """Make a coexit Block tensor parallel over `group` in place (world must divide heads, kv heads, MLP)."""
    if world == 1:
        return
    attn, mlp = block.self_attn, block.mlp
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(attn, name, ColumnParallelLinear(getattr(attn, name), group, rank, world))
    attn.o_proj = RowParallelLinear(attn.o_proj, group, rank, world)
    attn.n_heads //= world
    attn.n_kv //= world
    mlp.gate_proj = ColumnParallelLinear(mlp.gate_proj, group, rank, world)
    mlp.up_proj = ColumnParallelLinear(mlp.up_proj, group, rank, world)
    mlp.down_proj = RowParallelLinear(mlp.down_proj, group, rank, world)
