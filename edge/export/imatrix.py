"""`coexit imatrix`: an importance matrix for llama.cpp's quantizer, collected with coexit's own torch model.

What llama-imatrix computes, for each matrix that a quantized edge multiplies activations with: per input column
j, the mean over calibration tokens of x_j^2 (x = the matrix's input row). The quantizer then weighs each
weight's rounding error by it (it minimises sum_j imatrix_j * (w_j - q(w_j))^2 per block instead of the plain
squared error), so columns that see large activations are rounded more carefully.

Collected here with forward pre-hooks on the nn.Linear modules of the edge layers [0, split) (names mapped to the
GGUF's, as edge/export/gguf.py `stage_tensors` does: q_proj -> blk.N.attn_q.weight, ...) and a forward hook on
the split exit's norm, whose output is the input of the GGUF's `output` head. Q/K permutation for llama.cpp
reorders rows (outputs) only, so per-column statistics need none. The token embedding is a row lookup, not a
matmul, and gets no entry (llama.cpp does not use one for it either).

File: GGUF in llama-imatrix's own layout (general.type "imatrix"; tensors `<name>.in_sum2` = sum of x^2 over
tokens and `<name>.counts` = number of tokens; `imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`),
so `llama-quantize --imatrix` reads it too; plus `coexit.fingerprint` of the checkpoint it was computed for.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np
import torch

from coexit.model import EarlyExitLM

LINEAR_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}


class Imatrix:
    """Per-tensor sums of squared inputs and token counts; `values()` gives the means llama.cpp takes."""

    def __init__(self, sums: dict[str, np.ndarray] | None = None, counts: dict[str, float] | None = None,
                 datasets: list[str] | None = None, chunk_count: int = 0, chunk_size: int = 0,
                 fingerprint: str = "") -> None:
        self.sums = sums or {}
        self.counts = counts or {}
        self.datasets, self.chunk_count, self.chunk_size = datasets or [], chunk_count, chunk_size
        self.fingerprint = fingerprint

    def add(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        s = (x * x).sum(0).numpy()
        self.sums[name] = self.sums[name] + s if name in self.sums else s
        self.counts[name] = self.counts.get(name, 0.0) + x.shape[0]

    def values(self) -> dict[str, np.ndarray]:
        """Tensor name -> mean of x^2 per input column (float32), as llama-quantize derives from the file."""
        return {n: (s / max(self.counts.get(n, 1.0), 1.0)).astype(np.float32) for n, s in self.sums.items()}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        w = gguf.GGUFWriter(str(path), "imatrix")
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", self.datasets or ["unknown"])
        w.add_uint32("imatrix.chunk_count", int(self.chunk_count))
        w.add_uint32("imatrix.chunk_size", int(self.chunk_size))
        if self.fingerprint:
            w.add_string("coexit.fingerprint", self.fingerprint)
        for name in sorted(self.sums):
            w.add_tensor(name + ".in_sum2", self.sums[name].astype(np.float32)[None, :])
            w.add_tensor(name + ".counts", np.array([[self.counts[name]]], np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    @classmethod
    def load(cls, path: str | Path) -> Imatrix:
        r = gguf.GGUFReader(str(path))
        if _field(r, "general.type") != "imatrix":
            raise ValueError(f"{path} is not an imatrix GGUF (general.type is {_field(r, 'general.type')!r})")
        sums, counts = {}, {}
        for t in r.tensors:
            a = np.array(t.data, dtype=np.float64).reshape(-1)
            if t.name.endswith(".in_sum2"):
                sums[t.name.removesuffix(".in_sum2")] = a
            elif t.name.endswith(".counts"):
                counts[t.name.removesuffix(".counts")] = float(a[0])
        missing = sorted(set(sums) ^ set(counts))
        if missing:
            raise ValueError(f"{path}: entries without both .in_sum2 and .counts: {missing}")
        f = r.get_field("imatrix.datasets")
        datasets = [str(bytes(f.parts[i]), "utf-8") for i in f.data] if f is not None else []
        return cls(sums, counts, datasets, int(_field(r, "imatrix.chunk_count") or 0),
                   int(_field(r, "imatrix.chunk_size") or 0), _field(r, "coexit.fingerprint") or "")


def _field(r: gguf.GGUFReader, key: str):
    f = r.get_field(key)
    if f is None:
        return None
    if f.types and f.types[0] == gguf.GGUFValueType.STRING:
        return str(bytes(f.parts[f.data[0]]), "utf-8")
    return f.parts[f.data[0]][0]


def edge_modules(model: EarlyExitLM) -> dict[str, torch.nn.Module]:
    """GGUF tensor name -> the module whose *input* (Linear) or *output* (the split exit's norm) it multiplies."""
    split = model.config.split_layer
    mods: dict[str, torch.nn.Module] = {}
    for i in range(split):
        blk = model.model.layers[str(i)]
        for ours, theirs in LINEAR_NAMES.items():
            mods[f"blk.{i}.{theirs}.weight"] = blk.get_submodule(ours)
    mods["output.weight"] = model.exits[str(split)].norm
    return mods


@torch.no_grad()
def collect(model: EarlyExitLM, chunks: list[list[int]]) -> Imatrix:
    """Run the edge stage over each token chunk (one sequence each) and accumulate the squared inputs."""
    split = model.config.split_layer
    im = Imatrix(fingerprint=model.fingerprint)
    hooks = []
    for name, mod in edge_modules(model).items():
        if name == "output.weight":
            hooks.append(mod.register_forward_hook(lambda _m, _a, out, n=name: im.add(n, out)))
        else:
            hooks.append(mod.register_forward_pre_hook(lambda _m, args, n=name: im.add(n, args[0])))
    try:
        stage = model.stage(0, split)
        for ids in chunks:
            stage(torch.tensor([ids], dtype=torch.long), exits=[split])
    finally:
        for h in hooks:
            h.remove()
    im.chunk_count, im.chunk_size = len(chunks), max((len(c) for c in chunks), default=0)
    return im


def compute(model_dir: str | Path, text: list[str], tokens: int = 16384, chunk: int = 512,
            threads: int = 2) -> Imatrix:
    from coexit.checkpoint import fingerprint, load, read_config
    from coexit.textdata import read_documents, spread_chunks
    from coexit.tokenizer import Tokenizer

    torch.set_num_threads(threads)
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    chunk = min(chunk, cfg.max_position_embeddings)
    model = load(model_dir, layers=(0, cfg.split_layer), dtype=torch.float32)
    model.fingerprint = model.fingerprint or fingerprint(model_dir)
    tok = Tokenizer.from_file(model_dir / "tokenizer.json")
    chunks = spread_chunks(tok, read_documents(text), tokens, chunk)
    if not chunks:
        raise ValueError(f"no calibration text in {text}")
    im = collect(model, chunks)
    im.datasets = [str(t) for t in text]
    return im


def main(argv: list[str] | None = None) -> int:
    from coexit.cli import HelpFormatter

    ap = argparse.ArgumentParser(prog="coexit imatrix", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--text", required=True, nargs="+",
                    help="calibration text: files, directories or .jsonl (keep it disjoint from evaluation text)")
    ap.add_argument("--tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    ap.add_argument("--chunk", type=int, default=512, help="tokens per sequence (default 512)")
    ap.add_argument("--out", help="output file (default: MODEL/imatrix.gguf, which export-edge then uses)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    args = ap.parse_args(argv)
    try:
        im = compute(args.model, args.text, args.tokens, args.chunk, args.threads)
        out = im.save(args.out or Path(args.model) / "imatrix.gguf")
    except Exception as exc:  # a CLI prints a message a person can act on, not a traceback
        print(f"coexit imatrix: {exc}", file=sys.stderr)
        return 1
    n = int(next(iter(im.counts.values())))
    print(f"wrote {out}: {len(im.sums)} tensors, {n} tokens in {im.chunk_count} chunks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
