"""`coexit compress --model DIR --budget-bpw B`: choose one llama.cpp type per edge matrix, the least measured
damage within B bits per weight, and write the policy as JSON beside the model (`coexit export-edge --policy`
applies it; `--backend bnb`: bitsandbytes' nf4/int8 per matrix, which the bnb backends apply when they load).

Sensitivity (edge/export/sensitivity.py) is measured once per checkpoint and backend, on calibration text (`--text`,
never the text you evaluate on), and kept as DIR/quant_sensitivity.json; later budgets reuse it, so choosing a
policy takes a second. The choice is edge/export/policy.py's exact knapsack. Prints what each budget buys: the
types chosen, the bits as stored, and the predicted damage next to the uniform types'.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from coexit.errors import UsageError
from edge.export.policy import POLICY_FILE, choose
from edge.export.quant_types import BNB, CANDIDATES, stored_type, tensor_bytes
from edge.export.sensitivity import SENSITIVITY_FILE, Sensitivity


def sensitivity_for(model_dir: Path, text: list[str] | None, tokens: int, threads: int, remeasure: bool = False,
                    backend: str = "gguf", log=print) -> Sensitivity:
    """DIR/quant_sensitivity.json when it belongs to this checkpoint and holds the backend's types, else those
    measured on `text` and saved there (next to the other backend's, when the file has them)."""
    from coexit.checkpoint import fingerprint

    path = model_dir / SENSITIVITY_FILE
    sens = None
    if path.is_file():
        sens = Sensitivity.load(path)
        if sens.fingerprint != fingerprint(model_dir):
            log(f"{path} belongs to another checkpoint: measuring again")
            sens = None
    has = sens is not None and any((t in BNB) == (backend == "bnb") for e in sens.tensors.values()
                                   for t in e["damage"])
    if has and not remeasure:
        return sens
    if not text:
        raise UsageError(f"no {backend} sensitivity measured for {model_dir} yet: pass --text with calibration text "
                         f"(e.g. data/corpus/train.jsonl; not the text you evaluate on)")
    from edge.export.sensitivity import measure

    kinds = BNB if backend == "bnb" else CANDIDATES
    log(f"measuring the sensitivity of every edge matrix to {', '.join(kinds)} on {tokens} tokens of "
        f"{', '.join(text)} ({threads} thread(s); minutes, once per checkpoint)")
    if backend == "bnb":
        from edge.backends.bnb import rounders

        new = measure(model_dir, text, tokens, threads=threads, rounders=rounders(), drops=False, log=log)
    else:
        new = measure(model_dir, text, tokens, threads=threads, log=log)
    if sens is not None:  # keep the other backend's types; this backend's are replaced
        for entry in sens.tensors.values():
            entry["damage"] = {t: d for t, d in entry["damage"].items() if (t in BNB) != (backend == "bnb")}
        sens = new.merge(sens) if backend == "gguf" else sens.merge(new)
    else:
        sens = new
    sens.save(path)
    log(f"wrote {path}")
    return sens


def report(sens: Sensitivity, policy) -> str:
    """The policy's types per layer and its predicted damage next to uniform types that fit the same budget."""
    lines = [f"{policy.describe()}: {policy.layer_bytes / 2**20:.2f} MiB of edge-layer matrices; predicted damage "
             f"{policy.damage:.5f} (sum of per-tensor KLs at the edge exits and the cloud's final head)",
             "types: " + ", ".join(f"{t} x{n}" for t, n in policy.counts().items())]
    layers = sorted({int(n.split(".")[1]) for n in policy.types})
    for i in layers:
        lines.append(f"  blk.{i}: " + " ".join(f"{n.split('.')[2]}={t}" for n, t in policy.types.items()
                                                if int(n.split(".")[1]) == i))
    uniform, weights = [], sum(r * c for r, c in policy.shapes.values())
    for t in BNB if policy.backend == "bnb" else CANDIDATES:  # every matrix at t (llama.cpp's fallback if needed)
        types = {n: stored_type(t, e["shape"][1]) for n, e in sens.tensors.items()}
        if all(x in sens.tensors[n]["damage"] for n, x in types.items()):
            bpw = 8 * sum(tensor_bytes(x, *sens.tensors[n]["shape"]) for n, x in types.items()) / weights
            uniform.append(f"{t} {bpw:.2f} bpw: {sum(sens.damage(n, x) for n, x in types.items()):.5f}")
    lines.append("uniform types (as stored): " + "; ".join(uniform))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from coexit.cli import HelpFormatter

    ap = argparse.ArgumentParser(prog="coexit compress", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--budget-bpw", type=float, required=True,
                    help="bits per weight of the edge layers' matrices as stored (4.5 to 16; q8_0 is 8.5)")
    ap.add_argument("--text", nargs="+", help="calibration text to measure sensitivity on, when DIR has no "
                                              f"{SENSITIVITY_FILE} yet (files, directories or .jsonl)")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens (sequences of 256)")
    ap.add_argument("--backend", choices=["gguf", "bnb"], default="gguf",
                    help="llama.cpp types (export-edge, --backend gguf) or bitsandbytes' (--backend bnb-nf4/int8)")
    ap.add_argument("--heads", default="q8_0", help="GGUF type of token_embd and the output head (outside the "
                                                    "budget; the bnb backend keeps them fp32)")
    ap.add_argument("--remeasure", action="store_true", help="measure again even if DIR has a sensitivity file")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the measurement")
    ap.add_argument("--out", help=f"policy file (default: MODEL/{POLICY_FILE})")
    args = ap.parse_args(argv)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"{model_dir} is not a checkpoint directory (no config.json)")
    try:
        from edge.export.quant_types import qtype

        qtype(args.heads)
    except ValueError as exc:
        raise UsageError(f"--heads {args.heads}: {exc}") from None
    if not 0 < args.budget_bpw <= 64:
        raise UsageError(f"--budget-bpw {args.budget_bpw:g} is out of range: give bits per weight, e.g. 5.0")
    sens = sensitivity_for(model_dir, args.text, args.tokens, args.threads, args.remeasure, args.backend,
                           log=lambda m: print(m, file=sys.stderr, flush=True))
    policy = choose(sens, args.budget_bpw, heads=args.heads, backend=args.backend)
    out = policy.save(args.out or model_dir / POLICY_FILE)
    print(report(sens, policy))
    if args.backend == "bnb":
        print(f"wrote {out}; run it with `coexit generate --model {model_dir} --backend bnb-nf4 --quant {out}`")
    else:
        print(f"wrote {out}; apply it with `coexit export-edge --model {model_dir} --policy {out}` "
              f"[--layout segments], or `coexit generate --backend gguf --quant {out}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
