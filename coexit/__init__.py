"""coexit: an early-exit Llama-family LLM split between edge devices and the cloud.

Public API (torch-only; edge/, cloud/ and training/ build on it):
    model = coexit.load(dir)                      # config.json + model.safetensors (+ tokenizer.json)
    out = model(ids, exits="all")                 # out.logits (B,T,V), out.exit_logits {layer: (B,T,V)}
    edge = model.stage(0, split)                  # a view over layers [0, split) sharing parameters
    coexit.save(model, dir)
"""

from coexit.checkpoint import load, read_config, save
from coexit.config import FLAVOURS, Config, EarlyExitConfig, RopeScaling
from coexit.errors import CheckpointError, CoexitError, ConfigError
from coexit.kv_cache import CacheError, KVCache
from coexit.model import EarlyExitLM, ModelOutput, Stage
from coexit.sampling import GREEDY, SamplingParams, sample
from coexit.tokenizer import Tokenizer

__all__ = [
    "FLAVOURS", "GREEDY", "CacheError", "CheckpointError", "CoexitError", "Config", "ConfigError",
    "EarlyExitConfig", "EarlyExitLM", "KVCache", "ModelOutput", "RopeScaling", "SamplingParams", "Stage",
    "Tokenizer", "load", "read_config", "sample", "save",
]
__version__ = "0.1.0"
