"""`coexit calibrate`: per-exit thresholds so that tokens exited on the edge agree with the full model at a target
rate on held-out data, and the share of tokens that then exit on the edge.

Method: run the full model over held-out prompts and its own greedy continuations of them (on-policy, the default;
--teacher-forced: over the held-out text itself) and record, at every position, each edge exit's confidence and
whether its top-1 equals the final head's top-1. Exits are taken in order, so thresholds are chosen
in order: for each exit, among the positions no earlier exit took, the lowest threshold whose accepted positions
agree with the final head at >= target. Every exit's accepted set meets the target, hence so does their union.
The result is written to DIR/exit_policy.json, which EdgeClient.from_checkpoint uses as its default policy.
The file also holds the frontier of threshold vectors the adaptive policy (edge/policy/adaptive.py) chooses from, and
its default quality budget: the fixed policy's own disagreement over all calibration positions.

`--reference text` (teacher-forced only) measures the target against the text's real next token instead of the
final head: an exited token is acceptable unless the final head had the real token and the exit did not (the exit
lost a token the cloud would have got right). On-policy text is the final head's own, so there the two coincide;
on the user's own text an adapted edge (`coexit adapt`) that is right where the unadapted cloud is wrong is not
counted against the target, as agreement with the cloud would count it. Agreement implies acceptability, so at the
same target the text reference takes at least the cloud reference's share on the same data. It is the default for
an adapted edge (`--adapter`): the user's text is the ground truth the adapter was trained toward, and the shared
cloud never saw it (bench/results/adapt.txt: judged against the cloud the adapted edge's calibrated share falls a
little while its accuracy rises; judged against the text it rises).
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import coexit
from coexit.errors import UsageError
from coexit.exits import ExitPolicy, confidence
from coexit.textdata import read_documents
from edge.policy.adaptive import AdaptivePolicy, FrontierPoint, evaluate, frontier
from edge.policy.gate import ExitGate, GatePolicy, load_gates, save_gates
from edge.policy.gate import features as gate_features
from edge.policy.guarantee import ltt_threshold

POLICY_FILE = "exit_policy.json"
REFERENCES = ("cloud", "text")  # what an exited token is judged against: the final head's top-1, the real next token


@dataclass
class ExitStats:
    conf: dict[int, torch.Tensor]  # exit layer -> (N,) confidence
    agree: dict[int, torch.Tensor]  # exit layer -> (N,) bool: exit top-1 == final top-1 (reference "text": exit top-1
    # == the real next token, or the final top-1 is not it)
    feats: dict[int, torch.Tensor] | None = None  # exit layer -> (N, F) learned-gate features, when asked

    def subset(self, idx: torch.Tensor) -> ExitStats:
        def pick(d):
            return {e: v[idx] for e, v in d.items()}

        return ExitStats(pick(self.conf), pick(self.agree), pick(self.feats) if self.feats else None)


@torch.no_grad()
def exit_pass(model: coexit.EarlyExitLM, x: torch.Tensor, exits: list[int], final: bool = True,
              rows: torch.Tensor | None = None, cache=None):
    """One pass over ids (B, T): per exit its logits (B·T, V) and hidden states (B·T, C), and the final logits
    (None with final=False: the layers above the last exit are not run); rows in sequence order, so (T, ...) for
    one sequence. rows: only these of the B·T rows (the heads are applied to them alone). cache: a KV cache x
    continues (positions from its length), filled in place."""
    h, start, logits, hidden = model.embed(x), 0, {}, {}
    L = model.config.num_hidden_layers

    def pick(t: torch.Tensor) -> torch.Tensor:
        t = t.flatten(0, 1)
        return t if rows is None else t[rows]

    for e in exits:
        h = model.run_layers(h, None, cache, start, e).hidden
        hidden[e], start = pick(h), e
        logits[e] = model.head_logits(e, hidden[e])
    if not final:
        return logits, hidden, None
    top = model.run_layers(h, None, cache, start, L, head_rows="none").hidden
    return logits, hidden, model.head_logits(L, pick(top))


def _record(model, x, exits, criterion, want_feats, rows, out, real: torch.Tensor | None = None) -> None:
    """Append the stats of positions `rows` of ids x (B, T) (the same positions of every sequence) to out (conf,
    agree, feats lists per exit); with `real`, the next tokens of those rows, "agree" is acceptability against them
    (see the module's doc)."""
    b, t = x.shape  # the rows of every sequence, sequence by sequence
    rows = (torch.arange(b)[:, None] * t + torch.arange(t)[rows][None]).flatten()
    _append(out, exits, criterion, want_feats, *exit_pass(model, x, exits, rows=rows), real)


def _append(out, exits, criterion, want_feats, logits, hidden, final, real: torch.Tensor | None = None) -> None:
    """Append the stats of rows whose exit logits (N, V) and hidden states (N, C) per exit, and final logits (N, V),
    are given (see `_record`)."""
    top = final.argmax(-1)
    prev_top = prev_h = None
    for e in exits:
        lg = logits[e]
        mine = lg.argmax(-1)
        out[1][e].append(mine == top if real is None else (mine == real) | (top != real))
        if criterion != "learned":
            out[0][e].append(torch.tensor([confidence(row, criterion) for row in lg]))
        if want_feats:
            out[2][e].append(gate_features(lg, hidden[e], prev_top, prev_h))
        prev_top, prev_h = lg.argmax(-1), hidden[e]


def _stats(out, exits, criterion, want_feats) -> ExitStats:
    conf = {e: torch.cat(out[0][e]) for e in exits} if criterion != "learned" else {}
    feats = {e: torch.cat(out[2][e]) for e in exits} if want_feats else None
    return ExitStats(conf, {e: torch.cat(out[1][e]) for e in exits}, feats)


def read_texts(path: str | Path, limit_chars: int) -> list[str]:
    """Documents from a .jsonl corpus (field "text"), a text file or a directory, up to about limit_chars."""
    texts, total = [], 0
    for doc in read_documents([path]):
        texts.append(doc)
        total += len(doc)
        if total >= limit_chars:
            break
    return texts


@torch.no_grad()
def collect(model: coexit.EarlyExitLM, texts: list[str], exits: list[int], criterion: str, seq_len: int = 256,
            max_tokens: int = 50_000, features: bool = False, reference: str = "cloud") -> ExitStats:
    """Teacher-forced: every position of the held-out text (reference "text": every position with a next token,
    judged against it)."""
    if reference not in REFERENCES:
        raise ValueError(f"reference is one of {REFERENCES}, got {reference!r}")
    tok = model.tokenizer
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t, add_bos=True)
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    out = ({e: [] for e in exits}, {e: [] for e in exits}, {e: [] for e in exits})
    want = features or criterion == "learned"
    for a in tqdm(range(0, len(ids) - 1, seq_len), desc="calibrating", unit="window"):
        x = torch.tensor([ids[a:a + seq_len]])
        if reference == "text":
            real = torch.tensor(ids[a + 1:a + seq_len + 1])
            _record(model, x, exits, criterion, want, slice(0, real.numel()), out, real)
        else:
            _record(model, x, exits, criterion, want, slice(None), out)
    return _stats(out, exits, criterion, want)


def on_policy_prompts(tok, texts: list[str], count: int, prompt_tokens: int, room: int, seed: int) -> list[list[int]]:
    """Up to `count` held-out prompts: up to prompt_tokens of a document before a random cut, one cut per stretch
    of document, in document order."""
    rng, prompts = random.Random(seed), []
    for t in texts:
        ids = tok.encode(t, add_bos=True)
        for lo in range(0, len(ids) - 8, prompt_tokens):
            cut = rng.randint(lo + 4, min(len(ids) - 1, lo + prompt_tokens))
            prompts.append(ids[max(0, cut - min(prompt_tokens, room)):cut])
            if len(prompts) >= count:
                return prompts
    return prompts


@torch.no_grad()
def continue_batch(model: coexit.EarlyExitLM, prompts: list[list[int]], new_tokens: int, exits: list[int]):
    """The full model's greedy continuations of equal-length prompts, decoded together (one KV cache of batch B:
    at batch 1 a CPU decode step is bound by reading the weights, so B prompts cost little more than one). Yields,
    step by step, what `exit_pass` gives for the row of each prompt that produced its next token, read on the way:
    per exit the logits (B, V) and hidden states (B, C), and the final logits (B, V); so only one step's logits are
    held at a time. The continuations are `generate_full`'s of each prompt alone, up to float rounding on
    near-ties."""
    x = torch.tensor(prompts)
    b = x.shape[0]
    cache = model.new_cache(batch_size=b, max_len=x.shape[1] + new_tokens)
    for _ in range(new_tokens):
        last = torch.arange(1, b + 1) * x.shape[1] - 1  # each sequence's newest row
        logits, hidden, final = exit_pass(model, x, exits, rows=last, cache=cache)
        yield logits, hidden, final
        x = final.argmax(-1, keepdim=True)  # (B, 1): the next input


@torch.no_grad()
def collect_on_policy(model: coexit.EarlyExitLM, texts: list[str], exits: list[int], criterion: str,
                      max_tokens: int = 50_000, new_tokens: int = 32, prompt_tokens: int = 96, seed: int = 0,
                      features: bool = False, batch: int = 32) -> ExitStats:
    """On-policy: the positions of the full model's own greedy continuations of held-out prompts
    (`on_policy_prompts`), which is the text the policy meets when it runs. Prompts of equal length are decoded
    `batch` at a time (most are prompt_tokens long), their stats read on the way (`continue_batch`), step by
    step: the positions of a batch come step-major (every prompt's first continuation row, then the second ...)."""
    room = model.config.max_position_embeddings - new_tokens
    prompts = on_policy_prompts(model.tokenizer, texts, -(-max_tokens // new_tokens), prompt_tokens, room, seed)
    by_len: dict[int, list[list[int]]] = {}
    for p in prompts:
        by_len.setdefault(len(p), []).append(p)
    out = ({e: [] for e in exits}, {e: [] for e in exits}, {e: [] for e in exits})
    want = features or criterion == "learned"
    bar = tqdm(total=len(prompts) * new_tokens, desc="calibrating on-policy", unit="tok")
    for group in by_len.values():
        for i in range(0, len(group), batch):
            chunk = group[i:i + batch]
            for step in continue_batch(model, chunk, new_tokens, exits):
                _append(out, exits, criterion, want, *step)
            bar.update(len(chunk) * new_tokens)
    bar.close()
    return _stats(out, exits, criterion, want)


def _empirical_threshold(score: torch.Tensor, ok: torch.Tensor, target: float,
                         min_support: int) -> tuple[float | None, dict]:
    """The lowest threshold on `score` whose accepted positions agree at >= target on this sample."""
    order = torch.argsort(score, descending=True)
    counts = torch.arange(1, order.numel() + 1)
    precision = ok[order].float().cumsum(0) / counts
    valid = (precision >= target) & (counts >= min_support)
    if not bool(valid.any()):
        return None, {}
    k = int(valid.nonzero().max())  # the largest accepted set that still meets the target
    return float(score[order[k]]), {}


def choose_thresholds(stats: ExitStats, exits: list[int], target: float, criterion: str,
                      min_support: int = 20, delta: float | None = None) -> tuple[dict[int, float], dict]:
    """Per exit, in order, among the positions no earlier exit took: the lowest threshold whose accepted positions
    agree with the final head at >= target on this sample, or with delta, the loosest whose disagreement is
    provably at most 1 - target with confidence 1 - delta / len(exits) (Learn-then-Test, edge/policy/guarantee.py), so
    that all exits hold at once with confidence 1 - delta."""
    n = next(iter(stats.agree.values())).numel()
    remaining = torch.ones(n, dtype=torch.bool)
    thresholds: dict[int, float] = {}
    report = {"positions": n, "per_exit": {}}
    sign = -1.0 if criterion == "entropy" else 1.0  # make "higher is more confident"
    taken_count = agreed = 0
    for e in exits:
        c, ok = sign * stats.conf[e][remaining], stats.agree[e][remaining]
        if delta is None:
            t, detail = _empirical_threshold(c, ok, target, min_support)
        else:
            t, detail = ltt_threshold(c, ok, 1 - target, delta / len(exits))
        if t is None:
            report["per_exit"][e] = {"threshold": None, "share": 0.0, **detail}
            continue
        thresholds[e] = sign * t
        taken_local = c >= t
        idx = remaining.nonzero().flatten()[taken_local]
        report["per_exit"][e] = {"threshold": sign * t, "share": idx.numel() / n,
                                 "agreement": float(ok[taken_local].float().mean()), **detail}
        taken_count += idx.numel()
        agreed += int(ok[taken_local].sum())
        remaining[idx] = False
    report["edge_share"] = taken_count / n
    report["edge_agreement"] = agreed / taken_count if taken_count else None
    return thresholds, report


def calibrate(model_dir: str | Path, data: str | Path, target: float = 0.99, criterion: str = "max_prob",
              max_tokens: int = 50_000, write: bool = True, on_policy: bool = False, delta: float | None = None,
              seed: int = 0, adapter: str | Path | None = None, reference: str = "cloud") -> dict:
    """Thresholds (and, for criterion "learned", the gates) for DIR; on_policy measures agreement on the full
    model's own greedy continuations; delta asks for the Learn-then-Test guarantee at confidence 1 - delta.
    adapter: calibrate the model with this LoRA adapter merged into its edge layers, and write the policy into the
    adapter's directory (an adapted edge's exits are not the base model's). reference "text": the target is met
    against the text's real next token (teacher-forced only; see the module's doc)."""
    if reference == "text" and on_policy:
        raise UsageError("--reference text judges exits against the text's next token: it needs --teacher-forced")
    model = coexit.load(model_dir, dtype=torch.float32)
    if adapter is not None:
        from coexit.lora import merge_adapter

        merge_adapter(model, adapter)
    exits = model.config.edge_exit_layers
    texts = read_texts(data, max_tokens * 6)
    stats = (collect_on_policy(model, texts, exits, criterion, max_tokens=max_tokens) if on_policy
             else collect(model, texts, exits, criterion, max_tokens=max_tokens, reference=reference))
    gates = None
    if criterion == "learned":  # fit the gates on one half, choose thresholds on the other
        n = next(iter(stats.agree.values())).numel()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        fit, held = perm[: n // 2], perm[n // 2:]
        gates = {e: ExitGate.fit(stats.feats[e][fit], stats.agree[e][fit]) for e in exits}
        stats = stats.subset(held)
        stats.conf = {e: gates[e].score(stats.feats[e]) for e in exits}
    thresholds, report = choose_thresholds(stats, exits, target, criterion, delta=delta)
    high = criterion != "entropy"
    fixed = evaluate(stats.conf, stats.agree, exits, thresholds, high)
    result = {"criterion": criterion, "target": target, "thresholds": {str(k): v for k, v in thresholds.items()},
              **report, "disagreement": fixed.disagreement, "on_policy": on_policy, "reference": reference}
    if delta is not None:
        result["guarantee"] = {"agreement": target, "confidence": 1 - delta,
                               "method": "Learn-then-Test: fixed-sequence testing of Clopper-Pearson upper bounds, "
                                         "delta split over exits (Bonferroni)",
                               "data": "on-policy greedy continuations" if on_policy else "teacher-forced text"}
    if criterion != "learned":  # the adaptive policy's settings (it reads confidence from the logits)
        result["frontier"] = [p.to_dict() for p in frontier(stats.conf, stats.agree, exits, high,
                                                            include=thresholds)]
    else:  # the adaptive policy stays on max-prob (its settings are threshold vectors): the gate's first feature
        stats.conf = {e: stats.feats[e][:, 0] for e in exits}
        mp, _ = choose_thresholds(stats, exits, target, "max_prob", delta=delta)
        result["adaptive"] = {"criterion": "max_prob", "thresholds": {str(k): v for k, v in mp.items()},
                              "disagreement": evaluate(stats.conf, stats.agree, exits, mp, True).disagreement,
                              "frontier": [p.to_dict() for p in frontier(stats.conf, stats.agree, exits, True,
                                                                         include=mp)]}
    if write:
        where = Path(adapter) if adapter is not None else Path(model_dir)
        (where / POLICY_FILE).write_text(json.dumps(result, indent=2) + "\n")
        if gates is not None:
            save_gates(where, gates)
    return result


def load_policy(model_dir: str | Path, adaptive: bool = False,
                quality_budget: float | None = None, config_dir: str | Path | None = None) -> ExitPolicy | None:
    """The calibrated policy of DIR/exit_policy.json, or with adaptive=True the network-aware one over its
    frontier, within quality_budget (default: the fixed policy's own disagreement on the calibration data)."""
    f = Path(model_dir) / POLICY_FILE
    if not f.is_file():
        if adaptive:
            raise FileNotFoundError(f"the adaptive policy needs {f}: run `coexit calibrate --model {model_dir}`")
        return None
    d = json.loads(f.read_text())
    criterion = d.get("criterion", "max_prob")
    thresholds = {int(k): float(v) for k, v in d["thresholds"].items()}
    if criterion == "learned":
        if not adaptive:
            return GatePolicy(thresholds, "learned", gates=load_gates(model_dir))
        if "adaptive" not in d:
            raise ValueError(f"{f} was calibrated with the learned gate and holds no max-prob frontier for the "
                             f"adaptive policy: re-run `coexit calibrate`")
        d, criterion = d["adaptive"], "max_prob"  # the network-aware policy moves max-prob thresholds
    if not adaptive:
        return ExitPolicy(thresholds, criterion)
    if "frontier" not in d:
        raise ValueError(f"{f} has no frontier for the adaptive policy: re-run `coexit calibrate`")
    budget = d["disagreement"] if quality_budget is None else quality_budget
    split = coexit.read_config(config_dir or model_dir).split_layer
    return AdaptivePolicy({}, criterion, points=[FrontierPoint.from_dict(p) for p in d["frontier"]],
                          budget=budget, split=split)


def main(argv: list[str]) -> int:
    from coexit.cli import HelpFormatter

    ap = argparse.ArgumentParser(prog="coexit calibrate", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (exit_policy.json is written there)")
    ap.add_argument("--data", required=True, help="held-out .jsonl (field text), text file or directory")
    ap.add_argument("--target", type=float, default=0.99, help="agreement of edge-exited tokens with the full model")
    ap.add_argument("--criterion", choices=["max_prob", "margin", "entropy", "learned"], default="max_prob",
                    help="learned: a small gate per exit on cheap features, stored as DIR/exit_gate.json")
    ap.add_argument("--max-tokens", type=int, default=50_000, help="calibration positions at most")
    ap.add_argument("--teacher-forced", action="store_true",
                    help="measure agreement on the held-out text itself instead of on the model's own continuations")
    ap.add_argument("--delta", type=float, default=0.05,
                    help="the guarantee's failure probability: the target holds with confidence 1 - delta (0: "
                         "plain empirical thresholds, no guarantee)")
    ap.add_argument("--dry-run", action="store_true", help="print, do not write exit_policy.json")
    ap.add_argument("--adapter", help="a LoRA adapter directory (`coexit adapt`): calibrate the adapted edge and "
                                      "write its policy into that directory, where --adapter runs find it")
    ap.add_argument("--reference", choices=REFERENCES,
                    help="what --target is measured against: the full model's token (cloud), or the text's real next "
                         "token (text: an exit may differ from the cloud where the cloud is wrong; implies "
                         "--teacher-forced). Default: text with --adapter (an edge adapted to the user's own text "
                         "is judged on that text, which the shared cloud never learned), cloud otherwise")
    args = ap.parse_args(argv)
    if args.reference is None:
        args.reference = "text" if args.adapter else "cloud"
    if args.reference == "text":
        args.teacher_forced = True
    if not 0 < args.target < 1:
        raise UsageError(f"--target is an agreement rate in (0, 1), like 0.99; got {args.target}")
    if not 0 <= args.delta < 1:
        raise UsageError(f"--delta is a failure probability in [0, 1), got {args.delta}")
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    coexit.read_config(args.model)  # a wrong --model: one line
    r = calibrate(args.model, args.data, args.target, args.criterion, args.max_tokens, write=not args.dry_run,
                  on_policy=not args.teacher_forced, delta=args.delta or None, adapter=args.adapter,
                  reference=args.reference)
    for e, v in r["per_exit"].items():
        thr = "never" if v["threshold"] is None else f"{v['threshold']:.4f}"
        print(f"exit {e}: threshold {thr}, takes {v['share']:.1%} of tokens")
    agreement = "n/a" if r["edge_agreement"] is None else f"{r['edge_agreement']:.2%}"
    print(f"edge share {r['edge_share']:.1%} at agreement {agreement} (target {args.target:.0%}) over "
          f"{r['positions']} held-out positions" + ("" if args.dry_run else
                                                    f"; wrote {args.adapter or args.model}/{POLICY_FILE}"))
    return 0
