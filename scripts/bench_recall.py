"""Passkey retrieval with the recall tier: a 5-digit key planted at several depths of KJV
haystacks 4x ... 32x the budget, asked for at the end (one turn, so one recall).  Each key has
its own stretch of KJV (a random start), so the keys of one length do not share the ending the
model reads just before the question; the stream opens with the passkey test's usual preamble
("There is an important info hidden ... I will quiz you about the important information
there.") unless --no-preamble; the answer may take 16 tokens ("the pass key. 52586 is ...":
correct when its first digits are the key).

Runs, side by side: the policy alone (no recall), the policy with `Recall()` and with
`Recall(reencode=True)` (the cached text from the recalled pages on decoded again), the latter
with `adjacent=True` (a chosen page brings its adjacent pages above the median), a control whose
recall brings back random stored pages into the same reserve (what the selection is worth), one
whose recall brings back the needle's own pages (what any selection could reach: the rest is
the model's), and the full cache (n_ctx = stream length) where it fits, as the model's own
reference.  With recall, each key also records whether a page of the needle came back, and
whether all of the needle was in the cache when it answered.

    python scripts/bench_recall.py --quick    # budget 256, 4x/8x, 3 depths, 1 key (minutes)
    python scripts/bench_recall.py            # budget 512, 4x..32x, 3 depths, 2 keys

Writes bench/results/recall_passkey.json, .csv and .png (accuracy per run and length).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from results_io import RESULTS, merge_rows, write_results

from infmllm_gguf import Llama, Recall
from infmllm_gguf.cli import run_passkey
from infmllm_gguf.policies import make_policy

RUNS = (
    "recall",
    "recall, re-encoded",
    "recall, re-encoded, adjacent",
    "no recall",
    "random pages",
    "needle pages",
    "full",
)


def random_pages(llm: Llama, seed: int) -> None:
    """Make the stream's recall pick random stored pages (same room, same neighbours rule)."""
    store = llm._stream.store
    rng = np.random.default_rng(seed)

    def pick(queries: np.ndarray, room: int, shortlist: int = 0) -> list[int]:
        chosen, used = [], 0
        for pid in rng.permutation(store.page_ids()):
            n = store._pages[int(pid)].n
            if used + n > room:
                break
            chosen.append(int(pid))
            used += n
        return chosen

    store.select = pick


def needle_pages(llm: Llama) -> None:
    """Make the stream's recall pick the stored pages holding the needle ("pass key" occurs only
    there and in the question, which is never evicted), each with its next and previous page as
    the selection takes them, into the same room."""
    store = llm._stream.store
    marker = np.array(llm.tokenize(" pass key", add_bos=False))

    def pick(queries: np.ndarray, room: int, shortlist: int = 0) -> list[int]:
        hist = llm.history
        windows = np.lib.stride_tricks.sliding_window_view(hist, len(marker))
        at = np.flatnonzero((windows == marker).all(axis=1))
        return store.with_neighbours(list(dict.fromkeys(int(i) // store.page for i in at)), room)

    store.select = pick


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--policy", default="infmllm")
    ap.add_argument("--multiples", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--trials", type=int, default=2, help="keys per depth with recall")
    ap.add_argument("--control-trials", type=int, default=1, help="keys per depth for the other runs")
    ap.add_argument("--max-full-ctx", type=int, default=4096, help="longest stream 'full' is run on")
    ap.add_argument("--max-control-multiple", type=int, default=16, help="longest random-page control")
    ap.add_argument(
        "--runs",
        nargs="+",
        default=list(RUNS),
        choices=RUNS,
        help="runs to do; the rows of others are kept from an earlier run at --out",
    )
    ap.add_argument("--no-preamble", action="store_true", help="the earlier form: no opening preamble")
    ap.add_argument("--out", default=str(RESULTS / "recall_passkey"))
    args = ap.parse_args()
    if args.quick:
        args.budget, args.multiples, args.trials, args.control_trials = 256, [4, 8], 1, 1

    rows = []
    for multiple in args.multiples:
        length = args.budget * multiple
        runs = [
            ("recall", args.trials),
            ("recall, re-encoded", args.trials),
            ("recall, re-encoded, adjacent", args.trials),
            ("no recall", args.control_trials),
        ]
        if multiple <= args.max_control_multiple:
            runs.append(("random pages", args.control_trials))
        runs.append(("needle pages", args.control_trials))
        if length <= args.max_full_ctx:
            runs.append(("full", args.control_trials))
        runs = [(run, trials) for run, trials in runs if run in args.runs]
        for run, trials in runs:
            policy = make_policy("full" if run == "full" else args.policy, budget=args.budget)
            n_ctx = length + 16 if run == "full" else policy.capacity
            with_recall = run not in ("no recall", "full")
            recall = (
                Recall(reencode=run.startswith("recall, re-encoded"), adjacent=run.endswith("adjacent"))
                if with_recall
                else None
            )
            llm = Llama(n_ctx=n_ctx, kv_policy=policy, seed=0, recall=recall)
            if run == "random pages":
                random_pages(llm, seed=multiple)
            elif run == "needle pages":
                needle_pages(llm)
            start = time.perf_counter()
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
            seconds = time.perf_counter() - start
            stats = llm.kv_stats()
            llm.close()
            for depth in args.depths:
                mine = [t for t in result["trials"] if t["depth"] == depth]
                hits = [t["correct"] for t in mine]
                rows.append(
                    {
                        "run": run,
                        "policy": policy.name,
                        "budget": args.budget,
                        "length": length,
                        "depth": depth,
                        "accuracy": float(np.mean(hits)),
                        "needle_recalled": (
                            float(np.mean([t["needle_recalled"] for t in mine])) if recall else None
                        ),
                        "needle_whole": float(np.mean([t["needle_whole"] for t in mine])) if recall else None,
                        "trials": len(hits),
                        "seconds_per_trial": seconds / len(result["trials"]),
                        "store_mb": stats.get("store_mb", 0.0),
                        "pages_stored": stats.get("pages_stored", 0),
                        "keys": mine,  # per key: the answer, and whether the needle came back (JSON)
                    }
                )
            print(
                f"{run:>13} length {length:>6}: accuracy {result['accuracy']:.2f} ({seconds:.0f} s)",
                flush=True,
            )

    meta = {
        "budget": args.budget,
        "policy": args.policy,
        "depths": args.depths,
        "recall": repr(Recall()),
        "preamble": not args.no_preamble,
    }
    rows = merge_rows(args.out, meta, rows, ("run", "length", "depth"))
    rows.sort(key=lambda r: (r["length"], RUNS.index(r["run"]), r["depth"]))
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
    print(f"wrote {out}.json/.csv/.png")
    return 0


def plot(rows: list[dict], path: Path, series: str = "run", value: str = "accuracy", title: str = "") -> None:
    """Passkey accuracy against stream length, a line per value of `series`, averaged over the
    rows' `value` at each length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
