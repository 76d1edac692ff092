"""What llama.cpp's extra CPU buffer types are worth: edge decode tokens/s of one whole edge GGUF with
`use_extra_bufts` on and off (edge/llamacpp/lib.py turns them off where its probe dies, e.g. on hosts whose AMX
faults), through coexit's own LlamaSession, both models loaded side by side and timed interleaved, best of N.

Per quantization: prefill tokens/s (a --prompt-token batch) and decode tokens/s (--tokens single-token steps after
it), each setting's ratio off/on, and the buffers llama.cpp put the weights in (CPU_REPACK, AMX: extra buffer
types took them; only CPU_Mapped: nothing to lose on this host for that file).

    python bench/llamacpp_bufts.py [--model models/coexit-code-small] [--quants q8_0,q4_0] [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _Buffers(logging.Handler):
    """llama.cpp's 'model buffer size' load lines (forwarded to the edge.llamacpp logger at DEBUG)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "model buffer size" in msg:
            self.lines.append(msg.split(":", 1)[-1].strip())


def session(path: Path, extra_bufts: bool, args, buffers: _Buffers):
    from edge.backends.llamacpp import LlamaSession

    os.environ["COEXIT_LLAMA_EXTRA_BUFTS"] = "1" if extra_bufts else "0"  # read by edge.llamacpp.lib.model_params
    buffers.lines.clear()
    s = LlamaSession(path, 1024, args.threads)
    return s, "; ".join(buffers.lines)


def measure(s, args) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one run from an empty cache."""
    prompt = [(7 * i + 3) % 1000 + 3 for i in range(args.prompt)]
    s.clear()
    t0 = time.perf_counter()
    s.decode(prompt, 0, all_outputs=False)
    prefill = len(prompt) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for pos in range(len(prompt), len(prompt) + args.tokens):
        s.decode([5], pos)
    return prefill, args.tokens / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "coexit-code-small"))
    ap.add_argument("--quants", default="q8_0,q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens (the timed prefill batch)")
    ap.add_argument("--tokens", type=int, default=128, help="timed single-token decode steps")
    ap.add_argument("--repeats", type=int, default=7, help="timing repeats, interleaved (the best is kept)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from edge.export.gguf import export_gguf

    buffers = _Buffers()
    log = logging.getLogger("edge.llamacpp")
    log.addHandler(buffers)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?") if Path("/proc/cpuinfo").exists() else "?"
    print(f"{args.model}: edge GGUF, {args.threads} threads, {args.prompt}-token prefill then {args.tokens} decode "
          f"steps, best of {args.repeats} interleaved; CPU {cpu}\n")
    print("| quant | extra bufts | prefill tok/s | decode tok/s | weights in |")
    print("|---|---|---|---|---|")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quants.split(","):
            path = export_gguf(args.model, quant, Path(tmp) / f"edge-{quant}.gguf")
            runs = {on: session(path, on, args, buffers) for on in (True, False)}
            best = {on: (0.0, 0.0) for on in runs}
            for _ in range(args.repeats):
                for on, (s, _) in runs.items():
                    p, d = measure(s, args)
                    best[on] = (max(best[on][0], p), max(best[on][1], d))
            for on, (s, where) in runs.items():
                print(f"| {quant} | {'on' if on else 'off'} | {best[on][0]:.0f} | {best[on][1]:.0f} | {where} |")
                s.close()
            ratios.append((quant, best[False][0] / best[True][0], best[False][1] / best[True][1]))
    os.environ.pop("COEXIT_LLAMA_EXTRA_BUFTS")
    print()
    for quant, p, d in ratios:
        print(f"{quant}: off/on prefill {p:.2f}, decode {d:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
