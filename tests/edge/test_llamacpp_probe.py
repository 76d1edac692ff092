"""The extra-buffer-types probe (edge/llamacpp/lib.py): real llama.cpp in real child processes, a cache in a
temporary XDG_CACHE_HOME. COEXIT_LLAMA_PROBE_FAULT=1 makes the probe child die of SIGILL the way llama.cpp does
on a host whose AMX tile instructions fault, so that path runs on any host; nothing here depends on the CPU's
features (the probes that must pass run f32 weights, which no extra buffer type takes)."""

from __future__ import annotations

import json
import logging
import sys

import gguf
import pytest
import torch

pytest.importorskip("llama_cpp")

import edge.llamacpp.lib as lib  # noqa: E402
from coexit.errors import CoexitError, UsageError  # noqa: E402
from edge.backends.registry import make_backend  # noqa: E402
from edge.export.gguf import export_gguf  # noqa: E402
from edge.llamacpp.lib import (  # noqa: E402
    EXTRA_BUFTS_ENV,
    FAULT_ENV,
    LlamaCppBuildError,
    extra_bufts_ok,
    model_params,
    stock_llama,
)

# quant_dir (tests/edge/conftest.py): 4 layers, exits 1, 2, 3 with the split at 3


@pytest.fixture(scope="module")
def ggufs(quant_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    return {q: export_gguf(quant_dir, q, out / f"edge-{q}.gguf") for q in ("f32", "q8_0")}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty verdict cache, on disk and in this process; no override or fault from the environment."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(EXTRA_BUFTS_ENV, raising=False)
    monkeypatch.delenv(FAULT_ENV, raising=False)
    monkeypatch.setattr(lib, "_verdicts", {})
    monkeypatch.setattr(lib, "_warned", set())
    return tmp_path / "coexit"


def entries(cache) -> dict:
    return {f: json.loads(f.read_text()) for f in cache.glob("*.json")}


def no_children(monkeypatch):
    """From here on a probe child cannot start (the call would raise)."""
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")


def greedy(backend, n=8):
    """Prompt, then n greedy steps: (tokens, stacked split-exit logits of every step)."""
    backend.reset()
    ids, logits = [5, 9, 13, 17, 21, 25], []
    r = backend.step(ids, 0, None)
    for _ in range(n):
        logits.append(r.exit_logits[backend.split])
        ids.append(int(logits[-1].argmax()))
        r = backend.step(ids[-1:], len(ids) - 1, None)
    return ids, torch.stack(logits)


def test_a_dying_probe_turns_extra_bufts_off_and_the_backend_runs(ggufs, cache, monkeypatch, caplog):
    q8 = ggufs["q8_0"]  # the weights an AMX host's tile kernels take
    monkeypatch.setenv(FAULT_ENV, "1")
    with caplog.at_level(logging.WARNING, "edge.llamacpp"):
        probed = greedy(make_backend("gguf", q8, kv_type="f32", max_len=64))  # loading probes (empty cache)
        [(file, entry)] = entries(cache).items()
        assert entry["extra_bufts"] is False and "SIGILL" in entry["why"]
        assert entry["types"] == sorted({t.tensor_type.name for t in gguf.GGUFReader(q8).tensors}) != ["F32"]
        assert extra_bufts_ok(q8) is False
    warned = [r.getMessage() for r in caplog.records if r.name == "edge.llamacpp" and r.levelno == logging.WARNING]
    assert len(warned) == 1 and "without extra buffer types" in warned[0] and "SIGILL" in warned[0]
    assert model_params(q8).use_extra_bufts is False
    monkeypatch.delenv(FAULT_ENV)
    monkeypatch.setenv(EXTRA_BUFTS_ENV, "0")
    forced = greedy(make_backend("gguf", q8, kv_type="f32", max_len=64))
    assert probed[0] == forced[0]
    assert torch.equal(probed[1], forced[1])


def test_a_passing_probe_keeps_extra_bufts_and_is_asked_once(ggufs, cache, monkeypatch):
    f32 = ggufs["f32"]
    assert extra_bufts_ok(f32) is True
    [(file, entry)] = entries(cache).items()
    assert entry["extra_bufts"] is True and entry["types"] == ["F32"] and entry["probe_s"] > 0
    assert not list(cache.glob("*.tmp"))  # written through a temporary file, renamed
    no_children(monkeypatch)
    assert extra_bufts_ok(f32) is True  # this process remembers
    file.write_text(json.dumps({**entry, "extra_bufts": False, "why": "written by the test"}))
    monkeypatch.setattr(lib, "_verdicts", {})  # as a new process: only the disk cache knows
    assert extra_bufts_ok(f32) is False
    llm = stock_llama(f32, n_ctx=32, verbose=False)
    assert llm.model_params.use_extra_bufts is False
    llm.close()
    import llama_cpp.llama_cpp as low

    assert low.llama_model_default_params().use_extra_bufts is True  # stock_llama left the defaults alone


@pytest.mark.parametrize("forced", ["0", "1"])
def test_the_environment_override_skips_the_probe(ggufs, cache, monkeypatch, forced):
    monkeypatch.setenv(EXTRA_BUFTS_ENV, forced)
    monkeypatch.setenv(FAULT_ENV, "2")  # a probe would say off, or raise
    no_children(monkeypatch)
    want = forced == "1"
    assert extra_bufts_ok(ggufs["q8_0"]) is want
    assert model_params(ggufs["q8_0"]).use_extra_bufts is want
    llm = stock_llama(ggufs["f32"], n_ctx=32, verbose=False)
    assert llm.model_params.use_extra_bufts is want
    llm.close()
    assert not cache.exists()


def test_a_build_that_dies_without_extra_bufts_too_is_a_clear_error(ggufs, cache, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "2")  # the child dies with and without extra buffer types
    with pytest.raises(LlamaCppBuildError) as e:
        extra_bufts_ok(ggufs["f32"])
    assert isinstance(e.value, CoexitError)
    assert "SIGILL" in str(e.value) and "instructions this CPU lacks" in str(e.value)
    assert 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --force-reinstall --no-binary llama-cpp-python' in str(e.value)
    assert not entries(cache)  # nothing cached: the next run probes again
    monkeypatch.setenv(EXTRA_BUFTS_ENV, "yes")
    with pytest.raises(UsageError, match=EXTRA_BUFTS_ENV):
        extra_bufts_ok(ggufs["f32"])
