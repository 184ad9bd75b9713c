"""Multi-round facts with the recall tier: a fact told d rounds earlier, asked for later.

A fact told d rounds earlier (d = 5, 21, 61) is asked for in completion form, with and without
recall, against the full cache.  One growing transcript, the same for every configuration.
Even rounds tell a fact:
  "User: Remember this: the code of Alice is 4821.\\nAssistant: Noted: the code of Alice is 4821.\\n"
odd rounds ask for the fact told d rounds earlier, d cycling over --distances:
  "User: What is the code of Alice?\\nAssistant: The code of Alice is"
and the answer is generated (greedy, a turn: one recall); then the stream is rewound and the
true code is fed, so that every configuration streams the same text.  Completion form,
because the 135M model copies from its context there and hardly at all in chat form (see the
multiround benchmark), and each name is told once, so that the question's words point at one
fact.

Each policy runs alone (NAME), with `Recall()` (NAME+recall), with `Recall(reencode=True)`
(NAME+recall-reencode) and with `Recall(reencode=True, adjacent=True)`
(NAME+recall-reencode-adjacent), each with `score=` --score: the configurations
NAME+recall-turn, NAME+recall-reencode and NAME+recall-reencode-adjacent of bench/configs.py.

    python -m bench recall-facts --quick   # 80 rounds (minutes)
    python -m bench recall-facts           # 180 rounds, budget 256
    python -m bench recall-facts --score attention --out bench/results/recall_facts_attention

Writes bench/results/recall_facts.json, .csv and .png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.common import (
    FULL_N_CTX,
    NAMES,
    Stopwatch,
    add_out,
    grouped_bars,
    odd_distance,
    progress,
    pyplot,
    save_figure,
    write_results,
    wrote,
)
from bench.configs import CONFIGS, Config
from infmllm_gguf import POLICIES, Llama, Recall
from infmllm_gguf.recall import PeakScorer

# the label of each recall run (NAME+label) and its configuration (NAME+suffix)
RECALL_RUNS = {
    "recall": "recall-turn",
    "recall-reencode": "recall-reencode",
    "recall-reencode-adjacent": "recall-reencode-adjacent",
}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="80 rounds")
    ap.add_argument("--rounds", type=int, default=180)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--distances", type=odd_distance, nargs="+", default=[5, 21, 61])
    ap.add_argument(
        "--policies",
        nargs="+",
        default=["streamingllm", "infmllm"],
        choices=[p for p in POLICIES if p != "full"],
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--score", default="peak", choices=Recall.SCORES, help="the recall's page score")
    add_out(ap, "recall_facts")


def run_config(label: str, config: Config, args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    n_facts = (args.rounds + 1) // 2
    if n_facts > len(NAMES):
        raise SystemExit(f"--rounds {args.rounds} needs {n_facts} names, there are {len(NAMES)}")
    names = [str(n) for n in rng.permutation(NAMES)[:n_facts]]
    codes = [str(c) for c in rng.integers(1000, 10000, size=n_facts)]
    policy, recall = config.build(args.budget)
    llm = Llama(n_ctx=FULL_N_CTX if config.full else policy.capacity, kv_policy=policy, seed=0, recall=recall)
    llm.feed("A conversation. The assistant remembers every code it is told.\n", add_bos=True)
    log = []
    clock = Stopwatch()
    with progress(args.rounds, label) as bar:
        for r in range(args.rounds):
            bar.update()
            if r % 2 == 0:
                name, code = names[r // 2], codes[r // 2]
                llm.feed(
                    f"User: Remember this: the code of {name} is {code}.\n"
                    f"Assistant: Noted: the code of {name} is {code}.\n",
                    add_bos=False,
                )
                continue
            d = args.distances[(r // 2) % len(args.distances)]
            if r - d < 0:
                continue
            name, code = names[(r - d) // 2], codes[(r - d) // 2]
            llm.feed(f"User: What is the code of {name}?\nAssistant: The code of {name} is", add_bos=False)
            mark = llm.n_streamed
            answer = llm.generate_text(max_tokens=6)
            recalled = len(llm.recalled())
            llm.rewind(mark)
            llm.feed(f" {code}.\n", add_bos=False)
            log.append(
                {
                    "config": label,
                    "round": r,
                    "distance": d,
                    "correct": "".join(c for c in answer if c.isdigit()).startswith(code),
                    "answer": answer.strip(),
                    "pages_recalled": recalled,
                    "n_streamed": llm.n_streamed,
                }
            )
    seconds = clock.seconds
    stats = llm.kv_stats()
    llm.close()
    return {
        "config": label,
        "accuracy_by_distance": {
            str(d): float(np.mean([x["correct"] for x in log if x["distance"] == d])) for d in args.distances
        },
        "questions": len(log),
        "n_streamed": stats["n_streamed"],
        "seconds": seconds,
        "store_mb": stats.get("store_mb", 0.0),
        "rounds": log,
    }


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.rounds = 80
    configs: list[tuple[str, Config]] = [("full", CONFIGS["full"])]
    for name in args.policies:
        configs.append((name, CONFIGS[name]))
        for label, suffix in RECALL_RUNS.items():
            configs.append((f"{name}+{label}", CONFIGS[f"{name}+{suffix}"].with_recall(score=args.score)))
    results = [run_config(label, config, args) for label, config in configs]
    for res in results:
        by_d = ", ".join(f"d={d}: {a:.2f}" for d, a in res["accuracy_by_distance"].items())
        print(f"{res['config']:>20}: {by_d} ({res['questions']} questions, {res['seconds']:.0f} s)")

    rows = [x for res in results for x in res["rounds"]]
    summary = [{k: v for k, v in res.items() if k != "rounds"} for res in results]
    meta = {
        "budget": args.budget,
        "rounds": args.rounds,
        "distances": args.distances,
        "sample": PeakScorer.SAMPLE,
        "score": args.score,
        "configs": summary,
    }
    columns = ["config", "round", "distance", "correct", "answer", "pages_recalled", "n_streamed"]
    out = write_results(args.out, meta, rows, columns)
    plot(results, out.with_suffix(".png"), args)
    wrote(out, "json", "csv", "png")
    return 0


def plot(results: list[dict], path: Path, args: argparse.Namespace) -> None:
    fig, ax = pyplot().subplots(figsize=(8, 4))
    bars = {res["config"]: [res["accuracy_by_distance"][str(d)] for d in args.distances] for res in results}
    grouped_bars(ax, bars, [f"told {d} rounds earlier" for d in args.distances])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("codes answered")
    ax.set_title(f"facts across rounds, budget {args.budget}, {args.rounds} rounds")
    ax.legend(fontsize=8)
    save_figure(fig, path)
