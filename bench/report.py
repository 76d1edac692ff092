"""The evaluation report: collaborative mode at several calibrated thresholds, with exact and with propagated
(approximate) cloud KV, and lossless mode, against cloud-only, edge-only and naive-split serving, on held-out code
(packages never seen in training).

Prints a table and writes OUT/report.md, OUT/report.json and PNG plots. Measures:
  quality   agreement with the full model's greedy tokens (each generated token vs the full model's argmax on the
            same prefix), held-out top-1 accuracy and perplexity (teacher-forced: each position scored by the head
            the policy would use, with the deep KV propagated for edge-exited positions in the propagate rows),
            exact match of next-line completions;
  edge share of tokens (lossless: accepted drafts) and draft acceptance; cloud compute relative to cloud-only
  (layer-tokens, plus propagated layer-rows at the cost of their K/V projections); bytes up/down per token;
  end-to-end latency per token over loopback and over an emulated 50 ms RTT, 20 Mbit/s link.

    bench/report [--model DIR] [--data HELDOUT.jsonl] [--out bench/results]
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

import coexit
from bench import shown
from cloud.launch import start_cloud
from coexit.exits import ExitPolicy
from edge.apps.wan_emulator import DelayProxy, netem_available, netem_namespace
from edge.backends import make_backend
from edge.client import EdgeClient
from edge.policy.adaptive import AdaptivePolicy, evaluate, frontier
from edge.policy.calibrate import choose_thresholds, collect, exit_pass, load_policy

ROOT = Path(__file__).resolve().parent.parent
ANCHORS = "CE-CoLLM reports -84.55% cloud compute and -13.81% latency vs cloud-only serving, at comparable accuracy."


def load_snippets(path: Path, n: int, seed: int, min_lines: int = 6) -> tuple[list[tuple[str, str]], list[str]]:
    """(prompt, next line) pairs and calibration texts from disjoint held-out files. A prompt stops where its last
    line ends, before the newline: the tokenizer merges a newline with the next line's indentation into one token,
    so a prompt ending in a bare newline would ask for a continuation the model seldom saw in training (an
    unindented line)."""
    files = [json.loads(line) for line in path.read_text().splitlines()]
    rng = random.Random(seed)
    rng.shuffle(files)
    calib = [f["text"] for f in files[::2]]
    pairs = []
    for f in files[1::2]:
        lines = f["text"].splitlines()
        candidates = [i for i in range(min_lines, len(lines)) if lines[i].strip() and len(lines[i]) < 100]
        if candidates:
            i = rng.choice(candidates)
            pairs.append(("\n".join(lines[max(0, i - 12):i]), lines[i]))
        if len(pairs) >= n:
            break
    return pairs, calib


def kv_fill_cost(config) -> float:
    """A propagated layer-row's cost as a fraction of a computed one: the K/V projections against the whole
    block's matrix products (q, k, v, o and the MLP; attention scores left out, which favours neither)."""
    c, hd, kd, i = config.hidden_size, config.num_attention_heads * config.head_dim, \
        config.num_key_value_heads * config.head_dim, config.intermediate_size
    return 2 * c * kd / (2 * c * hd + 2 * c * kd + 3 * c * i)


@torch.no_grad()
def perplexity(model, texts: list[str], policy: ExitPolicy | None, head: int | None, max_tokens: int,
               seq_len: int = 256, propagate: bool = False) -> tuple[float, float]:
    """Perplexity and top-1 accuracy when each position is scored by the head the policy picks (or a fixed head);
    with propagate, positions the policy exits on the edge get their deep KV propagated instead of computed."""
    tok, L = model.tokenizer, model.config.num_hidden_layers
    split = model.config.split_layer
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t, add_bos=True)
        if len(ids) > max_tokens:
            break
    ids = ids[:max_tokens]
    nll, count, right = 0.0, 0, 0
    exits = [e for e in model.config.exit_layers if e <= split]
    assert split in exits, "the split layer closes with an exit"
    for a in range(0, len(ids) - 1, seq_len):
        x = torch.tensor([ids[a:a + seq_len + 1]])
        # per exit (T, V) and (T, C); with propagate the deep layers run below, once the fill rows are known
        exit_logits, exit_hidden, final = exit_pass(model, x[:, :-1], exits, final=not propagate)
        target = x[0, 1:]
        uses = []
        for i in range(target.numel()):
            use = head if head is not None else L
            if policy is not None:  # each exit's hidden state too: a learned gate reads it
                for e in exits:
                    if policy.decide(e, exit_logits[e][i], exit_hidden[e][i]):
                        use = e
                        break
            uses.append(use)
        if propagate:
            fill = torch.tensor([u != L for u in uses])
            final = model.run_layers(exit_hidden[split][None], None, None, split, L, fill=fill).logits[0]
        for i, use in enumerate(uses):
            logits = final[i] if use == L else exit_logits[use][i]
            nll -= float(torch.log_softmax(logits.float(), -1)[target[i]])
            right += int(int(logits.argmax()) == int(target[i]))
            count += 1
    return math.exp(nll / max(1, count)), right / max(1, count)


def next_line(completion: str) -> str | None:
    """The line a completion writes after the prompt's last line (None unless it ends that line, then writes a
    whole line), right-stripped."""
    parts = completion.split("\n")
    return parts[1].rstrip() if len(parts) >= 3 and not parts[0].strip() else None


@torch.no_grad()
def agreement(model, prompt_ids: list[int], tokens: list[int]) -> tuple[int, int]:
    seq = torch.tensor([prompt_ids + tokens])
    greedy = model(seq).logits[0].argmax(-1)
    n = len(prompt_ids)
    return sum(int(greedy[n - 1 + i]) == t for i, t in enumerate(tokens)), len(tokens)


def prompt_ids(model, prompt: str, max_new: int) -> list[int]:
    """Tokens of the prompt, cut from the left to fit the model's context with max_new tokens to come."""
    ids = model.tokenizer.encode(prompt, add_bos=True)
    room = model.config.max_position_embeddings - max_new
    return ids[-room:] if len(ids) > room else ids


def run_mode(client: EdgeClient, model, pairs, mode: str, policy: ExitPolicy, max_new: int,
             kv_fill: str = "exact") -> dict:
    L = model.config.num_hidden_layers
    agree = total = exact = edge = 0
    up = down = cloud_lt = positions = filled = drafts = accepted = rejected = prompt_lt = 0
    deep = L if mode == "cloud-only" else L - model.config.split_layer
    lat = []
    client.kv_fill = kv_fill
    for prompt, target in pairs:
        ids = prompt_ids(model, prompt, max_new)
        gen = client.generate(ids, max_new, policy=policy, mode=mode)
        c = gen.counters
        # the prompt's rows before the last (each only feeds the context) cost the cloud the same in every mode
        before = len(ids) - 1 if mode == "cloud-only" else sum(p < len(ids) - 1 for u in c.uploads for p in u)
        prompt_lt += before * deep
        filled, drafts, accepted, rejected = (filled + c.cloud_filled_rows, drafts + c.drafts,
                                              accepted + c.accepted, rejected + c.rejected)
        a, n = agreement(model, ids, gen.tokens)
        agree, total = agree + a, total + n
        exact += int(next_line(gen.text) == target.rstrip())
        edge += sum(e.origin != "cloud" for e in gen.events)
        up, down = up + gen.counters.bytes_up, down + gen.counters.bytes_down
        cloud_lt += gen.counters.cloud_layer_tokens
        positions += len(ids) + len(gen.events) - 1
        lat += [e.latency_s for e in gen.events]
    client.kv_fill = "exact"
    cloud = cloud_lt + kv_fill_cost(model.config) * filled
    return {"agreement": agree / max(1, total), "exact_match": exact / len(pairs), "edge_share": edge / max(1, total),
            "cloud_compute": cloud / max(1, L * positions), "cloud_layer_tokens": cloud_lt, "filled_rows": filled,
            "decode_compute": (cloud - prompt_lt) / max(1, L * total),
            "drafts": drafts, "accepted": accepted, "rejected": rejected,
            "acceptance": accepted / (accepted + rejected) if drafts else None, "up_per_token": up / max(1, total),
            "down_per_token": down / max(1, total), "latency_ms": 1e3 * statistics.fmean(lat) if lat else 0.0,
            "latency_p50_ms": 1e3 * statistics.median(lat) if lat else 0.0, "tokens": total}


def plots(rows: dict[str, dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    made = []
    specs = [("quality", ["agreement", "exact_match"], "fraction"),
             ("edge_share_and_compute", ["edge_share", "cloud_compute", "decode_compute"],
              "fraction (compute: of cloud-only)"),
             ("bytes_per_token", ["up_per_token", "down_per_token"], "bytes per generated token"),
             ("latency", ["latency_ms", "latency_link_ms"], "ms per token (loopback, emulated link)"),
             ("perplexity", ["perplexity"], "held-out perplexity")]
    for fname, keys, ylabel in specs:
        fig, ax = plt.subplots(figsize=(9, 4))
        width = 0.8 / len(keys)
        for j, k in enumerate(keys):
            vals = [rows[n].get(k) or 0.0 for n in names]
            ax.bar([i + j * width for i in range(len(names))], vals, width, label=k)
        ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.set_title(fname.replace("_", " "))
        fig.tight_layout()
        path = out / f"{fname}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "coexit-code-small"))
    ap.add_argument("--data", default=str(ROOT / "data" / "corpus" / "heldout.jsonl"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--link-prompts", type=int, default=6)
    ap.add_argument("--max-new", type=int, default=24)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.99])
    ap.add_argument("--propagate-targets", type=float, nargs="*", default=[0.9, 0.99])
    ap.add_argument("--lossless-targets", type=float, nargs="*", default=[0.9])
    ap.add_argument("--adaptive-targets", type=float, nargs="*", default=[0.99],
                    help="adaptive rows, each with the quality budget of collab@t on the calibration data")
    ap.add_argument("--rtts", type=float, nargs="*", default=[5, 25, 50, 100, 200],
                    help="RTTs (ms, 20 Mbit/s) for the latency-vs-RTT sweep (latency_vs_rtt.png)")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--calib-tokens", type=int, default=30000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    if not data.is_file():
        from training.corpus import build

        print(f"no held-out data at {data}: building the corpus into {data.parent} (pip fetches pinned wheels)")
        build(data.parent)
    model = coexit.load(args.model, dtype=torch.float32)
    cfg = model.config
    pairs, calib_texts = load_snippets(data, args.prompts, args.seed)
    edge_exits = cfg.edge_exit_layers
    print(f"model {shown(args.model)}: {cfg.num_hidden_layers} layers, exits {list(cfg.exit_layers)}, split "
          f"{cfg.split_layer}; {len(pairs)} held-out prompts x {args.max_new} tokens", flush=True)
    stats = collect(model, calib_texts, edge_exits, "max_prob", max_tokens=args.calib_tokens)
    policies = {}
    for target in args.targets:
        thr, rep = choose_thresholds(stats, edge_exits, target, "max_prob")
        policies[target] = ExitPolicy(thr)
    proc, address = start_cloud(args.model)
    rows: dict[str, dict] = {}
    try:
        client = EdgeClient(make_backend("torch", args.model), model.tokenizer, cloud=address, encoding="fp16",
                            draft_always=False)  # the lossless rows spell their drafting out in their policies
        never = ExitPolicy.never()
        modes = [("cloud-only", "cloud-only", never, "exact"), ("naive-split", "naive-split", never, "exact"),
                 ("edge-only", "standalone", never, "exact")]
        modes += [(f"collab@{t:g}", "collaborative", p, "exact") for t, p in policies.items()]
        modes += [(f"propagate@{t:g}", "collaborative", p, "propagate") for t, p in policies.items()
                  if t in args.propagate_targets]
        shipped = load_policy(args.model)  # the model's own exit_policy.json (coexit calibrate), as users get it
        if shipped is not None:
            modes.append(("shipped", "collaborative", shipped, "exact"))
        for t in args.adaptive_targets:  # the same calibration data and the budget collab@t uses there
            budget = evaluate(stats.conf, stats.agree, edge_exits, policies[t].thresholds).disagreement
            points = frontier(stats.conf, stats.agree, edge_exits, include=policies[t].thresholds)
            modes.append((f"adaptive@{t:g}", "collaborative",
                          AdaptivePolicy({}, points=points, budget=budget, split=cfg.split_layer), "exact"))
        for t in args.lossless_targets:  # drafts from the calibrated exits; "+split": else always from the split exit
            modes.append((f"lossless@{t:g}", "lossless", policies[t], "exact"))
            drafty = ExitPolicy({**policies[t].thresholds, cfg.split_layer: -math.inf})
            modes.append((f"lossless@{t:g}+split", "lossless", drafty, "exact"))
        for name, mode, policy, kv_fill in modes:
            t0 = time.perf_counter()
            rows[name] = run_mode(client, model, pairs, mode, policy, args.max_new, kv_fill)
            head = cfg.split_layer if name == "edge-only" else None
            use_policy = policy if mode == "collaborative" else None
            rows[name]["perplexity"], rows[name]["accuracy"] = perplexity(
                model, calib_texts[::-1], use_policy, head, args.ppl_tokens, propagate=kv_fill == "propagate")
            rows[name]["thresholds"] = {str(k): round(v, 4) for k, v in policy.thresholds.items()}
            if isinstance(policy, AdaptivePolicy):
                rows[name]["budget"] = policy.budget
            print(f"  {name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
        client.close()
    finally:
        proc.kill()
        proc.wait()

    # the same modes over an emulated 50 ms RTT, 20 Mbit/s link
    ok, how = netem_available()
    link_pairs = pairs[: args.link_prompts]
    link_note = ""
    try:
        if ok:
            with netem_namespace(50, 20) as (prefix, ip):
                proc, _ = start_cloud(args.model, extra_args=["--host", ip], prefix=prefix, health_host=ip)
                link_addr = f"{ip}:{proc.coexit_port}"
                link_note = "netns + tc netem, 50 ms RTT, 20 Mbit/s"
                _link_runs(rows, modes, link_addr, model, link_pairs, args)
                proc.kill()
        else:
            proc, address = start_cloud(args.model)
            host, port = address.split(":")
            proxy = DelayProxy(host, int(port), 50, 20)
            link_addr = proxy.start()
            link_note = f"userspace delay relay, 50 ms RTT, 20 Mbit/s ({how})"
            try:
                _link_runs(rows, modes, link_addr, model, link_pairs, args)
            finally:
                proxy.stop()
                proc.kill()
                proc.wait()
    except Exception as exc:  # the report still prints what it has
        link_note = f"emulated link skipped: {exc}"
    print(f"emulated link: {link_note}")

    sweep: dict = {}
    if args.rtts:  # latency vs RTT for the main modes, through the userspace relay
        wanted = {"cloud-only", f"collab@{max(args.targets):g}",
                  *(f"adaptive@{t:g}" for t in args.adaptive_targets),
                  *(f"lossless@{t:g}+split" for t in args.lossless_targets)}
        proc, address = start_cloud(args.model)
        try:
            sweep = rtt_sweep([m for m in modes if m[0] in wanted], address, model, link_pairs, args, out)
        finally:
            proc.kill()
            proc.wait()

    base_lat = rows["cloud-only"]["latency_ms"]
    base_link = rows["cloud-only"].get("latency_link_ms")
    head = ("mode", "agree", "acc", "exact", "ppl", "edge share", "accept", "cloud compute", "decode compute",
            "up B/tok", "down B/tok", "ms/tok loopback", "ms/tok link", "link vs cloud-only", "agree link",
            "edge share link")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        link = r.get("latency_link_ms")
        link_s = f"{link:.1f}" if link else "n/a"
        rel = f"{link / base_link - 1:+.1%}" if link and base_link else "n/a"
        acc = f"{r['acceptance']:.1%}" if r.get("acceptance") is not None else "n/a"
        lines.append(f"| {name} | {r['agreement']:.1%} | {r['accuracy']:.1%} | {r['exact_match']:.1%} | "
                     f"{r['perplexity']:.2f} | {r['edge_share']:.1%} | {acc} | "
                     f"{r['cloud_compute']:.1%} ({r['cloud_compute'] - 1:+.1%}) | {r['decode_compute']:.1%} | "
                     f"{r['up_per_token']:.0f} | {r['down_per_token']:.0f} | {r['latency_ms']:.2f} | "
                     f"{link_s} | {rel} | {_pct(r.get('agreement_link'))} | {_pct(r.get('edge_share_link'))} |")
    table = "\n".join(lines)
    if sweep:
        rtts = list(next(iter(sweep.values())))
        sweep_lines = ["| mode | " + " | ".join(f"{r:g} ms" for r in rtts) + " |", "|" + "---|" * (len(rtts) + 1)]
        sweep_lines += [f"| {name} | " + " | ".join(f"{v:.1f}" for v in by.values()) + " |"
                        for name, by in sweep.items()]
        table += ("\n\nLatency per token (ms) against RTT, 20 Mbit/s, userspace relay, "
                  f"{len(link_pairs)} prompts (`latency_vs_rtt.png`):\n\n" + "\n".join(sweep_lines))
    text = (f"# coexit evaluation report\n\nModel: `{shown(args.model)}`; held-out data: `{shown(args.data)}` "
            f"(packages never seen in training); {len(pairs)} prompts x up to {args.max_new} new tokens, greedy; "
            f"thresholds calibrated on other held-out files. Cloud compute is layer-token computations relative "
            f"to cloud-only serving of the same sequences, prompts included; decode compute leaves out the prompt "
            f"rows (the same in every mode) and is per generated token, against cloud-only's L layers per token; "
            f"a propagated layer-row counts {kv_fill_cost(cfg):.3f} of one (its K/V projections). acc: held-out "
            f"top-1 next-token accuracy, teacher-forced. accept: lossless drafts accepted by the cloud, of those "
            f"verified. propagate@t: collab@t with kv_fill=propagate. lossless@t: drafts from the exits calibrated "
            f"at t, else a fallback; +split: else always a draft from the split exit (max_drafts "
            f"{inspect.signature(EdgeClient).parameters['max_drafts'].default}). Loopback cloud-only latency "
            f"{base_lat:.2f} ms/token. Emulated link: {link_note}."
            f"\n\n{table}\n\nAnchors: {ANCHORS}\n")
    print("\n" + table + "\n\n" + ANCHORS)
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps({"rows": rows, "link": link_note,
                                                 "latency_vs_rtt": {k: {str(r): v for r, v in by.items()}
                                                                    for k, by in sweep.items()}}, indent=2) + "\n")
    for p in plots(rows, out):
        print(f"wrote {p}")
    print(f"wrote {out / 'report.md'}")
    return 0


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _link_runs(rows, modes, address, model, pairs, args) -> None:
    client = EdgeClient(make_backend("torch", args.model), model.tokenizer, cloud=address, encoding="fp16",
                        deadline_s=30.0, draft_always=False)
    for name, mode, policy, kv_fill in modes:
        r = run_mode(client, model, pairs, mode, fresh(policy), args.max_new, kv_fill)
        rows[name].update(latency_link_ms=r["latency_ms"], agreement_link=r["agreement"],
                          edge_share_link=r["edge_share"])
        print(f"  {name} over the link: {r['latency_ms']:.1f} ms/token, agreement {r['agreement']:.1%}, edge "
              f"share {r['edge_share']:.1%}", flush=True)
    client.close()


def fresh(policy: ExitPolicy) -> ExitPolicy:
    """An adaptive policy starts each link without the estimates of the last one."""
    if isinstance(policy, AdaptivePolicy):
        return AdaptivePolicy({}, policy.criterion, points=policy.points, budget=policy.budget, split=policy.split)
    return policy


def rtt_sweep(modes, address: str, model, pairs, args, out: Path) -> dict[str, dict[float, float]]:
    """ms/token of each mode through the userspace relay at each RTT (20 Mbit/s), and the plot."""
    host, port = address.rsplit(":", 1)
    sweep: dict[str, dict[float, float]] = {name: {} for name, *_ in modes}
    for rtt in args.rtts:
        proxy = DelayProxy(host, int(port), rtt, 20)
        client = EdgeClient(make_backend("torch", args.model), model.tokenizer, cloud=proxy.start(), encoding="fp16",
                            deadline_s=30.0, draft_always=False)
        try:
            for name, mode, policy, kv_fill in modes:
                sweep[name][rtt] = run_mode(client, model, pairs, mode, fresh(policy), args.max_new,
                                            kv_fill)["latency_ms"]
                print(f"  RTT {rtt:g} ms, {name}: {sweep[name][rtt]:.1f} ms/token", flush=True)
        finally:
            client.close()
            proxy.stop()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, by_rtt in sweep.items():
        ax.plot(list(by_rtt), list(by_rtt.values()), marker="o", label=name)
    ax.set_xlabel("round-trip time (ms), 20 Mbit/s")
    ax.set_ylabel("ms per generated token")
    ax.set_title("latency vs RTT (emulated link, held-out prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency_vs_rtt.png", dpi=110)
    plt.close(fig)
    return sweep


if __name__ == "__main__":
    sys.exit(main())
