"""Training data: `coexit prepare-data` (read text, train a byte-level BPE tokenizer, write packed token shards
with a held-out split) and `TokenShards`, the memmap reader the trainer samples fixed-length windows from.

Output directory: tokenizer.json, meta.json, train-00000.bin ..., val-00000.bin ... Each .bin is a flat numpy
array (uint16 when the vocabulary fits, else uint32) of documents joined by the EOS token. Everything is
deterministic given --seed: the document order, the held-out documents and the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from coexit.textdata import read_documents as _read_documents
from coexit.tiny import train_bpe
from coexit.tokenizer import Tokenizer

META = "meta.json"


def read_documents(inputs: list[str | Path], text_key: str = "text") -> list[str]:
    """coexit.textdata.read_documents, with its errors as prepare-data's exit messages."""
    try:
        return _read_documents(inputs, text_key)
    except ValueError as exc:
        raise SystemExit(f"prepare-data: {exc}") from None


def _write_shards(out: Path, split: str, ids: Iterator[list[int]], dtype, shard_tokens: int, total: int) -> list:
    shards: list[dict] = []
    buf: list[int] = []

    def flush(tokens: list[int]) -> None:
        if tokens:
            name = f"{split}-{len(shards):05d}.bin"
            arr = np.asarray(tokens, dtype=dtype)
            mm = np.memmap(out / name, dtype=dtype, mode="w+", shape=arr.shape)
            mm[:] = arr
            mm.flush()
            shards.append({"file": name, "tokens": int(arr.size)})

    with tqdm(total=total, desc=f"write {split}", unit="doc") as bar:
        for doc in ids:
            buf += doc
            while len(buf) >= shard_tokens:
                flush(buf[:shard_tokens])
                buf = buf[shard_tokens:]
            bar.update(1)
    flush(buf)
    return shards


def prepare(inputs: list[str | Path], out: str | Path, vocab_size: int = 32000, val_fraction: float = 0.01,
            seed: int = 0, shard_tokens: int = 50_000_000, text_key: str = "text",
            tokenizer: str | Path | None = None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    docs = read_documents(inputs, text_key)
    random.Random(seed).shuffle(docs)
    if tokenizer:
        tok = Tokenizer.from_file(tokenizer)
    else:
        print(f"prepare-data: training a byte-level BPE tokenizer (vocab {vocab_size}) on {len(docs)} documents",
              file=sys.stderr)
        tok = train_bpe(docs, vocab_size, show_progress=True)
    tok.save(out / "tokenizer.json")
    eos = tok.eos_id if tok.eos_id is not None else 0
    n_val = int(round(len(docs) * val_fraction)) if len(docs) > 1 else 0
    if val_fraction > 0 and len(docs) > 1:
        n_val = min(max(1, n_val), len(docs) - 1)
    val_docs, train_docs = docs[:n_val], docs[n_val:]
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32

    def encoded(texts: list[str]) -> Iterator[list[int]]:
        for i in range(0, len(texts), 256):
            for enc in tok.hf.encode_batch(texts[i:i + 256], add_special_tokens=False):
                yield [*enc.ids, eos]

    train = _write_shards(out, "train", encoded(train_docs), dtype, shard_tokens, len(train_docs))
    if n_val == 0 and val_fraction > 0:  # a single document: hold out its tail
        whole = np.concatenate([np.memmap(out / s["file"], dtype=dtype, mode="r") for s in train])
        cut = max(1, int(len(whole) * (1 - val_fraction)))
        for s in train:
            (out / s["file"]).unlink()
        train = _write_shards(out, "train", iter([whole[:cut].tolist()]), dtype, shard_tokens, 1)
        val = _write_shards(out, "val", iter([whole[cut:].tolist()]), dtype, shard_tokens, 1)
    else:
        val = _write_shards(out, "val", encoded(val_docs), dtype, shard_tokens, len(val_docs))
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size, "eos_id": eos, "seed": seed,
            "documents": {"train": len(train_docs), "val": len(val_docs)},
            "tokens": {"train": sum(s["tokens"] for s in train), "val": sum(s["tokens"] for s in val)},
            "shards": {"train": train, "val": val}}
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


class TokenShards:
    """Fixed-length windows (seq_len + 1 tokens, stride seq_len) over one split's shards, never crossing a shard.

    `window(k)` is the k-th window of a seeded permutation that is redrawn each epoch, so the sample for a given
    (step, micro-batch, data-parallel rank) is the same on every run and after a resume.
    """

    def __init__(self, path: str | Path, split: str, seq_len: int, seed: int = 0) -> None:
        path = Path(path)
        meta_path = path / META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} is missing: write the data directory with `coexit prepare-data`")
        self.meta = json.loads(meta_path.read_text())
        dtype = np.dtype(self.meta["dtype"])
        self.seq_len, self.seed = seq_len, seed
        self.arrays = [np.memmap(path / s["file"], dtype=dtype, mode="r") for s in self.meta["shards"][split]]
        counts = [max(0, (len(a) - 1) // seq_len) for a in self.arrays]
        self.offsets = np.cumsum([0, *counts])
        if self.offsets[-1] == 0:
            raise ValueError(f"the {split} split of {path} holds fewer than {seq_len + 1} tokens per shard; use a "
                             f"smaller seq_len or more data")
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def window(self, k: int) -> np.ndarray:
        epoch, i = divmod(int(k), len(self))
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self)))
        j = int(self._perm[1][i])
        shard = int(np.searchsorted(self.offsets, j, side="right") - 1)
        start = (j - int(self.offsets[shard])) * self.seq_len
        return np.asarray(self.arrays[shard][start:start + self.seq_len + 1], dtype=np.int64)

    def batch(self, first: int, size: int):
        """Token ids (size, seq_len) and next-token labels for windows first .. first + size - 1."""
        import torch

        w = torch.from_numpy(np.stack([self.window(first + j) for j in range(size)]))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def sample_index(step: int, micro: int, dp_rank: int, grad_accum: int, dp: int, micro_batch: int) -> int:
    """First window of a micro-batch: steps, then micro-batches, then data-parallel ranks, then rows."""
    return ((step * grad_accum + micro) * dp + dp_rank) * micro_batch


def main(argv: list[str]) -> int:
    from coexit.cli import HelpFormatter

    ap = argparse.ArgumentParser(prog="coexit prepare-data", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("inputs", nargs="+", help="text files, directories (read recursively) or .jsonl files")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--vocab-size", type=int, default=32000, help="BPE vocabulary to train")
    ap.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out")
    ap.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    ap.add_argument("--shard-tokens", type=int, default=50_000_000, help="tokens per shard file")
    ap.add_argument("--text-key", default="text", help="JSONL field holding the text")
    ap.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
    a = ap.parse_args(argv)
    if not 0 <= a.val_fraction < 1:
        ap.error("--val-fraction must be in [0, 1)")
    meta = prepare(a.inputs, a.out, a.vocab_size, a.val_fraction, a.seed, a.shard_tokens, a.text_key, a.tokenizer)
    print(f"prepare-data: {meta['tokens']['train']} train / {meta['tokens']['val']} held-out tokens "
          f"({meta['dtype']}, vocab {meta['vocab_size']}) in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
