"""A thin wrapper over an HF `tokenizers` tokenizer.json: encode, decode, streaming decode, special tokens."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from coexit.errors import CheckpointError

_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<|bos|>", "<bos>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<|eos|>", "<eos>", "<|im_end|>")


class Tokenizer:
    def __init__(self, hf: _HFTokenizer, bos_id: int | None = None, eos_id: int | None = None) -> None:
        self.hf = hf
        self.bos_id = bos_id if bos_id is not None else self._find(_BOS_NAMES)
        self.eos_id = eos_id if eos_id is not None else self._find(_EOS_NAMES)

    @classmethod
    def from_file(cls, path: str | Path, bos_id: int | None = None, eos_id: int | None = None) -> Tokenizer:
        try:
            hf = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise CheckpointError(f"{path} is not a readable tokenizer.json: {exc}") from None
        return cls(hf, bos_id, eos_id)

    def _find(self, names: tuple[str, ...]) -> int | None:
        for name in names:
            tid = self.hf.token_to_id(name)
            if tid is not None:
                return tid
        return None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def stream(self) -> StreamDecoder:
        """A decoder that turns tokens, pushed one at a time, into text pieces (whole characters only)."""
        return StreamDecoder(self)

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))


class StreamDecoder:
    """Incremental detokenizing in constant time per token: only a window of the newest ids is decoded (the text
    of ids[prefix:read] is already out; ids[prefix:] decoded, minus it, is the new piece). Decoding both from the
    same offset cancels any context a decoder applies at the start of a sequence."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.ids = tokenizer, []
        self.prefix = self.read = 0  # ids[prefix:read]: the window whose text is already emitted

    def push(self, token: int) -> str:
        """The text this token adds; "" while it ends inside a multi-byte character."""
        self.ids.append(token)
        decode = self.tokenizer.decode
        done = decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        full = decode(self.ids[self.prefix:])
        if full.endswith("\ufffd") or len(full) <= len(done):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return full[len(done):]
