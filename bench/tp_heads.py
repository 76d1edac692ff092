"""Tensor-parallel serving: replicated heads or vocabulary-parallel heads, which is cheaper per tick?

Under `coexit serve --tp N` every rank holds the whole LM head (and the exits' norms) and computes the logits of the
tick's head rows itself (replicated). The alternative splits the vocabulary: each rank computes V/N columns, and the
ranks all-gather them (the full logits are needed for sampling with top-k/top-p, log-probabilities and cloud-exit
confidences). This times both on the same ranks: B head rows of width C, final norm included, median of `--repeats`
after warm-up, for B in `--batches`; and the head weight each rank holds (memory: V x C per head).

    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/tp_heads.py [--hidden 384 --vocab 8192]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist


def median_ms(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=384, help="the default model's d")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    c, v = args.hidden, args.vocab
    norm = torch.nn.RMSNorm(c)
    head = torch.randn(v, c) / c**0.5
    part = head[rank * v // world:(rank + 1) * v // world].clone()
    if rank == 0:
        print(f"# tp_heads: {world} ranks on gloo, {args.threads} thread(s) each, d {c}, vocab {v}; median of "
              f"{args.repeats}; head weight per rank: replicated {head.numel() * 4 / 2**20:.1f} MiB, vocab-parallel "
              f"{part.numel() * 4 / 2**20:.1f} MiB")
        print("| head rows | replicated | vocab-parallel (matmul + all_gather) | of which all_gather |")
        print("|---|---|---|---|")
    for b in (int(x) for x in args.batches.split(",")):
        h = torch.randn(b, c)
        pieces = [torch.empty(b, v // world) for _ in range(world)]

        def replicated(h=h):
            return norm(h) @ head.T

        def local(h=h):
            return norm(h) @ part.T

        def vocab_parallel(pieces=pieces, local=local):
            dist.all_gather(pieces, local())
            return torch.cat(pieces, dim=1)

        full_ref = replicated()
        torch.testing.assert_close(vocab_parallel(), full_ref, atol=1e-5, rtol=1e-5)  # the same logits
        rep, vp, mm = median_ms(replicated, args.repeats), median_ms(vocab_parallel, args.repeats), \
            median_ms(local, args.repeats)
        if rank == 0:
            print(f"| {b} | {rep:.3f} ms | {vp:.3f} ms | {max(vp - mm, 0.0):.3f} ms |", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
