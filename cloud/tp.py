"""Tensor-parallel deep stages for `coexit serve --tp N` (run under torchrun): the process group and the sharded
model loader. The replication protocol (who schedules, what is broadcast each tick) lives in the engine, not here.

Owns:
- `check_launch(n)`, `check_shardable(config, n)`: the refusals (not started by torchrun as n ranks; heads or MLP
  not divisible by n), which `coexit serve --tp` also runs before loading anything.
- `init_tp(n, device_type, timeout_s)`: the process group from torchrun's environment (gloo on CPU, nccl on CUDA
  with the device LOCAL_RANK), a 1-D DeviceMesh over it, and a gloo group for object broadcasts (usable under nccl
  too); every wait for the other ranks gives up after timeout_s.
- `load_sharded(model_dir, tp, deep_only, dtype, device)`: the model `cloud.server.load_model` gives, with every
  Block's q/k/v/gate/up projections ColwiseParallel and o/down RowwiseParallel through PyTorch's own
  `parallelize_module`, applied on the meta-device model before any storage exists, so each rank reads only its
  slice of each sharded tensor from the safetensors file (coexit.checkpoint.load's `prepare` hook). Heads are split
  contiguously, so GQA groups stay whole on one rank; each Attention's n_heads/n_kv become the local counts. Norms,
  embeddings, exit heads and the LM head stay replicated (a tied LM head stays tied); the fingerprint is the files'
  and so equals the unsharded load's.
- `localize`: the same shards as plain tensors plus an all_reduce hook, for serving without DTensor's dispatch.
- `kv_heads`, `weight_bytes`, `describe`: the per-rank sizes a KV pool and the start-up report need.

tp None or a world of 1 is today's single-process path, untouched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coexit.config import Config
from coexit.errors import UsageError
from coexit.model import Attention, Block, EarlyExitLM

COLWISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROWWISE = ("self_attn.o_proj", "mlp.down_proj")

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def launch_hint(n: int) -> str:
    return f"torchrun --nproc_per_node {n} -m coexit serve --tp {n} ..."


@dataclass
class TP:
    """This process's place in the tensor-parallel group. `group` is the default (model) group, nccl on CUDA;
    `cpu_group` is a gloo group over the same ranks for broadcast_object_list and other host-side messages.
    A world of 1 has no process group (mesh and groups None)."""

    rank: int
    world: int
    mesh: Any = None  # torch.distributed.device_mesh.DeviceMesh
    group: Any = None  # torch.distributed.ProcessGroup
    cpu_group: Any = None
    device_type: str = "cpu"
    local_rank: int = 0
    timeout_s: float = 600.0  # the longest wait for the other ranks (init_tp)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """The device this rank's shards live on."""
        return torch.device("cuda", self.local_rank) if self.device_type == "cuda" else torch.device("cpu")


def check_launch(n: int) -> tuple[int, int]:
    """(world, rank) of this process, or UsageError, naming the torchrun command line, when torchrun did not start
    it as one of n ranks."""
    env_world = os.environ.get("WORLD_SIZE")
    if env_world is None or "RANK" not in os.environ:
        raise UsageError(f"--tp {n} needs one process per rank, started by torchrun: launch with "
                         f"`{launch_hint(n)}`")
    world, rank = int(env_world), int(os.environ["RANK"])
    if world != n:
        raise UsageError(f"--tp {n} but torchrun started {world} processes: launch with `{launch_hint(n)}` "
                         f"(--nproc_per_node must equal --tp)")
    return world, rank


def init_tp(n: int, device_type: str, timeout_s: float = 600.0) -> TP:
    """Join the tensor-parallel group torchrun started (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    n == 1 outside torchrun is a world of one with no process group. device_type "cpu" uses gloo, "cuda" nccl on
    the GPU LOCAL_RANK. Raises UsageError, naming the torchrun command line, when the world is not n ranks.
    timeout_s bounds every wait for the other ranks, start-up included: a rank that never joins or hangs stops the
    server after it instead of holding it forever. (A wait that outlasts it with every rank alive, an idle
    follower's, is kept short by rank 0's heartbeats: cloud/replica.py.)"""
    import datetime

    import torch.distributed as dist

    if n < 1:
        raise UsageError(f"--tp {n}: the tensor-parallel degree must be at least 1")
    if device_type not in ("cpu", "cuda"):
        raise UsageError(f"tensor parallelism runs on cpu (gloo) or cuda (nccl), not {device_type!r}")
    if n == 1 and os.environ.get("WORLD_SIZE") in (None, "1"):
        return TP(rank=0, world=1, device_type=device_type)
    world, rank = check_launch(n)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"rank {rank} has LOCAL_RANK {local_rank} but this machine has "
                             f"{torch.cuda.device_count()} GPUs: --tp {n} needs {n} GPUs per node")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        kw: dict[str, Any] = {"device_id": torch.device("cuda", local_rank)} if device_type == "cuda" else {}
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s), **kw)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("tp",))
    cpu_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))  # every rank, in order
    return TP(rank=rank, world=world, mesh=mesh, group=dist.group.WORLD, cpu_group=cpu_group,
              device_type=device_type, local_rank=local_rank, timeout_s=timeout_s)


def check_shardable(config: Config, n: int) -> None:
    """UsageError unless heads and the MLP split evenly over n ranks (whole GQA groups per rank)."""
    bad = [f"{name} ({value})" for name, value in (("num_key_value_heads", config.num_key_value_heads),
                                                   ("num_attention_heads", config.num_attention_heads),
                                                   ("intermediate_size", config.intermediate_size))
           if value % n]
    if bad:
        ok = [d for d in range(1, config.num_key_value_heads + 1)
              if config.num_key_value_heads % d == 0 and config.intermediate_size % d == 0]
        raise UsageError(f"--tp {n} cannot split this model: {', '.join(bad)} not divisible by {n}; "
                         f"tensor-parallel degrees that work: {ok}")


def kv_heads(config: Config, tp: TP | None) -> int:
    """KV heads each rank holds (what its KV pool is sized with)."""
    world = tp.world if tp is not None else 1
    return config.num_key_value_heads // world


def shard_model(model: EarlyExitLM, tp: TP) -> EarlyExitLM:
    """Apply Colwise/Rowwise parallelism to every Block of `model` (meta or materialised) over tp.mesh, in place,
    and set each Attention's head counts to this rank's."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    check_shardable(model.config, tp.world)
    plan: dict[str, Any] = {}
    for name in COLWISE:
        plan[name] = ColwiseParallel()
    for name in ROWWISE:
        plan[name] = RowwiseParallel()
    for style in plan.values():
        style.src_data_rank = None  # split locally: no scatter of (meta or already loaded) data from rank 0
    for block in model.model.layers.values():
        assert isinstance(block, Block)
        parallelize_module(block, tp.mesh, plan)
        attn: Attention = block.self_attn
        attn.n_heads //= tp.world
        attn.n_kv //= tp.world
    return model


def localize(model: EarlyExitLM, tp: TP) -> EarlyExitLM:
    """Run a sharded model without DTensor at forward time: each DTensor parameter becomes a plain parameter on its
    local shard (same storage), and the Colwise/Rowwise hooks give way to one in-place all_reduce of each
    row-parallel output over tp.group. The values are the DTensor model's bit for bit (tested); what goes is
    DTensor's per-op Python dispatch: a decode step of the tiny model (2 gloo ranks, busy 2-core CPU host) took
    85-160 ms with DTensor, 25-34 ms localized, 2-5 ms unsharded (most of the localized time is 12 gloo
    all_reduces). Plain tensors and c10d all_reduce are also what CUDA graph capture takes. Each localized
    parameter carries `tp_shards` (the world) so weight_bytes(local=False) still knows the unsharded size."""
    import torch.distributed as dist

    def all_reduce(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(out, group=tp.group)
        return out

    for block in model.model.layers.values():
        for name in COLWISE + ROWWISE:
            linear = block.get_submodule(name)
            if name in ROWWISE and getattr(linear, "bias", None) is not None:
                raise UsageError(f"{name} has a bias: a row-parallel bias must be added after the all_reduce")
            linear._forward_pre_hooks.clear()  # parallelize_module's input/output layout hooks, the only ones
            linear._forward_hooks.clear()
            for pname, param in list(linear.named_parameters(recurse=False)):
                if hasattr(param, "to_local"):
                    local = nn.Parameter(param.to_local(), requires_grad=False)
                    local.tp_shards = tp.world
                    setattr(linear, pname, local)
            if name in ROWWISE:
                linear.register_forward_hook(all_reduce)
    return model


def load_sharded(model_dir: str | Path, tp: TP | None, deep_only: bool = False, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu", local: bool = False) -> EarlyExitLM:
    """The model `cloud.server.load_model` gives (whole, or [split, L) when deep_only), sharded over tp; each rank
    reads from the safetensors files only its slices of the sharded tensors. dtype None: the files' dtype.
    local=True: then `localize` it (plain tensors and one all_reduce per row-parallel layer at run time)."""
    import coexit
    from coexit.checkpoint import _weight_files

    config = coexit.read_config(model_dir)
    layers = (config.split_layer, config.num_hidden_layers) if deep_only else None
    if tp is None or tp.world == 1:
        return coexit.load(model_dir, layers=layers, dtype=dtype, device=device)
    check_shardable(config, tp.world)
    if tp.mesh is None:
        raise UsageError(f"a world of {tp.world} ranks needs init_tp's device mesh: call init_tp first")
    if dtype is None:  # DTensor shards are copied into, not replaced: their dtype must be known up front
        from safetensors import safe_open

        files = _weight_files(Path(model_dir))
        name = next(n for n in files if n.endswith(COLWISE[0] + ".weight"))
        with safe_open(files[name], "pt") as f:
            code = f.get_slice(name).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise UsageError(f"{files[name].name}: {name} is {code}; pass a float dtype to shard it")
        dtype = _SAFETENSORS_DTYPES[code]

    def prepare(model: EarlyExitLM) -> None:
        model.to(dtype)
        shard_model(model, tp)

    model = coexit.load(model_dir, layers=layers, dtype=dtype, device=device, prepare=prepare)
    return localize(model, tp) if local else model


def _unique_params(model: nn.Module):
    seen: set[int] = set()
    for p in model.parameters():  # parameters() already skips a tied duplicate; ids guard the rest
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def weight_bytes(model: nn.Module, local: bool = True) -> int:
    """Bytes of the model's parameters this rank holds (a DTensor or a localized parameter counts its local shard;
    tied tensors once); local=False: the unsharded size."""
    total = 0
    for p in _unique_params(model):
        t = p.to_local() if local and hasattr(p, "to_local") else p
        total += t.numel() * t.element_size() * (1 if local else getattr(p, "tp_shards", 1))
    return total


def describe(model: EarlyExitLM, tp: TP | None, pool_bytes: int) -> str:
    """One line for the start-up log: this rank's decoder layers beside the whole stage's (the part split 1/N), all
    its weights (replicated norms, embeddings and heads included), and its KV pool."""
    mib = 1 << 20
    rank, world = (tp.rank, tp.world) if tp is not None else (0, 1)
    layers = model.model.layers
    return (f"rank {rank}/{world}: decoder layers {weight_bytes(layers) / mib:.3f} MiB of "
            f"{weight_bytes(layers, local=False) / mib:.3f} MiB, weights {weight_bytes(model) / mib:.2f} MiB "
            f"(full stage {weight_bytes(model, local=False) / mib:.2f} MiB), KV {pool_bytes / mib:.1f} MiB")
