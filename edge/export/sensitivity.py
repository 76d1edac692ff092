"""Measured sensitivity of each edge tensor to each llama.cpp type: the damage one tensor does, quantized alone.

For every matrix of the edge layers [0, split) and every stored type its candidates give (quant_types.stored_types:
q4_0, iq4_nl, q4_k, q5_0, q5_k, q6_k, q8_0, f16, after llama.cpp's fallbacks), the fp32 model runs with that one
weight replaced by llama.cpp's own rounding of it (quant_types.fake_quantize, with the checkpoint's importance
matrix, as the export applies it) and is compared with the unquantized model on calibration text:
- `exit.E`: KL(fp32 || quantized) of each edge exit head E's next-token distribution, mean per token;
- `final`: the same KL at the final head, computed by the fp32 deep layers [split, L) from the quantized edge's
  split rows (what the cloud receives, so what it answers from);
- `split_mse`: the split rows' squared error relative to their squared norm (reported, not summed).
A tensor's damage (Sensitivity.damage) is the sum of the KLs. Other backends measure their own types through
`rounders` (type -> a function from the nn.Linear to the module that replaces it while measured): the bitsandbytes
backend passes its Linear4bit / Linear8bitLt (edge/backends/bnb.py), and `merge` keeps both in one file.
Layers are replayed from a cached input, so a tensor in layer i costs layers [i, L) and three heads. `drops` holds
the same figures for an edge layer left out entirely (the only pruning llama.cpp can run). The result is JSON beside
the model (SENSITIVITY_FILE), keyed by the checkpoint's fingerprint; edge/export/policy.py chooses types from it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from edge.export.imatrix import LINEAR_NAMES
from edge.export.quant_types import CANDIDATES, fake_quantize, stored_types

SENSITIVITY_FILE = "quant_sensitivity.json"
FORMAT = "coexit.quant_sensitivity/1"


@dataclass
class Sensitivity:
    """tensors: GGUF name -> {"shape": [rows, cols], "damage": {stored type: {component: value}}}."""

    fingerprint: str
    tensors: dict[str, dict]
    meta: dict = field(default_factory=dict)
    drops: dict[str, dict] = field(default_factory=dict)  # edge layer -> {component: value}

    def damage(self, name: str, t: str) -> float:
        return sum(v for k, v in self.tensors[name]["damage"][t].items() if k != "split_mse")

    def merge(self, other: Sensitivity) -> Sensitivity:
        """This measurement plus `other`'s types (the same checkpoint; e.g. bitsandbytes' next to llama.cpp's)."""
        if other.fingerprint != self.fingerprint:
            raise ValueError("cannot merge sensitivities of different checkpoints")
        for name, entry in other.tensors.items():
            self.tensors.setdefault(name, {"shape": entry["shape"], "damage": {}})["damage"].update(entry["damage"])
        self.meta.setdefault("also", []).append(other.meta)
        return self

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"format": FORMAT, "fingerprint": self.fingerprint, "meta": self.meta,
                                    "tensors": self.tensors, "drops": self.drops}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Sensitivity:
        d = json.loads(Path(path).read_text())
        if d.get("format") != FORMAT:
            raise ValueError(f"{path} is not a sensitivity file ({FORMAT}); measure with `coexit compress`")
        return cls(d["fingerprint"], d["tensors"], d.get("meta", {}), d.get("drops", {}))


def _kl(ref_logp: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(ref || got) per token, summed over rows, from reference log-probs and logits (.., V)."""
    return float(F.kl_div(F.log_softmax(logits.flatten(0, -2), -1), ref_logp.flatten(0, -2), log_target=True,
                          reduction="sum"))


class _Probe:
    """The fp32 model, calibration batches, each layer's cached input, and the reference heads."""

    def __init__(self, model, batches: list[torch.Tensor]) -> None:
        cfg = model.config
        self.model, self.split, self.n = model, cfg.split_layer, cfg.num_hidden_layers
        self.exits = list(cfg.edge_exit_layers)
        self.inputs, self.ref, self.tokens = [], [], sum(b.numel() for b in batches)
        for x in batches:
            h, ins = model.embed(x), []
            for i in range(self.split):
                ins.append(h)
                h = model.run_layers(h, 0, None, i, i + 1).hidden
            ins.append(h)
            ref = {f"exit.{e}": F.log_softmax(model.head_logits(e, ins[e]), -1) for e in self.exits}
            ref["final"] = F.log_softmax(model.run_layers(h, 0, None, self.split, self.n).logits, -1)
            self.inputs.append(ins)
            self.ref.append(ref)

    def damage_from(self, start: int, skip: int | None = None) -> dict[str, float]:
        """The KLs and split error with the model as it is now, replayed from layer `start`'s cached input
        (layer `skip` left out)."""
        m, out = self.model, {f"exit.{e}": 0.0 for e in self.exits if e > start}
        out.update(final=0.0, split_mse=0.0)
        num = den = 0.0
        for ins, ref in zip(self.inputs, self.ref):
            h = ins[start]
            for i in range(start, self.split):
                if i != skip:
                    h = m.run_layers(h, 0, None, i, i + 1).hidden
                if i + 1 in self.exits and i + 1 < self.split:
                    out[f"exit.{i + 1}"] += _kl(ref[f"exit.{i + 1}"], m.head_logits(i + 1, h))
            out[f"exit.{self.split}"] += _kl(ref[f"exit.{self.split}"], m.head_logits(self.split, h))
            out["final"] += _kl(ref["final"], m.run_layers(h, 0, None, self.split, self.n).logits)
            num += float(((h - ins[self.split]) ** 2).sum())
            den += float((ins[self.split] ** 2).sum())
        out = {k: v / self.tokens for k, v in out.items()}
        out["split_mse"] = num / den
        return out


def edge_linears(model) -> dict[str, torch.nn.Linear]:
    """GGUF name -> nn.Linear of every matrix in the edge layers [0, split)."""
    return {f"blk.{i}.{theirs}.weight": model.model.layers[str(i)].get_submodule(ours)
            for i in range(model.config.split_layer) for ours, theirs in LINEAR_NAMES.items()}


def _parent(model, name: str) -> tuple[torch.nn.Module, str]:
    """The module holding edge matrix `name` (blk.N.kind.weight) and its attribute name there."""
    _, i, kind, _ = name.split(".")
    sub = next(ours for ours, theirs in LINEAR_NAMES.items() if theirs == kind)
    owner, _, attr = sub.rpartition(".")
    return model.model.layers[i].get_submodule(owner), attr


@torch.no_grad()
def measure(model_dir: str | Path, text: list[str], tokens: int = 4096, chunk: int = 256, *,
            imatrix: str | Path | bool | None = None, candidates=CANDIDATES, batch: int = 8, threads: int = 1,
            drops: bool = True, rounders: dict | None = None, log=print) -> Sensitivity:
    """Measure every edge matrix at every stored type of `candidates` (see the module docstring); with `rounders`,
    at each of its types instead, by swapping in the module it makes."""
    import coexit
    from coexit.checkpoint import fingerprint
    from coexit.textdata import read_documents, spread_chunks
    from coexit.tokenizer import Tokenizer
    from edge.export.gguf import resolve_imatrix
    from edge.export.imatrix import Imatrix

    torch.set_num_threads(threads)
    model_dir = Path(model_dir)
    model = coexit.load(model_dir, dtype=torch.float32).eval()
    fp = model.fingerprint or fingerprint(model_dir)
    im_path = resolve_imatrix(model_dir, imatrix)
    im = Imatrix.load(im_path).values() if im_path else {}
    tok = Tokenizer.from_file(model_dir / "tokenizer.json")
    seqs = [c for c in spread_chunks(tok, read_documents([str(t) for t in text]), tokens, chunk) if len(c) == chunk]
    if not seqs:
        raise ValueError(f"no calibration sequences of {chunk} tokens in {text}")
    batches = [torch.tensor(seqs[i:i + batch]) for i in range(0, len(seqs), batch)]
    t0 = time.time()
    probe = _Probe(model, batches)
    linears = edge_linears(model)
    plan = [(name, t) for name, mod in linears.items()
            for t in (list(rounders) if rounders else stored_types(mod.weight.shape[1], candidates))]
    out: dict[str, dict] = {}
    for k, (name, t) in enumerate(plan):
        mod, layer = linears[name], int(name.split(".")[1])
        w0 = mod.weight.data
        parent, attr = _parent(model, name)
        try:
            if rounders:
                setattr(parent, attr, rounders[t](mod))
            else:
                mod.weight.data = torch.from_numpy(fake_quantize(w0.numpy(), t, im.get(name)))
            d = probe.damage_from(layer)
        finally:
            mod.weight.data = w0
            setattr(parent, attr, mod)
        entry = out.setdefault(name, {"shape": list(w0.shape), "damage": {}})
        entry["damage"][t] = {k2: round(v, 9) for k2, v in d.items()}
        if k == 0 or (k + 1) % 10 == 0 or k + 1 == len(plan):
            per = (time.time() - t0) / (k + 1)
            log(f"[{k + 1}/{len(plan)}] {name} {t}: damage {sum(v for c, v in d.items() if c != 'split_mse'):.5f}"
                f" ({per:.1f} s each, about {per * (len(plan) - k - 1) / 60:.1f} min left)")
    dropped = {}
    if drops:
        for i in range(model.config.split_layer):
            dropped[str(i)] = {k: round(v, 9) for k, v in probe.damage_from(i, skip=i).items()}
    meta = {"text": [str(t) for t in text], "tokens": probe.tokens, "chunk": chunk,
            "candidates": list(rounders or candidates), "imatrix": None if rounders or not im_path else im_path.name,
            "seconds": round(time.time() - t0, 1),
            "method": "one tensor at a time swapped for the backend's own quantized module, in the fp32 torch model"
            if rounders else "one tensor at a time rounded by ggml_quantize_chunk (llama.cpp's quantizer, with the "
                             "imatrix), dequantized by gguf-py, in the fp32 torch model"}
    return Sensitivity(fp, out, meta, dropped)
