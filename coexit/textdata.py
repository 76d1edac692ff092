"""Reading text documents for tokenizer training, data preparation, calibration and evaluation: plain files,
directories (recursively, sorted) and JSONL files (one document per line, in a text field)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from coexit.errors import UsageError


def _read_jsonl(path: Path, key: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{n} is not valid JSON ({exc}): a .jsonl file holds one JSON object per "
                                 f"line; pass plain text under another suffix") from None
            text = rec.get(key) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise UsageError(f"{path}:{n} has no string field {key!r}: each line of a .jsonl file must be an "
                                 f"object with the document's text in {key!r} (commands with --text-key read "
                                 f"another field)")
            yield text


def read_documents(inputs: list[str | Path], text_key: str = "text") -> list[str]:
    """Documents from files, directories (recursively, sorted) and JSONL files (one document per line)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            files.append(p)
        else:
            hint = (": build it with `coexit build-corpus` (it writes data/corpus/train.jsonl and heldout.jsonl)"
                    if p.suffix == ".jsonl" and p.parent.name == "corpus" else "")
            raise UsageError(f"input {p} does not exist{hint}")
    docs: list[str] = []
    for f in tqdm(files, desc="read", unit="file", disable=len(files) < 2):
        if f.suffix in (".jsonl", ".ndjson"):
            docs += list(_read_jsonl(f, text_key))
        else:
            docs.append(f.read_text(encoding="utf-8", errors="replace"))
    docs = [d for d in docs if d]
    if not docs:
        raise UsageError(f"the inputs {', '.join(map(str, inputs))} hold no text")
    return docs


def spread_chunks(tokenizer, docs: list[str], tokens: int, chunk: int, per_doc: int | None = None,
                  min_len: int = 16) -> list[list[int]]:
    """About `tokens` tokens as sequences of up to `chunk` tokens (each at least `min_len`), spread over all
    documents: every k-th one first, at most `per_doc` chunks from each (default ceil(needed / documents)), so that
    no single file dominates. The imatrix's calibration text and the quantization benches' evaluation text."""
    want = max(1, -(-tokens // chunk))
    stride = max(1, len(docs) // want)
    per_doc = per_doc or max(1, -(-want // len(docs)))
    out: list[list[int]] = []
    for start in range(stride):
        for doc in docs[start::stride]:
            ids = tokenizer.encode(doc)
            out += [ids[i: i + chunk] for i in range(0, len(ids), chunk) if len(ids) - i >= min_len][:per_doc]
            if sum(map(len, out)) >= tokens:
                return out
    return out
