"""The llama.cpp edge backend: runs an edge GGUF (edge/export_gguf.py) through llama-cpp-python's low-level API.

How the hidden states are captured: the context is created with an eval callback (`cb_eval`, ggml's
`ggml_backend_sched_eval_callback`). llama.cpp names each layer's output (the residual after layer i, i.e. after
i + 1 layers) `l_out-{i}`. In the callback's "ask" phase we answer True only for the names we need
(`l_out-{e-1}` for each exit e, `l_out-{split-1}` for the split), which makes the scheduler compute the graph up to
that node and call us again with the finished tensor; we then copy it (f32, (n_tokens, C)) out with
`ggml_backend_tensor_get`. Every batch row is marked as an output row: llama.cpp drops non-output rows inside the
last layer, and the split rows must all survive.

What it computes: every token runs through all layers [0, split) (no early stop inside llama.cpp's graph), so an
accepted early exit saves no edge compute here, only cloud traffic; every position's split row is available
from take_split_rows() right after its step (the torch backend releases an exited row's split state later,
through KV recomputation; the rows, their order and their values are the same). The split exit's logits are
llama.cpp's own (the GGUF's output head); earlier exits are applied in Python (edge/backends/gguf_heads.py).
The KV cache lives in the llama.cpp context across steps; truncate() removes positions with llama_memory_seq_rm.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from coexit.decoding import Decide, RunResult
from edge.backends.base import EdgeBackend
from edge.backends.gguf_heads import read_edge_gguf
from edge.llamacpp_lib import GGMLTensorHead, ggml, llama

KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type ids for the K/V cache
GGML_TYPE_F32 = 0


class LlamaSession:
    """One llama.cpp model + context + batch for a single sequence (seq id 0); optional layer capture."""

    def __init__(self, path: str | Path, n_ctx: int, n_threads: int = 2, n_batch: int = 256,
                 capture: list[int] | None = None, kv_type: str = "f16", flash_attn: bool = False) -> None:
        self.lc, self.g = llama(), ggml()
        lc = self.lc
        self.model = self.ctx = self.batch = None
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = lc.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}; set the 'edge.llamacpp' logger to DEBUG for why")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.n_embd = lc.llama_model_n_embd(self.model)
        self.n_batch = n_batch
        self.wanted = {f"l_out-{i}".encode(): i for i in (capture or [])}
        self.captured: dict[int, list[np.ndarray]] = {i: [] for i in (capture or [])}
        self.error: BaseException | None = None
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, 1
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.type_k = cp.type_v = KV_TYPES[kv_type]
        cp.flash_attn_type = 1 if flash_attn else 0
        cp.no_perf = True
        if self.wanted:
            self._cb = lc.ggml_backend_sched_eval_callback(self._eval)  # referenced for the context's lifetime
            cp.cb_eval = self._cb
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context (n_ctx={n_ctx}) for {path}")
        self.n_ctx = lc.llama_n_ctx(self.ctx)
        self.mem = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(n_batch, 0, 1)

    def _eval(self, t, ask, _user) -> bool:
        try:
            name = self.g.ggml_get_name(t)
            if ask:
                return name in self.wanted
            if name in self.wanted:
                head = GGMLTensorHead.from_address(t)
                c, n = head.ne[0], head.ne[1]
                if head.type != GGML_TYPE_F32 or head.nb[1] != 4 * c or head.ne[2] != 1 or head.ne[3] != 1:
                    raise RuntimeError(f"{name.decode()} is not a contiguous f32 (C, n) tensor")
                rows = np.empty((n, c), dtype=np.float32)
                self.g.ggml_backend_tensor_get(t, rows.ctypes.data, 0, rows.nbytes)
                self.captured[self.wanted[name]].append(rows)
            return True
        except BaseException as exc:  # an exception must not unwind through C; report it after llama_decode
            self.error = exc
            return True

    def decode(self, tokens: list[int], first: int, all_outputs: bool = True) -> None:
        """Run tokens at positions [first, first + n) in chunks of n_batch; captures land in self.captured."""
        lc, b = self.lc, self.batch
        for lo in range(0, len(tokens), self.n_batch):
            chunk = tokens[lo: lo + self.n_batch]
            b.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i] = int(tok), first + lo + i, 1
                b.seq_id[i][0] = 0
                b.logits[i] = 1 if all_outputs or i == len(chunk) - 1 else 0
            rc = lc.llama_decode(self.ctx, b)
            if self.error is not None:
                err, self.error = self.error, None
                raise RuntimeError(f"hidden-state capture failed: {err}") from err
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc} at positions [{first + lo}, "
                                   f"{first + lo + len(chunk)}) (1: no KV slot; context is {self.n_ctx})")

    def last_logits(self) -> Tensor:
        ptr = self.lc.llama_get_logits_ith(self.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())

    def take_captured(self, layer: int) -> np.ndarray:
        parts, self.captured[layer] = self.captured[layer], []
        return parts[0] if len(parts) == 1 else np.concatenate(parts, 0)

    def remove_from(self, position: int) -> None:
        if not self.lc.llama_memory_seq_rm(self.mem, 0, position, -1):
            raise RuntimeError(f"llama.cpp could not remove positions >= {position} from the KV cache")

    def clear(self) -> None:
        self.lc.llama_memory_clear(self.mem, True)
        for parts in self.captured.values():
            parts.clear()

    def close(self) -> None:
        lc = self.lc
        if self.batch is not None:
            lc.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            lc.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            lc.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class LlamaCppBackend(EdgeBackend):
    """EdgeBackend over an edge GGUF. max_len: context size (default min(max_position_embeddings, 4096))."""

    name = "llama.cpp"

    def __init__(self, path: str | Path, n_threads: int = 2, max_len: int | None = None, n_batch: int = 256,
                 kv_type: str = "f16", flash_attn: bool = False) -> None:
        meta = read_edge_gguf(path)
        self.path, self.config, self.fingerprint = Path(path), meta.config, meta.fingerprint
        self.tokenizer_json = meta.tokenizer_json
        self.heads = meta.heads
        capture = sorted({e - 1 for e in self.exit_layers if e < self.split} | {self.split - 1})
        n_ctx = max_len or min(self.config.max_position_embeddings, 4096)
        self.session = LlamaSession(path, n_ctx, n_threads, n_batch, capture, kv_type, flash_attn)
        self.reset()

    def reset(self) -> None:
        self.session.clear()
        self._pending: list[np.ndarray] = []
        self._pending_first = 0
        self._next = 0
        self._layer_tokens = 0

    def step(self, token_ids: list[int], first: int, decide: Decide | None, to_split: bool = False) -> RunResult:
        """llama.cpp runs every edge layer whatever the exit, so rows always reach the split (to_split holds)."""
        if first != self._next:
            raise ValueError(f"rows start at position {first} but this backend expects position {self._next}; "
                             f"positions must continue without gap or overlap (truncate() to roll back)")
        n = len(token_ids)
        if n == 0:
            raise ValueError("step() needs at least one token")
        if first + n > self.session.n_ctx:
            raise ValueError(f"positions up to {first + n} exceed the llama.cpp context of {self.session.n_ctx}; "
                             f"create the backend with a larger max_len")
        self.session.decode(token_ids, first)
        self._pending.append(self.session.take_captured(self.split - 1))
        self._next = first + n
        self._layer_tokens += n * self.split
        result = RunResult(depth=self.split, exited=False, rows_computed=n * self.split)
        for e in self.exit_layers:
            if e == self.split:
                logits = self.session.last_logits()
                hidden = torch.from_numpy(self._pending[-1][-1])
            else:
                hidden = torch.from_numpy(self.session.take_captured(e - 1)[-1])
                logits = self.heads[e](hidden)
            result.exit_logits[e] = logits
            if decide is not None and decide(e, logits, hidden):
                result.depth, result.exited = e, True
                break
        for e in self.exit_layers:  # drop captures of exits not evaluated this step
            if e < self.split:
                self.session.captured[e - 1].clear()
        return result

    def take_split_rows(self) -> tuple[int, Tensor]:
        first = self._pending_first
        rows = np.concatenate(self._pending, 0) if self._pending else np.zeros((0, self.config.hidden_size),
                                                                                np.float32)
        self._pending, self._pending_first = [], self._next
        return first, torch.from_numpy(rows)

    def truncate(self, length: int) -> None:
        if length >= self._next:
            return
        self.session.remove_from(length)
        rows = np.concatenate(self._pending, 0) if self._pending else None
        keep = max(0, length - self._pending_first)
        self._pending = [rows[:keep]] if rows is not None and keep else []
        self._pending_first = min(self._pending_first, length)
        self._next = length

    @property
    def next_position(self) -> int:
        return self._next

    @property
    def layer_tokens(self) -> int:
        return self._layer_tokens

    def close(self) -> None:
        self.session.close()
