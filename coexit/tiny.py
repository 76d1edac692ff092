"""Tiny random checkpoints for tests, benchmarks and the smoke demo: a real directory with config.json,
model.safetensors and a byte-level BPE tokenizer.json trained on a few built-in lines. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from coexit.config import Config
from coexit.model import EarlyExitLM
from coexit.tokenizer import Tokenizer

SPECIALS = ["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>"]  # ids 0, 1, 2

SAMPLE_TEXT = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    sys.exit(main())\n",
    "The quick brown fox jumps over the lazy dog.",
]


def train_bpe(texts: list[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
    """A byte-level BPE tokenizer (the GPT-2/Llama-3 kind) trained on texts, with SPECIALS at ids 0..2."""
    hf = _HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    return Tokenizer(hf, bos_id=1, eos_id=2)


def random_model(config: Config, seed: int = 0, std: float = 0.2) -> EarlyExitLM:
    """A randomly initialised model whose logits are far from uniform, so greedy tokens are well separated."""
    gen = torch.Generator().manual_seed(seed)
    model = EarlyExitLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model.eval()


def make_checkpoint(path: str | Path, flavour: str | Config = "tiny", seed: int = 0) -> Path:
    """Write a tiny random checkpoint directory and return its path."""
    from coexit.checkpoint import save

    config = Config.flavour(flavour) if isinstance(flavour, str) else flavour
    model = random_model(config, seed)
    tok = train_bpe(SAMPLE_TEXT * 4, config.vocab_size)
    return save(model, path, tokenizer=tok)
