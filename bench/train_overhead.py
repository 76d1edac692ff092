"""Benchmark: training step time with exit losses vs the same run without them (DeepSpeed, CPU, PP=2), and tokens/s.

Both runs use the same backbone shape; "with exits" adds exit heads (own norm, shared LM head) whose losses travel
through the pipeline. Runs alternate (off, on, off, on, ...) and report medians over the steps after warm-up, since
this machine's cores may be shared. Prints a table. CPU only here: no GPU was available when this was written.

    python bench/train_overhead.py [--hidden 512 --layers 8 --vocab 1024 --exits 2,6 --seq 128 --steps 8]

The default shape keeps an exit head's share of the model's compute near Llama-2-7B's (~2% per exit: a
4096 x 32000 head against 32 layers); a larger --vocab makes the heads, and so the overhead, proportionally bigger.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coexit.config import Config, EarlyExitConfig  # noqa: E402
from training.launch import launch  # noqa: E402


def write_data(out: Path, vocab: int, tokens: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", tokens), ("val", tokens // 10)):
        rng.integers(0, vocab, n, dtype=np.uint16).tofile(out / f"{split}-00000.bin")
    meta = {"dtype": "uint16", "vocab_size": vocab, "eos_id": 2, "seed": 0,
            "shards": {"train": [{"file": "train-00000.bin", "tokens": tokens}],
                       "val": [{"file": "val-00000.bin", "tokens": tokens // 10}]}}
    (out / "meta.json").write_text(json.dumps(meta))


def stage_compute_ms(cfg: Config, exits: list[int], a, reps: int = 3) -> list[float]:
    """Forward + backward time of each pipeline stage alone (one thread, this process): the pipeline's step time
    follows its slowest stage, so this gives the overhead free of scheduling noise from other processes."""
    import time

    import torch

    from training.stages import PipeStage, StagePlan

    torch.set_num_threads(1)
    cfg = cfg.replace(early_exit=EarlyExitConfig(tuple(exits), exits[len(exits) // 2] if exits else 0,
                                                 cfg.early_exit.share_lm_head, ()))
    n = cfg.num_hidden_layers
    ranges = [(0, n // 2), (n // 2, n)]
    plan = StagePlan(cfg, ranges, "pretrain", None, 0, exit_index={e: i for i, e in enumerate(exits)})
    ids = torch.randint(0, cfg.vocab_size, (a.micro_batch, a.seq))
    out = []
    for s in range(2):
        stage = PipeStage(plan, s)
        h = torch.randn(a.micro_batch, a.seq, cfg.hidden_size, requires_grad=True)
        loss = torch.zeros(max(1, len(exits)), requires_grad=True)

        def step(stage=stage, s=s, h=h, loss=loss):
            outs = stage((ids, ids) if s == 0 else (h, loss, ids))
            if s == 1:
                logits, losses = outs
                torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).add(losses.sum()).backward()
            else:
                torch.autograd.backward(outs[:2], (torch.ones_like(outs[0]), torch.ones_like(outs[1])))

        step()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        out.append(1000 * min(times))
    return out


def run(root: Path, name: str, cfg_path: Path, exits: list[int], a, data: Path) -> list[float]:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").unlink(missing_ok=True)
    (d / "job.toml").write_text(f"""
[model]
config = "{cfg_path}"
exit_layers = {exits}
[data]
path = "{data}"
seq_len = {a.seq}
[train]
mode = "pretrain"
steps = {a.steps}
micro_batch_size = {a.micro_batch}
grad_accum = {a.grad_accum}
grad_clip = 1.0
log_every = 1
log_file = "metrics.jsonl"
progress = false
[parallel]
pp = {a.pp}
zero_stage = {a.zero}
""")
    launch(a.pp, d / "job.toml", timeout=1800)
    recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    return [r["step_s"] for r in recs[a.warmup:]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--exits", default="2,6", help="exit layers (comma separated)")
    ap.add_argument("--own-heads", action="store_true", help="exit heads get LM heads of their own")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--pp", type=int, default=2, help="pipeline stages (one process each)")
    ap.add_argument("--zero", type=int, default=1, help="ZeRO stage (0 or 1)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    exits = [int(e) for e in a.exits.split(",") if e]
    cfg = Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                 num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                 max_position_embeddings=max(256, a.seq),
                 early_exit=EarlyExitConfig(tuple(exits), exits[len(exits) // 2], not a.own_heads, ()))
    layer_flops = 4 * a.hidden**2 + 3 * a.hidden * a.intermediate + 2 * a.seq * a.hidden  # per token, fwd MACs
    head_flops = a.hidden * a.vocab
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg.to_json(root / "config.json")
        write_data(root / "data", a.vocab, a.seq * a.micro_batch * a.grad_accum * (a.steps + 1) * 2)
        times: dict[str, list[float]] = {"without exits": [], "with exits": []}
        for _ in range(a.repeats):
            times["without exits"] += run(root, "off", root / "config.json", [], a, root / "data")
            times["with exits"] += run(root, "on", root / "config.json", exits, a, root / "data")
    tokens = a.seq * a.micro_batch * a.grad_accum
    base = statistics.median(times["without exits"])
    off_ms, on_ms = stage_compute_ms(cfg, [], a), stage_compute_ms(cfg, exits, a)
    model_cost = a.layers * layer_flops + head_flops
    heads = "own" if a.own_heads else "shared"
    print(f"\nDeepSpeed PP=2 on CPU (gloo, fp32; no GPU in this environment): hidden {a.hidden}, {a.layers} layers, "
          f"vocab {a.vocab}, seq {a.seq}, {tokens} tokens/step, exits {exits} ({heads} LM head)")
    print(f"exit heads add {100 * len(exits) * head_flops / model_cost:.1f}% of the model's forward MACs per token")
    print(f"{'run':<16}{'step s (median)':>16}{'p90':>10}{'tokens/s':>12}{'ratio':>8}")
    for name, ts in times.items():
        med = statistics.median(ts)
        p90 = sorted(ts)[int(0.9 * (len(ts) - 1))]
        print(f"{name:<16}{med:>16.3f}{p90:>10.3f}{tokens / med:>12.0f}{med / base:>8.3f}")
    print(f"\nper-stage forward+backward of one micro-batch, measured alone (ms): without exits "
          f"{off_ms[0]:.1f} | {off_ms[1]:.1f}, with exits {on_ms[0]:.1f} | {on_ms[1]:.1f}; "
          f"slowest-stage ratio {max(on_ms) / max(off_ms):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
