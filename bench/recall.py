"""Passkey retrieval with the recall tier, side by side with the policy alone and the full cache.

A 5-digit key is planted at several depths of KJV haystacks 4x ... 32x the budget, asked for at
the end (one turn, so one recall).  Each key has its own stretch of KJV (a random start), so
the keys of one length do not share the ending the model reads just before the question; the
stream opens with the passkey test's usual preamble ("There is an important info hidden ... I
will quiz you about the important information there.") unless --no-preamble; the answer may
take 16 tokens ("the pass key. 52586 is ...": correct when its first digits are the key).

Runs (each a configuration of bench/configs.py): the policy with `Recall()` (NAME+recall-turn),
with `Recall(reencode=True)` (the cached text from the recalled pages on decoded again), the
latter with `adjacent=True` (a chosen page brings its adjacent pages above the median), the
policy alone (no recall), and the full cache (n_ctx = stream length) where it fits, as the
model's own reference.  With recall, each key also records whether a page of the needle came
back, and whether all of the needle was in the cache when it answered.

    python -m bench recall --quick    # budget 256, 4x/8x, 3 depths, 1 key (minutes)
    python -m bench recall            # budget 512, 4x..32x, 3 depths, 2 keys

Writes bench/results/recall_passkey.json, .csv and .png (accuracy per run and length).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.common import Stopwatch, add_out, merge_rows, pyplot, save_figure, write_results, wrote
from bench.configs import CONFIGS, EVICTING
from infmllm_gguf import Llama, Recall
from infmllm_gguf.evaluate import run_passkey

# each run's configuration: the policy's name followed by this ("" the policy alone), or "full"
RUNS = {
    "recall": "+recall-turn",
    "recall, re-encoded": "+recall-reencode",
    "recall, re-encoded, adjacent": "+recall-reencode-adjacent",
    "no recall": "",
    "full": "full",
}


def add_stream_arguments(
    ap: argparse.ArgumentParser, trials: int | None = None, trials_help: str = ""
) -> None:
    """The options of the passkey streams the recall benchmarks share: the policy at its
    budget, the opening preamble, and with `trials` the stream lengths (multiples of the
    budget), the keys' depths and keys per depth."""
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--policy", default="infmllm", choices=EVICTING)
    ap.add_argument("--no-preamble", action="store_true", help="the earlier form: no opening preamble")
    if trials is not None:
        ap.add_argument("--multiples", type=int, nargs="+", default=[4, 8, 16, 32])
        ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
        ap.add_argument("--trials", type=int, default=trials, help=trials_help)


def stream_meta(args: argparse.Namespace, recall: Recall) -> dict:
    """The settings of a run's passkey streams, as its results record them."""
    return {
        "budget": args.budget,
        "policy": args.policy,
        "depths": args.depths,
        "recall": repr(recall),
        "preamble": not args.no_preamble,
    }


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="budget 256, 4x/8x, 3 depths, 1 key")
    add_stream_arguments(ap, 2, "keys per depth with recall")
    ap.add_argument("--control-trials", type=int, default=1, help="keys per depth for the other runs")
    ap.add_argument("--max-full-ctx", type=int, default=4096, help="longest stream 'full' is run on")
    ap.add_argument(
        "--runs",
        nargs="+",
        default=list(RUNS),
        choices=list(RUNS),
        help="runs to do; the rows of others are kept from an earlier run at --out",
    )
    add_out(ap, "recall_passkey")


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.budget, args.multiples, args.trials, args.control_trials = 256, [4, 8], 1, 1

    rows = []
    for multiple in args.multiples:
        length = args.budget * multiple
        for run_name in [r for r in RUNS if r in args.runs]:
            if run_name == "full" and length > args.max_full_ctx:
                continue
            rows += run_streams(args, run_name, length)
    write(args, rows)
    return 0


def run_streams(args: argparse.Namespace, run_name: str, length: int) -> list[dict]:
    """One run's passkey streams of one length: a row per depth, and a line on stdout."""
    suffix = RUNS[run_name]
    config = CONFIGS["full" if suffix == "full" else args.policy + suffix]
    trials = args.trials if config.recall is not None else args.control_trials
    policy, recall = config.build(args.budget)
    n_ctx = length + 16 if config.full else policy.capacity
    llm = Llama(n_ctx=n_ctx, kv_policy=policy, seed=0, recall=recall)
    clock = Stopwatch()
    result = run_passkey(
        llm,
        length,
        args.depths,
        trials,
        spread=True,
        answer_tokens=16,
        paragraphs=True,
        preamble=not args.no_preamble,
    )
    seconds = clock.seconds
    stats = llm.kv_stats()
    llm.close()
    rows = []
    for depth in args.depths:
        mine = [t for t in result["trials"] if t["depth"] == depth]
        rows.append(
            {
                "run": run_name,
                "policy": policy.name,
                "budget": args.budget,
                "length": length,
                "depth": depth,
                "accuracy": float(np.mean([t["correct"] for t in mine])),
                "needle_recalled": float(np.mean([t["needle_recalled"] for t in mine])) if recall else None,
                "needle_whole": float(np.mean([t["needle_whole"] for t in mine])) if recall else None,
                "trials": len(mine),
                "seconds_per_trial": seconds / len(result["trials"]),
                "store_mb": stats.get("store_mb", 0.0),
                "pages_stored": stats.get("pages_stored", 0),
                "keys": mine,  # per key: the answer, and whether the needle came back (JSON)
            }
        )
    print(
        f"{run_name:>13} length {length:>6}: accuracy {result['accuracy']:.2f} ({seconds:.0f} s)",
        flush=True,
    )
    return rows


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    """Merge with an earlier run's rows at --out, sort, and write the JSON, CSV and figure."""
    meta = stream_meta(args, Recall())
    rows = merge_rows(args.out, meta, rows, ("run", "length", "depth"))
    order = list(RUNS)  # an earlier run's rows of runs no longer made go last
    rows.sort(
        key=lambda r: (r["length"], order.index(r["run"]) if r["run"] in order else len(order), r["depth"])
    )
    out = write_results(
        args.out,
        meta,
        rows,
        [
            "run",
            "policy",
            "budget",
            "length",
            "depth",
            "accuracy",
            "needle_recalled",
            "needle_whole",
            "trials",
            "seconds_per_trial",
            "store_mb",
            "pages_stored",
        ],
    )
    plot(rows, out.with_suffix(".png"))
    wrote(out, "json", "csv", "png")


def plot(rows: list[dict], path: Path, series: str = "run", value: str = "accuracy", title: str = "") -> None:
    """Passkey accuracy against stream length, a line per value of `series`, averaged over the
    rows' `value` at each length."""
    fig, ax = pyplot().subplots(figsize=(7, 4))
    for name in dict.fromkeys(r[series] for r in rows):
        mine = [r for r in rows if r[series] == name]
        lengths = sorted({r["length"] for r in mine})
        acc = [np.mean([r[value] for r in mine if r["length"] == n]) for n in lengths]
        ax.plot(lengths, acc, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("stream length (tokens)")
    ax.set_ylabel("passkey accuracy (mean over depths)")
    ax.set_title(title or f"passkey with the recall tier, {rows[0]['policy']} budget {rows[0]['budget']}")
    ax.legend()
    save_figure(fig, path)
