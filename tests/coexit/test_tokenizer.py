"""Tokenizer wrapper over a real tokenizer.json: round trip, special tokens, streaming pieces."""

from __future__ import annotations

import coexit
from coexit.tiny import train_bpe


def test_round_trip_and_specials(tiny_dir):
    tok = coexit.load(tiny_dir).tokenizer
    text = "def add(a, b):\n    return a + b  # ünïcode ✓\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=True) == [tok.bos_id, *ids]
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.special_tokens == {"<|pad|>": 0, "<|begin_of_text|>": 1, "<|end_of_text|>": 2}
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text


def test_stream_pieces_rebuild_text():
    tok = train_bpe(["héllo wörld ✓✓ def f(): pass"] * 3, 300)
    text = "wörld ✓ pass"
    ids = tok.encode(text)
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text
    assert "" in pieces or len(pieces) == len(text)  # multi-byte characters split across tokens wait for the rest


def test_stream_pieces_rebuild_long_text(tiny_dir):
    tok = coexit.load(tiny_dir).tokenizer
    text = "".join(f"def f{i}(x):\n    return x * {i}  # ünïcode ✓ {i}\n" for i in range(60))
    ids = tok.encode(text)
    stream = tok.stream()
    assert "".join(stream.push(i) for i in ids) == tok.decode(ids) == text
