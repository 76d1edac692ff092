"""The DeepSpeed training run: process groups, pipeline module, engine, loop, logging, checkpoints, export.

Runs inside every rank started by `deepspeed --num_gpus N` or `torchrun --nproc_per_node N`: gloo on CPU (fp32),
nccl on GPU (bf16 under precision "auto"). The job has already been validated (training.job.validate).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.pipe import LayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from tqdm import tqdm

from coexit.tokenizer import Tokenizer
from training.data import TokenShards, sample_index
from training.export import export
from training.job import Job, stage_ranges
from training.stages import EEPipelineModule, PipeLoss, PipeStage, StagePlan, head_holders

log = logging.getLogger("coexit.train")


def ds_config(job: Job, bf16: bool) -> dict:
    t, p = job.train, job.parallel
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * p.dp,
        "gradient_clipping": t.grad_clip,  # explicit: DeepSpeed's default would be 1.0
        "zero_optimization": {"stage": p.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        # exit losses travel as a second tensor that requires grad: no activation partitioning across TP ranks
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
        "steps_per_print": 10**9,
        "dump_state": False,
    }


def _optimizer(job: Job, module: torch.nn.Module):
    t = job.train
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or name.endswith("norm.weight") else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if t.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=t.lr)
    else:
        opt = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), foreach=False)

    def factor(step: int) -> float:  # linear warm-up, then cosine decay to min_lr
        if t.lr_warmup_steps and step < t.lr_warmup_steps:
            return (step + 1) / t.lr_warmup_steps
        span = max(1, t.steps - t.lr_warmup_steps)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - t.lr_warmup_steps) / span)))
        return (t.min_lr + (t.lr - t.min_lr) * cos) / t.lr if t.lr else 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor) if (t.lr_warmup_steps or t.min_lr != t.lr) else None
    return opt, sched


def _tp_groups(topo, rank: int):
    mine = None
    for ranks in topo.get_axis_comm_lists("model"):
        g = dist.new_group(ranks)
        if rank in ranks:
            mine = g
    return mine


def _tokenizer(job: Job) -> Tokenizer | None:
    candidates = [job.export.tokenizer, str(Path(job.path(job.data.path)) / "tokenizer.json")]
    if job.model.source:
        candidates.append(str(job.path(job.model.source) / "tokenizer.json"))
    for c in candidates:
        if c and job.path(c).is_file():
            return Tokenizer.from_file(job.path(c))
    return None


def _instrument(engine) -> dict[str, float]:
    """Debug aid (COEXIT_PROFILE=1): seconds spent per pipeline instruction, printed per rank at the end."""
    prof: dict[str, float] = {}

    def timed(fn):
        def run_instr(self, **kw):
            t0 = time.perf_counter()
            try:
                return fn(self, **kw)
            finally:
                prof[fn.__name__] = prof.get(fn.__name__, 0.0) + time.perf_counter() - t0
        return run_instr

    engine._INSTRUCTION_MAP = {k: timed(v) for k, v in engine._INSTRUCTION_MAP.items()}
    return prof


def fit_time_budget(t, step: int, per_step_s: float, elapsed_s: float) -> None:
    """Shorten t.steps so that the loop, `elapsed_s` into t.time_limit_s at `step`, ends within it at
    `per_step_s` a step. The slowest rank's pace counts for every rank (all must run the same steps)."""
    pace = torch.tensor([per_step_s], dtype=torch.float64)
    if dist.is_initialized():
        pace = pace.to("cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(pace, op=dist.ReduceOp.MAX)
    fits = step + int(max(0.0, t.time_limit_s - elapsed_s) / max(float(pace), 1e-9))
    if fits < t.steps:
        print(f"coexit train: {float(pace):.3f} s/step; {t.steps} steps would exceed time_limit_s="
              f"{t.time_limit_s:g}: running {fits}", flush=True)
        t.steps = max(step, fits)


def run(job: Job) -> int:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    rank = dist.get_rank()
    bf16 = job.train.precision == "bf16" or (job.train.precision == "auto" and cuda)
    cfg, t, p = job.config, job.train, job.parallel
    topo = PipeModelDataParallelTopology(num_pp=p.pp, num_mp=p.tp, num_dp=p.dp)
    coord = topo.get_coord(rank)
    torch.manual_seed(job.model.seed)

    data = TokenShards(job.path(job.data.path), "train", job.data.seq_len, job.data.seed)
    ranges = stage_ranges(job)
    plan = StagePlan(config=cfg, ranges=ranges, mode=t.mode,
                     source=str(job.path(job.model.source)) if job.model.source else None, seed=job.model.seed,
                     tp_group=_tp_groups(topo, rank), tp_rank=coord.model, tp_size=p.tp,
                     exit_index={e: i for i, e in enumerate(cfg.exit_layers)}, distill=t.distill)
    loss_fn = PipeLoss(cfg, t.exit_warmup_steps)
    module = EEPipelineModule(layers=[LayerSpec(PipeStage, plan, s) for s in range(p.pp)], topology=topo,
                              loss_fn=loss_fn, partition_method="uniform", activation_checkpoint_interval=0)
    module.setup_head_ties(head_holders(cfg, ranges))
    opt, sched = _optimizer(job, module)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched,
                                           config=ds_config(job, bf16))
    grid = engine.grid
    prof = _instrument(engine) if os.environ.get("COEXIT_PROFILE") else {}
    stage = module.forward_funcs[0]
    is_last = engine.is_last_stage()
    reporter = is_last and coord.data == 0 and coord.model == 0

    start = 0
    ckpt = job.path(job.checkpoint.dir) if job.checkpoint.dir else None
    if ckpt is not None and job.checkpoint.resume and (ckpt / "latest").is_file():
        _, client = engine.load_checkpoint(str(ckpt))
        start = int((client or {}).get("step", 0))
        if rank == 0:
            print(f"coexit train: resumed from {ckpt} at step {start}", flush=True)

    def batches(step: int):
        for m in range(t.grad_accum):
            ids, labels = to_device(*data.batch(sample_index(step, m, coord.data, t.grad_accum, p.dp,
                                                             t.micro_batch_size), t.micro_batch_size))
            yield (ids, labels), labels

    def to_device(ids, labels):
        return (ids.cuda(), labels.cuda()) if cuda else (ids, labels)

    log_path = job.path(t.log_file) if t.log_file else None
    names = [f"exit{e}" for e in cfg.exit_layers] + ["final"]

    def record(rec: dict) -> None:
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")

    def per_exit() -> list[float]:  # mean over micro-batches, then over data-parallel ranks (last stage only)
        per = torch.stack(loss_fn.records).mean(0)
        dist.all_reduce(per, group=grid.get_data_parallel_group())
        return (per / p.dp).tolist()

    val = None
    if t.eval_batches:
        val = TokenShards(job.path(job.data.path), "val", job.data.seq_len, job.data.seed)

    def evaluate(step: int) -> None:
        n = t.eval_batches
        items = []
        for m in range(n):
            ids, labels = to_device(*val.batch(sample_index(0, m, coord.data, n, p.dp, t.micro_batch_size),
                                               t.micro_batch_size))
            items.append(((ids, labels), labels))
        loss_fn.records.clear()
        engine.eval_batch(iter(items), bcast_loss=False, num_micro_batches=n)
        if is_last:
            per = per_exit()
            if reporter:
                record({"step": step, "split": "val", **{f"val_{k}": v for k, v in zip(names, per)}})
                bar.write(f"step {step} held-out: " + " ".join(f"{k}={v:.3f}" for k, v in zip(names, per)))

    bar = tqdm(total=t.steps, initial=start, desc="train", disable=not (reporter and t.progress), unit="step")
    tokens_per_step = t.micro_batch_size * t.grad_accum * p.dp * job.data.seq_len
    loop_t0 = probe_t0 = time.perf_counter()
    skip = min(5, t.time_probe_steps // 4)  # the first steps (allocation, kernel choice) are not the pace
    step = start
    while step < t.steps:
        if step == start + skip:
            probe_t0 = time.perf_counter()
        if t.time_limit_s and step == start + t.time_probe_steps:
            now = time.perf_counter()
            fit_time_budget(t, step, (now - probe_t0) / (step - start - skip), now - loop_t0)
            bar.total = t.steps
        loss_fn.step = step
        loss_fn.records.clear()
        tic = time.perf_counter()
        if os.environ.get("COEXIT_PROFILE") == "torch" and step == t.steps - 1:
            with torch.profiler.profile() as tp:
                loss = engine.train_batch(data_iter=batches(step))
            print(f"PROFILE rank {rank}\n" + tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
        else:
            loss = engine.train_batch(data_iter=batches(step))
        dt = time.perf_counter() - tic
        if is_last:  # per-exit losses, averaged over micro-batches and data-parallel ranks
            per = per_exit()
            if reporter:
                rec = {"step": step + 1, "loss": float(loss), "lr": engine.get_lr()[0], "step_s": dt,
                       "tokens_per_s": tokens_per_step / dt, **dict(zip(names, per)),
                       "exit_weights": loss_fn.weights(step)}
                bar.set_postfix({k: f"{v:.3f}" for k, v in zip(names, per)})
                if (step + 1) % t.log_every == 0 or step + 1 == t.steps or step == start:
                    record(rec)
        bar.update(1)
        if val is not None and (step + 1 == t.steps or (t.eval_every and (step + 1) % t.eval_every == 0)):
            evaluate(step + 1)
        if ckpt is not None and job.checkpoint.every and (step + 1) % job.checkpoint.every == 0:
            engine.save_checkpoint(str(ckpt), tag=f"step{step + 1}", client_state={"step": step + 1})
        step += 1
    bar.close()
    if os.environ.get("COEXIT_PROFILE"):
        print(f"PROFILE rank {rank} stage {coord.pipe} cpu {time.process_time():.2f} " +
              " ".join(f"{k[6:]}={v:.2f}" for k, v in sorted(prof.items())), flush=True)
    if ckpt is not None and start < t.steps and not (job.checkpoint.every and t.steps % job.checkpoint.every == 0):
        engine.save_checkpoint(str(ckpt), tag=f"step{t.steps}", client_state={"step": t.steps})

    if job.debug.dump_logits:
        ids, labels = TokenShards(job.path(job.data.path), "val", job.data.seq_len, job.data.seed).batch(
            0, t.micro_batch_size)
        dev_ids, dev_labels = to_device(ids, labels)
        item = ((dev_ids, dev_labels), dev_labels)
        _, outputs = engine.eval_batch(iter([item]), return_logits=True, bcast_loss=False, num_micro_batches=1)
        if reporter:
            torch.save({"ids": ids, "logits": outputs[0].float().cpu()}, job.path(job.debug.dump_logits))
    if job.export.dir:
        out = export(stage, grid, cfg, job.path(job.export.dir), plan.tp_group, p.tp, _tokenizer(job))
        if out is not None:
            print(f"coexit train: exported {out}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0
