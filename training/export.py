"""Export of a trained pipeline to a coexit checkpoint directory that `coexit.load` reads.

Every stage's state_dict already uses coexit names; tensor-parallel slices are all-gathered inside each TP group
and concatenated along `training.tp.TP_DIMS`, each stage's (dp 0, tp 0) rank writes its merged tensors to a
scratch file in the export directory (a shared filesystem across nodes is assumed), and global rank 0 joins
the stages into one EarlyExitLM and writes config.json, model.safetensors and tokenizer.json.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from coexit.checkpoint import save
from coexit.config import Config
from coexit.model import EarlyExitLM, rope_inv_freq
from coexit.tokenizer import Tokenizer
from training.tp import tp_dim


def gather_stage(stage: torch.nn.Module, tp_group, tp_size: int) -> dict[str, torch.Tensor]:
    """This stage's full (TP-merged) tensors, on CPU; every rank of the TP group must call it."""
    state = {}
    for name, t in sorted(stage.state_dict().items()):
        t = t.detach().contiguous()
        dim = tp_dim(name)
        if tp_size > 1 and dim is not None:
            parts = [torch.empty_like(t) for _ in range(tp_size)]
            dist.all_gather(parts, t, group=tp_group)
            t = torch.cat(parts, dim=dim)
        state[name] = t.cpu().clone()
    return state


def export(stage: torch.nn.Module, grid, config: Config, out: str | Path, tp_group, tp_size: int,
           tokenizer: Tokenizer | None) -> Path | None:
    out = Path(out)
    scratch = out / ".stages"
    rank = dist.get_rank()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        scratch.mkdir(exist_ok=True)
    dist.barrier()
    state = gather_stage(stage, tp_group, tp_size)
    if grid.get_data_parallel_rank() == 0 and grid.get_slice_parallel_rank() == 0:
        save_file(state, str(scratch / f"stage-{grid.get_stage_id():03d}.safetensors"))
    dist.barrier()
    if rank == 0:
        merged: dict[str, torch.Tensor] = {}
        for f in sorted(scratch.glob("stage-*.safetensors")):
            for k, v in load_file(str(f)).items():
                merged.setdefault(k, v)  # a shared LM head appears on several stages, identical by construction
        if config.tie_word_embeddings:
            merged["lm_head.weight"] = merged["model.embed_tokens.weight"]
        dtype = next(iter(merged.values())).dtype
        with torch.device("meta"):
            model = EarlyExitLM(config)
        model.to_empty(device="cpu")
        model.load_state_dict(merged, strict=True, assign=False)
        model.rotary.inv_freq = rope_inv_freq(config)
        save(model.to(dtype), out, tokenizer=tokenizer)
        shutil.rmtree(scratch, ignore_errors=True)
    dist.barrier()
    return out if rank == 0 else None
