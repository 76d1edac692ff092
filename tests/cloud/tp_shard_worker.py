"""One rank of tests/cloud/test_tp_shard.py, started by torchrun: loads each checkpoint whole and sharded over the
world (gloo), runs the same rows through both, and writes what it measured to OUT/rank{r}.json.

usage: torchrun --nproc_per_node N tests/cloud/tp_shard_worker.py OUT CKPT [CKPT ...]
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import torch

import coexit
import coexit.checkpoint as ckpt
from cloud import tp as tpmod

torch.set_num_threads(1)


class Recording:
    """safe_open that records which tensors were read whole and which slices were read."""

    whole: list[str] = []
    slices: list[tuple[str, list[int], list[int]]] = []  # name, file shape, shape read

    def __init__(self, *a, **kw) -> None:
        self.f = _safe_open(*a, **kw)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def keys(self):
        return self.f.keys()

    def get_tensor(self, name):
        Recording.whole.append(name)
        return self.f.get_tensor(name)

    def get_slice(self, name):
        sl, outer = self.f.get_slice(name), self

        class Slice:
            def get_shape(self):
                return sl.get_shape()

            def get_dtype(self):
                return sl.get_dtype()

            def __getitem__(self, idx):
                t = sl[idx]
                outer.slices.append((name, list(sl.get_shape()), list(t.shape)))
                return t

        return Slice()


_safe_open = ckpt.safe_open


def run_rows(model, start: int, seed: int, dtype: torch.dtype) -> list[dict]:
    """Prefill 5 positions, a chunk of 3 with the middle row's KV propagated, then 3 single-row decodes; every
    exit and the final head each step. Returns the logits of each step."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    cache = model.new_cache(batch_size=2, max_len=32, layers=range(start, cfg.num_hidden_layers))
    steps = []
    for t, fill in ((5, None), (3, torch.tensor([False, True, False])), (1, None), (1, None), (1, None)):
        hidden = torch.randn(2, t, cfg.hidden_size, generator=gen).to(dtype)
        with torch.inference_mode():
            out = model.run_layers(hidden, None, cache, start, cfg.num_hidden_layers, exits="all", fill=fill)
        steps.append({"final": out.logits, **{str(e): x for e, x in out.exit_logits.items()}})
    return steps


def max_diff(ref: list[dict], got: list[dict]) -> float:
    diffs = [float((a[k] - b[k]).abs().max()) for a, b in zip(ref, got) for k in a]
    return float("nan") if any(x != x for x in diffs) else max(diffs)


def main() -> None:
    out_dir, dirs = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    tp = tpmod.init_tp(int(os.environ["WORLD_SIZE"]), "cpu")
    box = [{"plan": [1, 2, 3]} if tp.rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0, group=tp.cpu_group)
    report: dict = {"rank": tp.rank, "world": tp.world, "broadcast": box[0], "models": {}}
    for d, deep_only, dtype in itertools.product(dirs, (False, True), (torch.float32, torch.float64)):
        cfg = coexit.read_config(d)
        full = coexit.load(d, layers=(cfg.split_layer, cfg.num_hidden_layers) if deep_only else None, dtype=dtype)
        Recording.whole, Recording.slices = [], []
        ckpt.safe_open = Recording
        try:
            model = tpmod.load_sharded(d, tp, deep_only=deep_only, device="cpu",  # fp32: the file's dtype
                                      dtype=None if dtype == torch.float32 else dtype)
        finally:
            ckpt.safe_open = _safe_open
        start = model.start
        plain = tpmod.load_sharded(d, tp, deep_only=deep_only, dtype=dtype, local=True)
        ref, got = run_rows(full, start, 1, dtype), run_rows(model, start, 1, dtype)
        diff, keys = max_diff(ref, got), sorted({k for a in ref for k in a})
        got_plain = run_rows(plain, start, 1, dtype)
        blocks = {}
        for i, block in model.model.layers.items():
            fblock = full.model.layers[i]
            params = {}
            for name, p in block.named_parameters():
                params[name] = {"local": tpmod.weight_bytes(_Holder(p)),
                                "global": tpmod.weight_bytes(_Holder(p), local=False),
                                "full": tpmod.weight_bytes(_Holder(fblock.get_parameter(name))),
                                "placements": [str(x) for x in getattr(p, "placements", ())]}
            blocks[i] = {"local": tpmod.weight_bytes(block), "full": tpmod.weight_bytes(fblock),
                         "params": params,
                         "heads": [block.self_attn.n_heads, block.self_attn.n_kv]}
        sharded_names = [n for n in model.state_dict() if any(n.endswith(s + ".weight") or n.endswith(s + ".bias")
                                                              for s in tpmod.COLWISE + tpmod.ROWWISE)
                         and not n.endswith("o_proj.bias")]
        report["models"][f"{d.name}:{'deep' if deep_only else 'whole'}:{str(dtype)[6:]}"] = {
            "max_diff": diff, "heads_compared": keys,
            "local_vs_dtensor": max_diff(got, got_plain), "local_vs_full": max_diff(ref, got_plain),
            "local_bytes": [tpmod.weight_bytes(plain), tpmod.weight_bytes(plain, local=False)],
            "local_has_dtensor": any(hasattr(p, "placements") for p in plain.parameters()),
            "fingerprint_equal": model.fingerprint == full.fingerprint and bool(model.fingerprint),
            "tied": (model.lm_head.weight is model.model.embed_tokens.weight) if model.start == 0 else None,
            "dtype": str(next(iter(model.model.layers.values())).self_attn.q_proj.weight.dtype),
            "weight_bytes": tpmod.weight_bytes(model), "full_bytes": tpmod.weight_bytes(full),
            "global_bytes": tpmod.weight_bytes(model, local=False),
            "describe": tpmod.describe(model, tp, 3 << 20),
            "kv_heads": tpmod.kv_heads(model.config, tp),
            "blocks": blocks, "sharded_names": sharded_names,
            "read_whole": Recording.whole, "read_slices": Recording.slices,
        }
    (out_dir / f"rank{tp.rank}.json").write_text(json.dumps(report, indent=1))
    torch.distributed.destroy_process_group()


class _Holder(torch.nn.Module):
    def __init__(self, p) -> None:
        super().__init__()
        self.p = p


if __name__ == "__main__":
    main()
