"""`coexit smoke`: build a tiny random checkpoint, load it back, and decode greedily with the KV cache,
showing which exit heads already agree with the final head at each step."""

from __future__ import annotations

import argparse
import tempfile

import torch

from coexit.checkpoint import load
from coexit.tiny import make_checkpoint


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="coexit smoke", description=__doc__)
    ap.add_argument("--prompt", default="def add(a, b):")
    ap.add_argument("--tokens", type=int, default=12)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        make_checkpoint(d, "tiny", seed=0)
        model = load(d)
    tok, cfg = model.tokenizer, model.config
    print(f"tiny random model: {cfg.num_hidden_layers} layers, exits {list(cfg.exit_layers)}, "
          f"split {cfg.split_layer}, {sum(p.numel() for p in model.parameters())} parameters")
    ids = tok.encode(args.prompt, add_bos=True)
    cache = model.new_cache()
    agree = {e: 0 for e in cfg.exit_layers}
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(args.tokens):
            out = model(x, cache=cache, exits="all", head_rows="last")
            token = int(out.logits[0, -1].argmax())
            exits = {e: int(lg[0, -1].argmax()) for e, lg in out.exit_logits.items()}
            for e, t in exits.items():
                agree[e] += t == token
            marks = " ".join(f"exit{e}:{'=' if t == token else 'x'}" for e, t in exits.items())
            print(f"  pos {len(ids):3d} token {token:4d} {tok.decode([token])!r:12} {marks}")
            ids.append(token)
            x = torch.tensor([[token]])
    print("generated:", repr(tok.decode(ids)))
    print("exit agreement with the final head:",
          ", ".join(f"layer {e}: {agree[e]}/{args.tokens}" for e in cfg.exit_layers))
    return 0
