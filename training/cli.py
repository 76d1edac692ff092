"""`coexit train`: read and validate a job file, then run the DeepSpeed trainer in this rank.

Launch one process per rank with either launcher (both set RANK / WORLD_SIZE / LOCAL_RANK):
    deepspeed --num_gpus 4 --module training.cli --config job.toml
    torchrun --nproc_per_node 4 -m training.cli --config job.toml    (or: torchrun ... $(which coexit) train ...)
`coexit train --check --world-size N --config job.toml` validates the job for N ranks without launching.
Validation (unknown keys, pp x tp x dp vs world size, exit layers, ...) runs before DeepSpeed is imported.
"""

from __future__ import annotations

import argparse
import os
import sys

from training.job import JobError, load_job, stage_ranges, validate


def main(argv: list[str]) -> int:
    from coexit.cli import HelpFormatter

    ap = argparse.ArgumentParser(prog="coexit train", description="early-exit training with DeepSpeed",
                                 formatter_class=HelpFormatter)
    ap.add_argument("--config", required=True, help="job.toml")
    ap.add_argument("--check", action="store_true", help="validate the job and print the plan; launch nothing")
    ap.add_argument("--world-size", type=int, help="ranks to validate against (default: $WORLD_SIZE or 1)")
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    a = ap.parse_args(argv)
    world = a.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    try:
        job = validate(load_job(a.config), world)
    except JobError as exc:
        print(f"coexit train: error: {exc}", file=sys.stderr)
        return 2
    if a.check:
        p = job.parallel
        print(f"coexit train: {a.config} is valid for {world} ranks: mode {job.train.mode}, pp {p.pp} x tp {p.tp} "
              f"x dp {p.dp}, stages {stage_ranges(job)}, exits {list(job.config.exit_layers)}")
        return 0
    if a.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(a.local_rank))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/coexit/torch_extensions"))
    from training.trainer import run

    return run(job)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
