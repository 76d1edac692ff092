"""The llama.cpp edge backend: runs an edge GGUF, or a chain of GGUF segments, through llama-cpp-python's
low-level API.

Layouts (edge/export/gguf.py, edge/export/segments.py):
- **segments** (a directory of `layers-LO-HI.gguf`): one llama.cpp context per exit interval, chained through
  `llama_batch.embd`. Each segment's output head is the exit at its top, so llama.cpp computes that exit's logits
  itself. A token accepted at an exit stops there: the segments above never run it. Its rows wait, parked at that
  depth, and catch up in one batch with the next token that goes deeper (KV recomputation, as coexit.decoding's
  LayerRunner does), so every position's KV exists in every segment it needs, and its split row is released then.
- **whole** (one `.gguf`): every token runs all of [0, split); earlier exits are applied in Python to captured
  layer outputs (edge/backends/gguf_heads.py). One stock file, no compute saved by exits.

How hidden states are read: llama.cpp names each layer's output (the residual after layer i, i.e. after i + 1
layers) `l_out-{i}`. The context's eval callback is a C function (edge/llamacpp/native/capture.c via
edge.llamacpp.lib.Capture) that asks for the wanted names only and copies them out as f32 (n_tokens, C); a
Python callback per graph node would cost more than the layers at this size. Every batch row is marked as an
output row: llama.cpp drops non-output rows inside the last layer, and the segment's output rows must all
survive. The KV caches live in the llama.cpp contexts across steps; truncate() removes positions with
llama_memory_seq_rm.

A LoRA adapter (PEFT layout, `adapter=DIR`) is exported once per edge file's layer range into the adapter directory
(edge/export/lora.py) and applied by llama.cpp at run time over the (quantized) base: `adapter_files`.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from coexit.decoding import Decide, ExitLogits, ParkedRows, RunResult, checks
from edge.backends.base import EdgeBackend
from edge.backends.gguf_heads import ExitHead, read_edge_gguf
from edge.export.lora import adapter_files
from edge.llamacpp.lib import Capture, llama, model_params

KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type ids for the K/V cache


class LlamaSession:
    """One llama.cpp model + context + batch for a single sequence (seq id 0); optional layer capture.
    embd_input: the batch carries embeddings (n, n_embd) instead of token ids (a segment above the first)."""

    def __init__(self, path: str | Path, n_ctx: int, n_threads: int = 2, n_batch: int = 256,
                 capture: list[int] | None = None, kv_type: str = "f16", flash_attn: bool = False,
                 embd_input: bool = False, lora: str | Path | None = None) -> None:
        self.lc = lc = llama()
        self.model = self.ctx = self.batch = None
        self.model = lc.llama_model_load_from_file(str(path).encode(), model_params(path))
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}; set the 'edge.llamacpp' logger to DEBUG for why")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.n_embd = lc.llama_model_n_embd(self.model)
        self.n_batch, self.embd_input = n_batch, embd_input
        self.layers = list(capture or [])
        self.captured: dict[int, list[np.ndarray]] = {i: [] for i in self.layers}
        self.capture = Capture([f"l_out-{i}".encode() for i in self.layers], n_batch, self.n_embd) \
            if self.layers else None
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, 1
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.type_k = cp.type_v = KV_TYPES[kv_type]
        cp.flash_attn_type = 1 if flash_attn else 0
        cp.no_perf = True
        if self.capture is not None:
            cp.cb_eval = lc.ggml_backend_sched_eval_callback(self.capture.callback)
            cp.cb_eval_user_data = self.capture.user_data
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context (n_ctx={n_ctx}) for {path}")
        self.n_ctx = lc.llama_n_ctx(self.ctx)
        self.mem = lc.llama_get_memory(self.ctx)
        self.adapter = None
        if lora is not None:  # a GGUF LoRA adapter (edge/export/lora.py), applied at run time at scale 1
            self.adapter = lc.llama_adapter_lora_init(self.model, str(lora).encode())
            if not self.adapter:
                raise RuntimeError(f"llama.cpp could not load the LoRA adapter {lora} for {path}")
            rc = lc.llama_set_adapters_lora(self.ctx, (lc.llama_adapter_lora_p_ctypes * 1)(self.adapter), 1,
                                            (ctypes.c_float * 1)(1.0))
            if rc != 0:
                raise RuntimeError(f"llama.cpp refused the LoRA adapter {lora} (code {rc})")
        self.batch = lc.llama_batch_init(n_batch, self.n_embd if embd_input else 0, 1)

    def decode(self, tokens: list[int] | np.ndarray, first: int, all_outputs: bool = True) -> None:
        """Run positions [first, first + n) in chunks of n_batch: token ids, or embedding rows (n, n_embd) f32
        for an embd_input session. Captures land in self.captured."""
        lc, b = self.lc, self.batch
        for lo in range(0, len(tokens), self.n_batch):
            chunk = tokens[lo: lo + self.n_batch]
            n = b.n_tokens = len(chunk)
            if self.embd_input:
                rows = np.ascontiguousarray(chunk, dtype=np.float32)
                ctypes.memmove(b.embd, rows.ctypes.data, rows.nbytes)
            for i in range(n):
                if not self.embd_input:
                    b.token[i] = int(chunk[i])
                b.pos[i], b.n_seq_id[i] = first + lo + i, 1
                b.seq_id[i][0] = 0
                b.logits[i] = 1 if all_outputs or i == n - 1 else 0
            rc = lc.llama_decode(self.ctx, b)
            if self.capture is not None:
                self.capture.check()
                for k, layer in enumerate(self.layers):
                    self.captured[layer].append(self.capture.take(k))
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc} at positions [{first + lo}, "
                                   f"{first + lo + n}) (1: no KV slot; context is {self.n_ctx})")

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


class _Stage:
    """Layers [lo, hi) in one llama.cpp context; `heads`: exits inside it run in Python (whole layout only)."""

    def __init__(self, lo: int, hi: int, session: LlamaSession, heads: dict[int, ExitHead]) -> None:
        self.lo, self.hi, self.session, self.heads = lo, hi, session, heads


class LlamaCppBackend(EdgeBackend):
    """EdgeBackend over an edge GGUF file (whole layout) or a directory of GGUF segments. max_len: context size
    (default min(max_position_embeddings, 4096)). flash_attn: default on with an f16/q8_0 KV cache (about 15%
    faster decode at d 256), off with f32 (llama.cpp's CPU flash attention rounds through f16)."""

    name = "llama.cpp"

    def __init__(self, path: str | Path, n_threads: int = 2, max_len: int | None = None, n_batch: int = 256,
                 kv_type: str = "f16", flash_attn: bool | None = None, adapter: str | Path | None = None) -> None:
        from edge.export.segments import segment_files

        self.path = Path(path)
        files = segment_files(self.path) if self.path.is_dir() else [self.path]
        metas = [read_edge_gguf(f) for f in files]
        meta = metas[0]
        self.config, self.fingerprint, self.tokenizer_json = meta.config, meta.fingerprint, meta.tokenizer_json
        self.layout = "segments" if meta.layers is not None else "whole"
        self.flash_attn = flash_attn = kv_type != "f32" if flash_attn is None else flash_attn
        n_ctx = max_len or min(self.config.max_position_embeddings, 4096)
        split = self.split
        self.stages: list[_Stage] = []
        if self.layout == "whole":
            capture = sorted({e - 1 for e in self.exit_layers if e < split} | {split - 1})
            lora = adapter_files(adapter, self.config, [(0, split)])[0] if adapter else None
            session = LlamaSession(files[0], n_ctx, n_threads, n_batch, capture, kv_type, flash_attn, lora=lora)
            self.stages.append(_Stage(0, split, session, meta.heads))
        else:
            expect = 0
            loras = adapter_files(adapter, self.config, [m.layers for m in metas]) if adapter else [None] * len(files)
            for f, m, lora in zip(files, metas, loras):
                lo, hi = m.layers
                if m.fingerprint != meta.fingerprint or lo != expect or hi > split:
                    raise ValueError(f"{f.name} (layers [{lo}, {hi}), fingerprint {m.fingerprint[:12]}) does not "
                                     f"continue the segments before it in {self.path}; re-export them together")
                session = LlamaSession(f, n_ctx, n_threads, n_batch, [hi - lo - 1], kv_type, flash_attn,
                                       embd_input=lo > 0, lora=lora)
                self.stages.append(_Stage(lo, hi, session, {}))
                expect = hi
            if expect != split:
                raise ValueError(f"the segments in {self.path} end at layer {expect}, not the split ({split})")
        self.reset()

    @property
    def max_length(self) -> int:
        return self.stages[0].session.n_ctx

    def reset(self) -> None:
        for st in self.stages:
            st.session.clear()
        self._parked = ParkedRows()  # rows waiting above an exit; at depth split: the outbox of take_split_rows
        self._next = 0
        self._layer_tokens = 0

    def step(self, token_ids: list[int], first: int, decide: Decide | None, to_split: bool = False) -> RunResult:
        if first != self._next:
            raise ValueError(f"rows start at position {first} but this backend expects position {self._next}; "
                             f"positions must continue without gap or overlap (truncate() to roll back)")
        n = len(token_ids)
        if n == 0:
            raise ValueError("step() needs at least one token")
        if first + n > self.stages[0].session.n_ctx:
            raise ValueError(f"positions up to {first + n} exceed the llama.cpp context of "
                             f"{self.stages[0].session.n_ctx}; create the backend with a larger max_len")
        self._next = first + n
        result = RunResult(depth=self.split, exited=False, exit_logits=ExitLogits(self))
        exits = set(self.exit_layers)
        checking, stopped = True, False
        x, lo_pos = token_ids, first
        for st in self.stages:
            if st.lo in self._parked:  # catch up rows that stopped at this depth earlier
                pf, prow = self._parked.pop(st.lo)
                assert pf + prow.shape[0] == lo_pos, "parked rows must end where the batch begins"
                x, lo_pos = torch.cat([prow, x], 0), pf
            st.session.decode(x.numpy() if isinstance(x, Tensor) else x, lo_pos)
            x = torch.from_numpy(st.session.take_captured(st.hi - st.lo - 1))
            computed = x.shape[0] * (st.hi - st.lo)
            self._layer_tokens += computed
            result.rows_computed += computed
            for e in sorted(st.heads):  # whole layout: exits inside the stage, on captured layer outputs
                hidden = torch.from_numpy(st.session.take_captured(e - 1)[-1])
                if not (checking and e in exits):
                    continue
                if not checks(decide, e):  # nobody looks: the head runs only if its logits are read
                    result.exit_logits.defer(e, hidden)
                    continue
                logits = result.exit_logits[e] = st.heads[e](hidden)
                if decide(e, logits, hidden):
                    result.depth, result.exited, checking = e, True, False
            looked = checking and checks(decide, st.hi)
            if checking and st.hi in exits and (looked or decide is None or st.hi == self.split):
                logits, hidden = st.session.last_logits(), x[-1]
                result.exit_logits[st.hi] = logits
                if looked and decide(st.hi, logits, hidden):
                    result.depth, result.exited, checking = st.hi, True, False
                    stopped = not to_split
            if stopped and st.hi < self.split:
                self._parked.add(st.hi, lo_pos, x)
                return result
        self._parked.add(self.split, lo_pos, x)
        return result

    def head_logits(self, layer: int, hidden: Tensor) -> Tensor:
        """Exit `layer`'s logits of hidden rows (.., C) (the whole layout's Python heads; ExitLogits calls it)."""
        return next(st.heads[layer] for st in self.stages if layer in st.heads)(hidden)

    def take_split_rows(self) -> tuple[int, Tensor]:
        if self.split in self._parked:
            return self._parked.pop(self.split)
        first = min((f for f, _ in self._parked.values()), default=self._next)  # the next row to reach it
        return first, torch.zeros(0, self.config.hidden_size)

    def truncate(self, length: int) -> None:
        if length >= self._next:
            return
        for st in self.stages:
            st.session.remove_from(length)
        self._parked.truncate(length)
        self._next = length

    @property
    def next_position(self) -> int:
        return self._next

    @property
    def layer_tokens(self) -> int:
        return self._layer_tokens

    def close(self) -> None:
        for st in self.stages:
            st.session.close()
