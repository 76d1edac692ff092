"""The vocabulary block of an edge GGUF: llama.cpp refuses a model file without one, although coexit never lets
llama.cpp tokenize (token ids come from the checkpoint's own tokenizer).

A byte-level BPE tokenizer.json (GPT-2 / Llama-3 kind) is written as llama.cpp's "gpt2" tokenizer with its real
tokens and merges, so stock llama.cpp tools can tokenize with the file too. Any other tokenizer (or none) gets
placeholder tokens: the file still loads and runs token ids, and coexit reads the original tokenizer.json, which
the exporter also stores verbatim in the `coexit.tokenizer_json` metadata string.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

NORMAL, CONTROL, UNUSED = gguf.TokenType.NORMAL, gguf.TokenType.CONTROL, gguf.TokenType.UNUSED


def _byte_level_bpe(tok: dict) -> bool:
    model, pre = tok.get("model") or {}, tok.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return model.get("type") == "BPE" and any(p.get("type") == "ByteLevel" for p in pres)


def add_vocab(writer: gguf.GGUFWriter, tokenizer_json: Path | None, vocab_size: int,
              bos_id: int | None, eos_id: int | None) -> str:
    """Write tokenizer.ggml.* keys for exactly `vocab_size` tokens; returns which kind was written."""
    tok = json.loads(tokenizer_json.read_text()) if tokenizer_json and tokenizer_json.is_file() else None
    tokens = [f"<|coexit_unused_{i}|>" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    merges: list[str] = []
    kind = "placeholder"
    if tok is not None and _byte_level_bpe(tok):
        kind = "gpt2"
        for text, i in tok["model"]["vocab"].items():
            if i < vocab_size:
                tokens[i], types[i] = text, NORMAL
        for added in tok.get("added_tokens", []):
            if added["id"] < vocab_size:
                tokens[added["id"]] = added["content"]
                types[added["id"]] = CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    if bos_id is not None:
        writer.add_bos_token_id(bos_id)
    if eos_id is not None:
        writer.add_eos_token_id(eos_id)
    writer.add_add_bos_token(False)
    return kind
