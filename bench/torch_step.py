"""How far the torch edge backend's decode step is from a plain-PyTorch step of the same layers.

The plain step is a minimal hand-written reference over the checkpoint's edge layers [0, split), using the loaded
weights directly: embed one token, then per layer RMSNorm, q/k/v projections, RoPE from a precomputed table,
K/V slice-assigned into a preallocated cache, `scaled_dot_product_attention` with GQA, o_proj, RMSNorm, SwiGLU;
then ONE head (the split exit's norm + LM head) on the row. No early exit, no depth bookkeeping.

The backend side times `TorchBackend.step([tok], pos, decide)` (plus `take_split_rows()`, as the edge client
does every step) with a policy that checks the split exit only and never takes it: the same layers and the same
one head as the plain step, so `ratio` is the backend's own overhead. Also reported: a decide asked at every edge
exit, accepting none (`ratio_all_exits`: one more head per earlier exit, what a policy checking every exit
costs), and decide=None. Both decode the same tokens
(greedy on the split exit) in the same process with the same thread count; best of `repeats`. The plain step's
split-exit logits are checked against the backend's (allclose) before anything is timed.

    python bench/torch_step.py [models/coexit-code-small] [--threads 2 --prompt 32 --tokens 128 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor


class PlainStep:
    """The reference: layers [0, split) of `model` plus the split exit's head, one token at a time."""

    def __init__(self, model, max_len: int) -> None:
        cfg = model.config
        self.split, self.eps = cfg.split_layer, cfg.rms_norm_eps
        self.h, self.k, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        p = next(model.parameters())
        self.embed = model.model.embed_tokens.weight
        self.layers = []
        for i in range(self.split):
            b = model.model.layers[str(i)]
            a, m = b.self_attn, b.mlp
            self.layers.append(dict(
                ln1=b.input_layernorm.weight, ln2=b.post_attention_layernorm.weight,
                wq=a.q_proj.weight, bq=a.q_proj.bias, wk=a.k_proj.weight, bk=a.k_proj.bias,
                wv=a.v_proj.weight, bv=a.v_proj.bias, wo=a.o_proj.weight,
                wg=m.gate_proj.weight, wu=m.up_proj.weight, wd=m.down_proj.weight,
                kc=torch.zeros(1, self.k, max_len, self.d, dtype=p.dtype),
                vc=torch.zeros(1, self.k, max_len, self.d, dtype=p.dtype)))
        head = model.exits[str(self.split)]
        self.head_norm = head.norm.weight
        self.head_proj = (head.lm_head if hasattr(head, "lm_head") else model.lm_head).weight
        freqs = torch.arange(max_len).float()[:, None] * model.rotary.inv_freq.float()
        emb = torch.cat([freqs, freqs], -1)
        self.cos, self.sin = emb.cos().to(p.dtype), emb.sin().to(p.dtype)  # (max_len, D)

    def _norm(self, x: Tensor, w: Tensor) -> Tensor:
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    @staticmethod
    def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        a, b = x.chunk(2, -1)
        return x * cos + torch.cat([-b, a], -1) * sin

    @torch.no_grad()
    def step(self, token: int, pos: int) -> Tensor:
        """The split exit's logits (V,) after the token at `pos` (every earlier position already stepped)."""
        x = self.embed[token][None]  # (1, C)
        cos, sin = self.cos[pos], self.sin[pos]
        for w in self.layers:
            hn = self._norm(x, w["ln1"])
            q = self._rope(F.linear(hn, w["wq"], w["bq"]).view(self.h, 1, self.d), cos, sin)
            w["kc"][0, :, pos] = self._rope(F.linear(hn, w["wk"], w["bk"]).view(self.k, self.d), cos, sin)
            w["vc"][0, :, pos] = F.linear(hn, w["wv"], w["bv"]).view(self.k, self.d)
            y = F.scaled_dot_product_attention(q[None], w["kc"][:, :, : pos + 1], w["vc"][:, :, : pos + 1],
                                               enable_gqa=self.h != self.k)
            x = x + F.linear(y.reshape(1, self.h * self.d), w["wo"])
            hn = self._norm(x, w["ln2"])
            x = x + F.linear(F.silu(F.linear(hn, w["wg"])) * F.linear(hn, w["wu"]), w["wd"])
        return F.linear(self._norm(x[0], self.head_norm), self.head_proj)


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e3


def measure(model_dir: str, threads: int = 2, prompt: int = 32, tokens: int = 128, repeats: int = 5) -> dict:
    """Milliseconds per decode step: the torch backend (decide checking every edge exit, accepting none), the
    plain reference, their ratio, and the backend with decide=None."""
    from coexit.checkpoint import load, read_config
    from coexit.exits import ExitPolicy
    from edge.backends.torch_backend import TorchBackend

    torch.set_num_threads(threads)
    split = read_config(model_dir).split_layer
    max_len = prompt + tokens + 1
    model = load(model_dir, layers=(0, split), dtype=torch.float32)
    backend = TorchBackend(model, max_len=max_len)
    exits = backend.exit_layers
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()

    def never(exit_layer: int, logits: Tensor, hidden: Tensor) -> bool:
        return False

    # the like-for-like step: a policy that checks the split exit only (never taking it), so the backend applies
    # the one head the plain step applies; `never` above is asked at every edge exit (one head each)
    split_only = ExitPolicy({split: math.inf}).decide

    # the token sequence (greedy on the split exit), and the check that both sides compute the same thing
    backend.reset()
    backend.step(prompt_ids, 0, None)
    backend.take_split_rows()
    plain = PlainStep(model, max_len)
    for i, t in enumerate(prompt_ids[:-1]):
        plain.step(t, i)
    seq, tok = [], prompt_ids[-1]
    with torch.no_grad():
        for i in range(tokens):
            pos = prompt - 1 + i
            ref = plain.step(tok, pos)
            if i:  # the backend saw the prompt's last token in the prefill
                res = backend.step([tok], pos, never)
                backend.take_split_rows()
                got = res.exit_logits[split]
                if not torch.allclose(got, ref, atol=1e-4, rtol=1e-4):
                    raise AssertionError(f"position {pos}: plain and backend split-exit logits differ by "
                                         f"{(got - ref).abs().max().item():.3g}")
                if sorted(res.exit_logits) != exits:
                    raise AssertionError(f"the never-exit step evaluated exits {sorted(res.exit_logits)}, "
                                         f"expected {exits}")
            seq.append(tok)
            tok = int(ref.argmax())

    def run_backend(decide) -> int:
        backend.reset()
        backend.step(prompt_ids[:-1], 0, None)
        backend.take_split_rows()
        for i, t in enumerate(seq):
            backend.step([t], prompt - 1 + i, decide)
            backend.take_split_rows()
        return len(seq)

    def run_plain() -> int:
        for i, t in enumerate(seq):
            plain.step(t, prompt - 1 + i)  # overwrites the same cache slots: same work every repeat
        return len(seq)

    with torch.no_grad():
        run_plain(), run_backend(never), run_backend(split_only)  # warm-up
        plain_ms, backend_ms, all_ms, none_ms = (float("inf"),) * 4
        for _ in range(repeats):  # interleaved, so a noisy moment hits both sides alike
            plain_ms = min(plain_ms, _best(run_plain, 1))
            backend_ms = min(backend_ms, _best(lambda: run_backend(split_only), 1))
            all_ms = min(all_ms, _best(lambda: run_backend(never), 1))
            none_ms = min(none_ms, _best(lambda: run_backend(None), 1))
    return {"backend_ms": backend_ms, "plain_ms": plain_ms, "ratio": backend_ms / plain_ms,
            "backend_all_exits_ms": all_ms, "ratio_all_exits": all_ms / plain_ms,
            "backend_decide_none_ms": none_ms, "exits_checked": exits, "threads": threads,
            "layers": split, "hidden": model.config.hidden_size, "vocab": vocab}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="models/coexit-code-small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    out = measure(args.model, args.threads, args.prompt, args.tokens, args.repeats)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
