"""Checkpoint io: `load(path)` and `save(model, path)` on a directory of config.json, model.safetensors and
tokenizer.json.

model.safetensors holds the backbone under HF parameter names plus `exits.{e}.*` tensors. A plain HF Llama or
Qwen2 directory (no exits, possibly sharded with model.safetensors.index.json) loads too: missing exit heads are
initialised from the final norm and LM head, and the load logs that it did. Every problem with a directory is
raised as CheckpointError naming the file and the tensor, never as a traceback from inside torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from coexit.config import Config, EarlyExitConfig
from coexit.errors import CheckpointError, ConfigError
from coexit.model import EarlyExitLM, rope_inv_freq
from coexit.tokenizer import Tokenizer

log = logging.getLogger("coexit.checkpoint")

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def read_config(path: str | Path, early_exit: EarlyExitConfig | None = None) -> Config:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} is missing: a checkpoint directory needs config.json, "
                              f"{WEIGHTS} and (optionally) tokenizer.json")
    try:
        raw = json.loads(cfg_path.read_text())
        if early_exit is None and "early_exit" not in raw:
            log.warning("%s has no early_exit block: using exits %s with split %d", cfg_path,
                        list(EarlyExitConfig.default_for(int(raw.get("num_hidden_layers", 0))).exit_layers),
                        EarlyExitConfig.default_for(int(raw.get("num_hidden_layers", 0))).split_layer)
        return Config.from_dict(raw, early_exit=early_exit)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {exc}") from None
    except ConfigError as exc:
        raise CheckpointError(f"{cfg_path}: {exc}") from None


def _weight_files(path: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it."""
    single, index = path / WEIGHTS, path / WEIGHTS_INDEX
    if single.is_file():
        try:
            with safe_open(single, "pt") as f:
                return {k: single for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{single} is not a readable safetensors file: {exc}") from None
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {missing}")
        return {k: path / f for k, f in weight_map.items()}
    raise CheckpointError(f"{single} is missing: no weights in {path} (expected {WEIGHTS} or {WEIGHTS_INDEX})")


def fingerprint(path: str | Path) -> str:
    """sha256 over config.json's model fields and the weight files' bytes: what edge and cloud must share."""
    path = Path(path)
    return _fingerprint(read_config(path), _weight_files(path))


def _fingerprint(config: Config, files: dict[str, Path]) -> str:
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for file in sorted(set(files.values())):
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _source_name(config: Config, name: str) -> str:
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return "model.embed_tokens.weight"
    return name


def _fallback_name(config: Config, name: str) -> str | None:
    """Where a missing exit-head tensor is initialised from: the final norm / LM head."""
    parts = name.split(".")
    if parts[0] != "exits":
        return None
    if parts[2] == "norm":
        return "model.norm.weight"
    return _source_name(config, "lm_head.weight")


def load(path: str | Path, layers: tuple[int, int] | None = None, dtype: torch.dtype | None = None,
         device: str | torch.device = "cpu", early_exit: EarlyExitConfig | None = None,
         prepare: Callable[[EarlyExitLM], None] | None = None) -> EarlyExitLM:
    """Load a checkpoint directory into an EarlyExitLM.

    layers=(a, b) loads only layers [a, b) with the exits, embeddings and heads that range needs (the edge
    loads [0, split), the cloud [split, L)). dtype defaults to the file's; early_exit overrides config.json's.
    prepare(model) runs on the meta-device model before any storage exists (cloud.tp shards it there); a
    parameter it made a DTensor is filled in place with only this rank's slice of the file's tensor, in the
    DTensor's own dtype.
    """
    path = Path(path)
    config = read_config(path, early_exit)
    files = _weight_files(path)
    with torch.device("meta"):
        try:
            model = EarlyExitLM(config, layers)
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    if prepare is not None:
        prepare(model)
    model.to_empty(device=device)
    model.rotary.inv_freq = rope_inv_freq(config).to(device)
    if config.tie_word_embeddings and hasattr(model, "lm_head") and model.start == 0:
        model.lm_head.weight = model.model.embed_tokens.weight

    handles: dict[Path, object] = {}
    initialised: list[str] = []
    try:
        for name, param in model.state_dict(keep_vars=True).items():
            src = _source_name(config, name)
            if src not in files:
                src = _fallback_name(config, name)
                if src is None or src not in files:
                    raise CheckpointError(f"{files.get(name, path / WEIGHTS)} lacks tensor {name!r} (expected shape "
                                          f"{list(param.shape)} from config.json)")
                initialised.append(name)
            file = files[src]
            if file not in handles:
                handles[file] = safe_open(file, "pt", device="cpu")
            if prepare is not None and hasattr(param, "placements"):  # a DTensor: read and copy only our slice
                _load_shard(handles[file].get_slice(src), param, file, src, name)
                continue
            tensor = handles[file].get_tensor(src)
            _check_shape(tuple(tensor.shape), param, file, src, name)
            target_dtype = dtype or tensor.dtype
            with torch.no_grad():
                param.data = tensor.to(device=device, dtype=target_dtype)
                if initialised and initialised[-1] == name:  # a copy of the final norm/head, never an alias of it
                    param.data = param.data.clone()
    finally:
        handles.clear()
    if config.tie_word_embeddings and hasattr(model, "lm_head") and model.start == 0:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.initialised_exits = tuple(sorted({int(n.split(".")[1]) for n in initialised}))
    if initialised:
        log.warning("%s has no exit heads for layers %s: initialised them from the final norm and LM head "
                    "(ready for EE-tuning)", path, list(model.initialised_exits))
    file_config = config if early_exit is None else read_config(path)  # the fingerprint is the files'
    model.fingerprint = _fingerprint(file_config, files)
    model.tokenizer = _tokenizer(path, file_config)
    return model.eval()


def _check_shape(shape: tuple, param, file: Path, src: str, name: str) -> None:
    if shape != tuple(param.shape):
        raise CheckpointError(f"{file.name}: tensor {src!r} has shape {list(shape)} but config.json implies "
                              f"{list(param.shape)} for {name!r}; the weights and config.json do not belong together")


def _load_shard(sl, param, file: Path, src: str, name: str) -> None:
    """Copy this rank's block of the file's tensor `src` (a safetensors slice handle, nothing read yet) into the
    local shard of the DTensor `param`."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _check_shape(tuple(sl.get_shape()), param, file, src, name)
    local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    block = sl[tuple(slice(o, o + n) for o, n in zip(offset, local_shape))]
    with torch.no_grad():
        param.to_local().copy_(block)


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The checkpoint's tokenizer.json (special ids from config.json), or None when it has none."""
    return _tokenizer(Path(path), read_config(path))


def _tokenizer(path: Path, config: Config) -> Tokenizer | None:
    if not (path / "tokenizer.json").is_file():
        return None
    return Tokenizer.from_file(path / "tokenizer.json", bos_id=config.bos_token_id, eos_id=config.eos_token_id)


def save(model: EarlyExitLM, path: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write config.json, model.safetensors (HF names + exit heads) and, when known, tokenizer.json."""
    if model.layer_range != (0, model.config.num_hidden_layers):
        raise ValueError(f"save() writes whole models; this one holds only layers {model.layer_range}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.to_json(path / "config.json")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(path / WEIGHTS), metadata={"format": "pt"})
    tokenizer = tokenizer or model.tokenizer
    if tokenizer is not None:
        tokenizer.save(path / "tokenizer.json")
    return path
