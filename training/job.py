"""The training job file (job.toml): its schema, defaults and validation.

Owns everything that can be checked before any process is launched: unknown sections or keys, the parallel layout
(pp x tp x dp must equal the world size; tp must divide the heads), the model's exit layers (inside the model),
mode/source consistency and the stage boundaries. Errors are JobError with a message naming the key at fault.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coexit.checkpoint import read_config
from coexit.config import Config, EarlyExitConfig
from coexit.errors import CoexitError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MODES = ("pretrain", "ee-tune", "finetune")


class JobError(CoexitError):
    """A job file that cannot run; the message says which key to fix."""


@dataclass
class ModelSection:
    source: str = ""  # checkpoint directory (coexit or plain HF); required for ee-tune and finetune
    flavour: str = ""  # pretrain: a named coexit flavour ("tiny", ...) ...
    config: str = ""  # ... or a config.json path
    exit_layers: list[int] | None = None  # overrides of the early_exit block
    split_layer: int | None = None
    share_lm_head: bool | None = None
    loss_weights: list[float] | None = None
    seed: int = 0  # scratch initialisation seed


@dataclass
class DataSection:
    path: str = ""  # a directory written by `coexit prepare-data`
    seq_len: int = 128
    seed: int = 0


@dataclass
class TrainSection:
    mode: str = "pretrain"
    steps: int = 100
    micro_batch_size: int = 4
    grad_accum: int = 1
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # 0 disables clipping (DeepSpeed's own default would silently be 1.0)
    exit_warmup_steps: int = 0  # exit loss weights ramp linearly from 0 to their value over this many steps
    distill: float = 0.0  # self-distillation: each exit's loss adds distill x KL(final head || exit head)
    eval_every: int = 0  # steps between held-out evaluations; 0: only after the last step
    eval_batches: int = 0  # micro-batches per held-out evaluation (per data-parallel rank); 0: no evaluation
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    log_every: int = 10
    log_file: str = ""  # JSONL metrics (per-exit losses); default <export.dir>/../metrics.jsonl when empty
    progress: bool = True
    # wall-clock budget of the training loop in seconds (0: none). `steps` then becomes an upper bound: after
    # `time_probe_steps` steps the run measures its step time and shortens itself to fit, before warm-up ends,
    # so the cosine schedule still decays to min_lr at the (new) last step. For lent machines with a hard limit.
    time_limit_s: float = 0.0
    time_probe_steps: int = 20


@dataclass
class ParallelSection:
    pp: int = 1
    tp: int = 1
    dp: int = 0  # 0: world_size // (pp * tp)
    zero_stage: int = 1  # 0 or 1 (ZeRO-2/3 cannot be combined with pipeline parallelism)
    stage_boundaries: list[int] | None = None  # first layer of stages 1..pp-1; default: balanced


@dataclass
class CheckpointSection:
    dir: str = ""
    every: int = 0  # steps between checkpoints; 0: only at the end (when dir is set)
    resume: bool = True  # continue from dir's latest checkpoint when there is one


@dataclass
class ExportSection:
    dir: str = ""
    tokenizer: str = ""  # tokenizer.json to ship; default: the data directory's, else the source checkpoint's


@dataclass
class DebugSection:
    dump_logits: str = ""  # after training, save the pipeline's final logits on the first held-out batch


@dataclass
class Job:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    export: ExportSection = field(default_factory=ExportSection)
    debug: DebugSection = field(default_factory=DebugSection)
    base_dir: Path = field(default_factory=Path.cwd)  # relative paths in the file are relative to it
    model_config: Config | None = None  # resolved by validate()

    def path(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else self.base_dir / q

    @property
    def config(self) -> Config:
        assert self.model_config is not None, "call validate() first"
        return self.model_config


def _section(cls, name: str, raw: Any):
    if not isinstance(raw, dict):
        raise JobError(f"[{name}] must be a table, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise JobError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in [{name}]; "
                       f"known keys: {', '.join(sorted(known))}")
    return cls(**raw)


def parse(raw: dict[str, Any], base_dir: Path | None = None) -> Job:
    sections = {f.name: f.type for f in dataclasses.fields(Job) if f.name not in ("base_dir", "model_config")}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise JobError(f"unknown section{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; known: "
                       f"{', '.join('[' + s + ']' for s in sections)}")
    classes = {"model": ModelSection, "data": DataSection, "train": TrainSection, "parallel": ParallelSection,
               "checkpoint": CheckpointSection, "export": ExportSection, "debug": DebugSection}
    try:
        parts = {name: _section(classes[name], name, raw.get(name, {})) for name in sections}
    except TypeError as exc:
        raise JobError(f"bad job file: {exc}") from None
    return Job(**parts, base_dir=base_dir or Path.cwd())


def load_job(path: str | Path) -> Job:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise JobError(f"job file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise JobError(f"{path} is not valid TOML: {exc}") from None
    try:
        return parse(raw, base_dir=path.resolve().parent)
    except JobError as exc:
        raise JobError(f"{path}: {exc}") from None


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise JobError(msg)


def resolve_model_config(job: Job) -> Config:
    m = job.model
    chosen = [k for k in ("source", "flavour", "config") if getattr(m, k)]
    _need(len(chosen) == 1, f"[model] needs exactly one of source, flavour, config; got {chosen or 'none'}")
    if m.source:
        base = read_config(job.path(m.source))
    elif m.flavour:
        base = Config.flavour(m.flavour)
    else:
        base = Config.from_json(job.path(m.config))
    ee = base.early_exit
    exits = tuple(m.exit_layers) if m.exit_layers is not None else ee.exit_layers
    n = base.num_hidden_layers
    for e in exits:
        _need(isinstance(e, int) and 1 <= e < n,
              f"[model] exit_layers entry {e} is beyond the model: exits sit after 1..{n - 1} layers of this "
              f"{n}-layer model (the final head after layer {n} is always trained)")
    split = m.split_layer if m.split_layer is not None else (ee.split_layer if ee.split_layer in exits else 0)
    if exits and split not in exits:
        split = exits[len(exits) // 2]
    weights = m.loss_weights if m.loss_weights is not None else (
        ee.loss_weights if m.exit_layers is None else ())
    share = ee.share_lm_head if m.share_lm_head is None else m.share_lm_head
    try:
        return base.replace(early_exit=EarlyExitConfig(exits, split, share, tuple(float(w) for w in weights)))
    except CoexitError as exc:
        raise JobError(f"[model]: {exc}") from None


def stage_ranges(job: Job) -> list[tuple[int, int]]:
    n, pp = job.config.num_hidden_layers, job.parallel.pp
    b = job.parallel.stage_boundaries
    if b is None:
        b = [round(n * s / pp) for s in range(1, pp)]
    edges = [0, *b, n]
    return [(edges[i], edges[i + 1]) for i in range(pp)]


def validate(job: Job, world_size: int) -> Job:
    """Check everything checkable before launch; fills in dp and the resolved model config."""
    t, p = job.train, job.parallel
    _need(t.mode in MODES, f"[train] mode {t.mode!r} is unknown; choose one of {', '.join(MODES)}")
    if t.mode in ("ee-tune", "finetune"):
        _need(bool(job.model.source), f"[train] mode {t.mode!r} starts from a checkpoint: set [model] source")
    job.model_config = resolve_model_config(job)
    cfg = job.config
    for name in ("pp", "tp"):
        _need(getattr(p, name) >= 1, f"[parallel] {name} must be >= 1")
    _need(t.time_limit_s >= 0 and (t.time_limit_s == 0 or t.time_probe_steps >= 1),
          f"[train] time_limit_s ({t.time_limit_s}) must be >= 0, and time_probe_steps >= 1 when it is set "
          f"(the run measures its pace over those steps)")
    if p.dp == 0:
        _need(world_size % (p.pp * p.tp) == 0,
              f"[parallel] pp x tp = {p.pp} x {p.tp} = {p.pp * p.tp} does not divide the world size {world_size}")
        p.dp = world_size // (p.pp * p.tp)
    _need(p.pp * p.tp * p.dp == world_size,
          f"[parallel] pp x tp x dp = {p.pp} x {p.tp} x {p.dp} = {p.pp * p.tp * p.dp} but the launcher started "
          f"{world_size} process{'es' if world_size != 1 else ''}; they must be equal")
    _need(p.zero_stage in (0, 1), f"[parallel] zero_stage {p.zero_stage} is not supported with pipeline "
                                  f"parallelism; use 0 or 1")
    _need(p.pp <= cfg.num_hidden_layers, f"[parallel] pp {p.pp} exceeds the {cfg.num_hidden_layers} layers")
    for what, size in (("num_attention_heads", cfg.num_attention_heads), ("num_key_value_heads",
                       cfg.num_key_value_heads), ("intermediate_size", cfg.intermediate_size)):
        _need(size % p.tp == 0, f"[parallel] tp {p.tp} must divide the model's {what} ({size})")
    if p.stage_boundaries is not None:
        b = list(p.stage_boundaries)
        _need(len(b) == p.pp - 1 and b == sorted(set(b)) and all(0 < x < cfg.num_hidden_layers for x in b),
              f"[parallel] stage_boundaries must be {p.pp - 1} ascending layer indices inside "
              f"1..{cfg.num_hidden_layers - 1}, got {b}")
    if t.mode == "ee-tune":
        for s, (a, b) in enumerate(stage_ranges(job)):
            _need(any(a < e <= b for e in cfg.exit_layers),
                  f"[parallel] ee-tune trains only exit heads, but stage {s} (layers {a}..{b - 1}) holds none; "
                  f"move stage_boundaries so every stage has an exit")
    _need(t.distill >= 0, "[train] distill must be >= 0")
    if t.distill > 0:  # the teacher (the final head) must be on the exit's own pipeline stage
        last = stage_ranges(job)[-1]
        early = [e for e in cfg.exit_layers if e <= last[0]]
        _need(not early, f"[train] distill needs every exit on the last pipeline stage (layers {last[0]}..{last[1] - 1}"
                         f"), where the final head's distribution is computed; exits {early} are on earlier stages: "
                         f"use pp = 1 or move stage_boundaries")
    for name in ("steps", "micro_batch_size", "grad_accum"):
        _need(getattr(t, name) >= 1, f"[train] {name} must be >= 1")
    _need(t.optimizer in ("adamw", "sgd"), f"[train] optimizer {t.optimizer!r} is unknown; use adamw or sgd")
    _need(t.precision in ("auto", "fp32", "bf16"), f"[train] precision {t.precision!r}: use auto, fp32 or bf16")
    _need(t.grad_clip >= 0, "[train] grad_clip must be >= 0 (0 disables clipping)")
    _need(job.data.seq_len >= 1 and job.data.seq_len <= cfg.max_position_embeddings,
          f"[data] seq_len must be in 1..{cfg.max_position_embeddings}")
    _need(bool(job.data.path), "[data] path is required: a directory written by `coexit prepare-data`")
    data = job.path(job.data.path)
    _need((data / "meta.json").is_file(), f"[data] path {data} has no meta.json; write it with `coexit prepare-data`")
    vocab = json.loads((data / "meta.json").read_text()).get("vocab_size", 0)
    _need(vocab <= cfg.vocab_size, f"[data] the tokenizer of {data} has {vocab} tokens but the model's vocab_size "
                                   f"is {cfg.vocab_size}")
    return job
