"""Multi-round chat over one growing stream: recall, collapse and cache turnover (paper Table 4).

Even rounds tell the model one fact ("Remember this: the code of Name is NNNN."), odd rounds
ask for the code told d rounds earlier, d cycling over --distances.  All of it, questions and
the model's own replies, stays in the stream, which runs far past the budget.  Per round:
  - correct (question rounds): the asked code appears in the reply;
  - degenerate: an empty reply, a copy of one of the 5 replies before the previous one (the
    answer to a question about the fact just told rightly repeats its confirmation), or a
    reply whose words are mostly one repeated 3-gram; the stream has *collapsed* from the
    first round after which at least half of every 10 replies are degenerate;
  - turnover: the share of cached tokens (sinks excluded) older than 4 budgets of stream.
InfMLLM is swept over the recency bias (0 lets old saddles squat the cache), next to
StreamingLLM and H2O at the same budget (configurations of bench/configs.py) and a full cache
(up to the trained 8k context).

    python -m bench multiround --quick     # 60 rounds, budget 256 (minutes)
    python -m bench multiround             # 300 rounds, budget 512

Writes bench/results/multiround.json, multiround.csv and multiround.png.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np

from bench.common import (
    FULL_N_CTX,
    NAMES,
    add_out,
    odd_distance,
    progress,
    pyplot,
    save_figure,
    write_results,
    wrote,
)
from bench.configs import CONFIGS
from infmllm_gguf import ContextFullError, InfMLLM, KVPolicy, Llama

FACT_NAMES = NAMES[:20]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="60 rounds, budget 256, 3 biases")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--biases", type=float, nargs="+", default=[0.0, 1e-4, 1e-3, 1e-2])
    ap.add_argument("--distances", type=odd_distance, nargs="+", default=[1, 5, 21, 61])
    ap.add_argument("--seed", type=int, default=0)
    add_out(ap, "multiround")


def fact_name(r: int) -> str:
    return f"{FACT_NAMES[r % len(FACT_NAMES)]} {r // len(FACT_NAMES) + 1}"


def degenerate(reply: str, previous: list[str]) -> bool:
    words = reply.split()
    if not words or reply in previous[-6:-1]:
        return True
    top = Counter(tuple(words[i : i + 3]) for i in range(len(words) - 2)).most_common(1)
    return bool(top) and top[0][1] >= 2 and 3 * top[0][1] >= len(words) / 2  # one 3-gram, half the words


def collapse_round(flags: list[bool], window: int = 10) -> int | None:
    for r in range(len(flags) - window + 1):
        if all(np.mean(flags[s : s + window]) >= 0.5 for s in range(r, len(flags) - window + 1)):
            return r
    return None


def run_config(
    label: str, policy: KVPolicy, budget: int, rounds: int, distances: list[int], seed: int
) -> dict:
    rng = np.random.default_rng(seed)
    codes = [int(c) for c in rng.integers(1000, 10000, size=rounds)]
    n_ctx = policy.capacity if policy.evicts else FULL_N_CTX
    llm = Llama(n_ctx=n_ctx, kv_policy=policy, seed=seed)
    llm.feed("A friendly assistant remembers every code it is told.\n")
    replies: list[str] = []
    log = []
    with progress(rounds, label) as bar:
        for r in range(rounds):
            bar.update()
            asked = r - distances[(r // 2) % len(distances)]  # an even (fact) round for odd r
            if r % 2 == 0:
                turn = f"Remember this: the code of {fact_name(r)} is {codes[r]}."
            else:
                asked = asked if asked >= 0 else r - 1
                turn = f"What is the code of {fact_name(asked)}?"
            try:
                reply = llm.ask(turn, max_tokens=16)
            except ContextFullError:
                break  # the full-cache reference ends at the trained context
            stats = llm.kv_stats()
            ages = stats["n_streamed"] - llm.cached_stream_indices()[4:]
            log.append(
                {
                    "round": r,
                    "distance": r - asked if r % 2 else 0,
                    "correct": bool(r % 2) and str(codes[asked]) in reply,
                    "degenerate": degenerate(reply, replies),
                    "turnover_old_share": float(np.mean(ages > 4 * budget)),
                    "n_streamed": stats["n_streamed"],
                    "reply": reply,
                }
            )
            replies.append(reply)
    llm.close()
    flags = [x["degenerate"] for x in log]
    asked_rounds = [x for x in log if x["distance"]]
    return {
        "config": label,
        "accuracy": float(np.mean([x["correct"] for x in asked_rounds])),
        "accuracy_by_distance": {
            str(d): float(np.mean([x["correct"] for x in asked_rounds if x["distance"] == d]))
            for d in sorted({x["distance"] for x in asked_rounds} & set(distances))
        },
        "degenerate_share": float(np.mean(flags)),
        "collapse_round": collapse_round(flags),
        "old_share_last": log[-1]["turnover_old_share"],
        "n_streamed": log[-1]["n_streamed"],
        "rounds": log,
    }


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.rounds, args.budget, args.biases = 60, 256, [0.0, 1e-3, 1e-2]

    configs: list[tuple[str, KVPolicy]] = [
        (name, CONFIGS[name].build(args.budget)[0]) for name in ("full", "streamingllm", "h2o")
    ] + [(f"infmllm bias={b:g}", InfMLLM(args.budget, bias=b)) for b in args.biases]
    results = [
        run_config(label, p, args.budget, args.rounds, args.distances, args.seed) for label, p in configs
    ]
    for res in results:
        by_d = ", ".join(f"d={d}: {a:.2f}" for d, a in res["accuracy_by_distance"].items())
        print(
            f"{res['config']:>20}: recall {res['accuracy']:.2f} ({by_d}), "
            f"degenerate {res['degenerate_share']:.2f}, "
            f"collapse at round {res['collapse_round']}, old share {res['old_share_last']:.2f}"
        )

    rows = [{"config": res["config"], **x} for res in results for x in res["rounds"]]
    summary = [{k: v for k, v in res.items() if k != "rounds"} for res in results]
    out = write_results(
        args.out,
        {"budget": args.budget, "rounds": args.rounds, "distances": args.distances, "configs": summary},
        rows,
        ["config", "round", "distance", "correct", "degenerate", "turnover_old_share", "reply"],
    )
    plot(results, out.with_suffix(".png"), args.budget)
    wrote(out, "json", "csv", "png")
    return 0


def plot(results: list[dict], path: Path, budget: int) -> None:
    fig, axes = pyplot().subplots(1, 3, figsize=(16, 4))
    for res in results:
        log = res["rounds"]
        xs = [x["round"] for x in log]
        k = 10  # moving average over 10 rounds
        questions = [x for x in log if x["distance"]]
        correct = np.convolve([x["correct"] for x in questions], np.ones(k) / k, mode="valid")
        degen = np.convolve([x["degenerate"] for x in log], np.ones(k) / k, mode="valid")
        axes[0].plot([x["round"] for x in questions][k - 1 :], correct, label=res["config"])
        axes[1].plot(xs[k - 1 :], degen, label=res["config"])
        axes[2].plot(xs, [x["turnover_old_share"] for x in log], label=res["config"])
    axes[0].set_title(f"recall (mean of 10 questions), budget {budget}")
    axes[1].set_title("degenerate replies (10-round mean)")
    axes[2].set_title(f"cached tokens older than {4 * budget} stream tokens")
    for ax in axes:
        ax.set_xlabel("round")
        ax.set_ylim(-0.05, 1.05)
    axes[0].legend(fontsize=8)
    save_figure(fig, path)
