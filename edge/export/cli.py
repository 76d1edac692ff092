"""`coexit export-edge --model DIR --quant Q [--layout whole|segments]`: write the edge stage of a checkpoint as
GGUF that stock llama.cpp loads (one file, or one file per exit interval), optionally quantized by llama.cpp's own
quantizer. The command line over edge.export.gguf and edge.export.segments.

`--policy FILE` (from `coexit compress`) or `--budget-bpw B` (a policy chosen on the spot from the model's measured
sensitivity, edge/export/policy.py) set every edge matrix's type instead of --quant. With a policy, `--qat STEPS`
fine-tunes the edge with llama.cpp-exact fake quantization of those types first (edge/export/qat.py)."""

from __future__ import annotations

import argparse
import sys

from coexit.checkpoint import read_config
from edge.export.gguf import IMATRIX_FILE, MIXES, QUANTS, export_gguf, sidecar_path
from edge.export.lora import adapter_files
from edge.export.segments import export_segments, segment_files, segment_range


def main(argv: list[str] | None = None) -> int:
    from coexit.cli import HelpFormatter

    ap = argparse.ArgumentParser(prog="coexit export-edge", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (config.json, model.safetensors)")
    ap.add_argument("--format", default="gguf", choices=["gguf"], help="output format")
    ap.add_argument("--quant", choices=sorted(QUANTS) + sorted(MIXES),
                    help="file type, or a mix: q4-mix = q4_k_m + token_embd/output/layer 0 at q8_0 (default f16)")
    ap.add_argument("--policy", metavar="FILE", help="a compression policy (`coexit compress`): one type per edge "
                                                     "matrix, recorded in the GGUF as coexit.quant_policy")
    ap.add_argument("--budget-bpw", type=float, metavar="B",
                    help="choose the policy now: least measured damage within B bits per weight of the edge "
                         "layers (needs MODEL/quant_sensitivity.json, written by `coexit compress`)")
    ap.add_argument("--layout", choices=["whole", "segments"], default="whole",
                    help="one file, or one file per exit interval in a directory (exits then skip the layers "
                         "above them in llama.cpp; edge/export/segments.py)")
    ap.add_argument("--out", help="output file, or directory for segments (default: MODEL/edge-QUANT.gguf or "
                                  "MODEL/edge-QUANT.segments)")
    ap.add_argument("--threads", type=int, default=2, help="quantizer threads")
    ap.add_argument("--imatrix", help=f"importance matrix GGUF (`coexit imatrix`) for 4-bit types; default "
                                      f"MODEL/{IMATRIX_FILE} when it exists; 'none' to quantize without")
    ap.add_argument("--keep-embd", metavar="TYPE", help="ggml type for token_embd (e.g. q8_0, q6_k, f16)")
    ap.add_argument("--keep-output", metavar="TYPE", help="ggml type for the output head (e.g. q8_0)")
    ap.add_argument("--keep-layers", metavar="I,J", help="edge layers kept whole at --keep-layer-type")
    ap.add_argument("--keep-tensors", metavar="NAME,NAME",
                    help="tensors of every edge layer kept at --keep-layer-type (e.g. attn_v,ffn_down)")
    ap.add_argument("--keep-layer-type", metavar="TYPE", help="type for --keep-layers/--keep-tensors (default q8_0)")
    ap.add_argument("--learned-rounding", type=int, default=0, metavar="STEPS",
                    help="after quantizing, re-choose each matrix's codes on llama.cpp's grid for STEPS Adam steps "
                         "against the fp32 model (edge/export/rounding.py; needs --calib; the default model takes "
                         "about 3 s a step on one core, 300 steps are a sound choice); 0: off")
    ap.add_argument("--qat", type=int, default=0, metavar="STEPS",
                    help="with --policy/--budget-bpw: first fine-tune the edge layers for STEPS Adam steps against "
                         "the fp32 model, each matrix rounded exactly as llama.cpp will store it at its policy type "
                         "(edge/export/qat.py; needs --calib; the default model takes 2-4 s a step on one core; "
                         "150-800 steps are a sound choice, more helping at 5 bits); then --learned-rounding, if "
                         "given, starts from the tuned weights; 0: off")
    ap.add_argument("--qat-lr", type=float, default=1e-5, help="--qat's Adam learning rate (cosine decay)")
    ap.add_argument("--calib", nargs="+", metavar="TEXT", help="calibration text for --learned-rounding and --qat "
                                                               "(files, directories or .jsonl; not your evaluation "
                                                               "text)")
    ap.add_argument("--calib-tokens", type=int, default=None,
                    help="calibration tokens for --learned-rounding and --qat (default 65,536; with --qat STEPS at "
                         "least STEPS x 4 x 256: as many 256-token sequences as the steps draw)")
    ap.add_argument("--adapter", help="also write this LoRA adapter directory (`coexit adapt`, PEFT layout) as GGUF "
                                      "adapters for the exported file(s), into that directory; llama.cpp applies "
                                      "them at run time (`coexit generate --backend gguf --adapter DIR`)")
    args = ap.parse_args(argv)
    policy = _policy(args)
    if args.learned_rounding < 0 or (args.learned_rounding and not args.calib):
        from coexit.errors import UsageError

        raise UsageError("--learned-rounding STEPS needs STEPS >= 0 and --calib TEXT (calibration text, e.g. "
                         "data/corpus/train.jsonl)")
    if args.learned_rounding and policy is None and (args.quant or "f16") in ("f16", "f32"):
        from coexit.errors import UsageError

        raise UsageError("--learned-rounding applies to quantized files: pass --quant, --policy or --budget-bpw")
    if args.qat < 0 or (args.qat and (not args.calib or policy is None)):
        from coexit.errors import UsageError

        raise UsageError("--qat STEPS needs STEPS >= 0, a policy (--policy FILE or --budget-bpw B: the types it "
                         "trains for) and --calib TEXT (calibration text, e.g. data/corpus/train.jsonl)")
    if args.calib_tokens is None:  # qat_weights draws 4 sequences of 256 tokens a step; more distinct ones
        args.calib_tokens = max(65536, args.qat * 4 * 256)  # served it better (bench/results/quant_mix.txt)
    if policy is not None:
        quant = f"policy-{policy.budget_bpw:g}bpw"
    else:
        quant = args.quant or "f16"
    try:
        layers = None if args.keep_layers is None else tuple(int(x) for x in args.keep_layers.split(",") if x)
        tensors = None if args.keep_tensors is None else tuple(x for x in args.keep_tensors.split(",") if x)
        kw = dict(imatrix=args.imatrix, embd=args.keep_embd, output=args.keep_output, keep_layers=layers,
                  keep_tensors=tensors, keep_type=args.keep_layer_type)
        if policy is not None:
            kw = dict(policy=policy)
        if args.qat:
            from edge.export.qat import export_qat

            path = export_qat(args.model, policy, args.out, args.threads, steps=args.qat, text=args.calib,
                              tokens=args.calib_tokens, layout=args.layout, rounding=args.learned_rounding,
                              lr=args.qat_lr, log=lambda m: print(m, file=sys.stderr, flush=True))
            print(f"wrote {path}")
            return 0
        if args.learned_rounding:
            from edge.export.rounding import export_rounded

            path = export_rounded(args.model, quant, args.out, args.threads, steps=args.learned_rounding,
                                  text=args.calib, tokens=args.calib_tokens, layout=args.layout,
                                  log=lambda m: print(m, file=sys.stderr, flush=True), **kw)
            print(f"wrote {path}")
            return 0
        if args.layout == "segments":
            out = export_segments(args.model, quant, args.out, args.threads, **kw)
            files = segment_files(out)
            size = sum(f.stat().st_size for f in files) / 2**20
            print(f"wrote {out}/: {', '.join(f.name for f in files)}: {size:.2f} MiB")
            if args.adapter:
                _adapters(args, [segment_range(f) for f in files])
            return 0
        path = export_gguf(args.model, quant, args.out, args.threads, **kw)
    except Exception as exc:  # a CLI prints a message a person can act on, not a traceback
        print(f"coexit export-edge: {exc}", file=sys.stderr)
        return 1
    extra = f" (+ {sidecar_path(path).name})" if sidecar_path(path).exists() else ""
    print(f"wrote {path}{extra}: {path.stat().st_size / 2**20:.2f} MiB")
    if args.adapter:
        _adapters(args, [(0, read_config(args.model).split_layer)])
    return 0


def _adapters(args, ranges: list[tuple[int, int]]) -> None:
    written = [f for f in adapter_files(args.adapter, read_config(args.model), ranges) if f is not None]
    print(f"wrote LoRA adapters {', '.join(str(f) for f in written)}")


def _policy(args):
    """The policy that --policy or --budget-bpw names, or None; contradicting options are a usage error."""
    from coexit.errors import UsageError

    if args.policy is None and args.budget_bpw is None:
        return None
    given = [o for o, v in (("--quant", args.quant), ("--keep-embd", args.keep_embd),
                            ("--keep-output", args.keep_output), ("--keep-layers", args.keep_layers),
                            ("--keep-tensors", args.keep_tensors), ("--imatrix", args.imatrix)) if v is not None]
    if args.policy is not None and args.budget_bpw is not None:
        given.append("--budget-bpw")
    if given:
        raise UsageError(f"{'--policy' if args.policy else '--budget-bpw'} sets every edge tensor's type (and the "
                         f"imatrix it was measured with); drop {', '.join(given)}")
    from pathlib import Path

    from edge.export.policy import Policy, choose
    from edge.export.sensitivity import SENSITIVITY_FILE, Sensitivity

    if args.policy is not None:
        try:
            return Policy.load(args.policy)
        except (OSError, ValueError, TypeError) as exc:
            raise UsageError(f"cannot read the policy {args.policy}: {exc}") from None
    path = Path(args.model) / SENSITIVITY_FILE
    if not path.is_file():
        raise UsageError(f"--budget-bpw needs {path}: measure it once with `coexit compress --model {args.model} "
                         f"--budget-bpw {args.budget_bpw:g} --text CALIBRATION_TEXT`")
    return choose(Sensitivity.load(path), args.budget_bpw)
