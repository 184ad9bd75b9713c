"""Passkey retrieval: accuracy per configuration, budget, stream length and key depth.

A 5-digit key is planted at several depths of KJV haystacks 2x ... 16x the budget, then asked
for.  Eviction here is question-agnostic (the question comes after the haystack), so a key
that scrolls out of the recent window survives only if it was kept as a saddle.  "full" holds
the whole stream (n_ctx = stream length) and shows what the model itself can do.

    python -m bench passkey --quick    # budget 256, 2x/4x, 3 depths, 2 keys (minutes)
    python -m bench passkey            # budgets 512 1024, 2x..16x, 5 depths, 5 keys
    python -m bench passkey --policies infmllm infmllm+fixed --out bench/results/reposition_passkey
                                       # configurations by name (bench/configs.py)

Writes bench/results/passkey.json, passkey.csv and passkey.png (heat map).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.common import add_out, pyplot, save_figure, write_results, wrote
from bench.configs import CONFIGS, add_policies
from infmllm_gguf import Llama
from infmllm_gguf.evaluate import run_passkey


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="budget 256, 2x/4x, 3 depths, 2 keys")
    ap.add_argument("--budgets", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--multiples", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--trials", type=int, default=5, help="keys per depth")
    add_policies(ap, ["full", "streamingllm", "h2o", "snapkv", "infmllm"])
    ap.add_argument("--max-full-ctx", type=int, default=8192, help="longest stream 'full' is run on")
    add_out(ap, "passkey")


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.budgets, args.multiples, args.depths, args.trials = [256], [2, 4], [0.1, 0.5, 0.9], 2

    rows = []
    for budget in args.budgets:
        for multiple in args.multiples:
            length = budget * multiple
            for name in args.policies:
                config = CONFIGS[name]
                if config.full and length > args.max_full_ctx:
                    continue
                policy, recall = config.build(budget)
                n_ctx = length + 16 if config.full else policy.capacity
                llm = Llama(n_ctx=n_ctx, kv_policy=policy, recall=recall, seed=0)
                result = run_passkey(llm, length, args.depths, args.trials)
                llm.close()
                for depth in args.depths:
                    hits = [t["correct"] for t in result["trials"] if t["depth"] == depth]
                    rows.append(
                        {
                            "policy": name,
                            "budget": budget,
                            "length": length,
                            "depth": depth,
                            "accuracy": float(np.mean(hits)),
                            "trials": len(hits),
                        }
                    )
                print(f"{name:>13} budget {budget:>5} length {length:>6}: accuracy {result['accuracy']:.2f}")

    out = write_results(
        args.out,
        {"depths": args.depths, "trials_per_depth": args.trials},
        rows,
        ["policy", "budget", "length", "depth", "accuracy", "trials"],
    )
    plot(rows, args.depths, out.with_suffix(".png"))
    wrote(out, "json", "csv", "png")
    return 0


def plot(rows: list[dict], depths: list[float], path: Path) -> None:
    budgets = sorted({r["budget"] for r in rows})
    n_labels = len(rows) // len(depths) // len(budgets)
    fig, axes = pyplot().subplots(1, len(budgets), figsize=(6 * len(budgets), 1.5 + 0.35 * n_labels))
    axes = np.atleast_1d(axes)
    for ax, budget in zip(axes, budgets):
        mine = [r for r in rows if r["budget"] == budget]
        labels = list(dict.fromkeys((r["policy"], r["length"]) for r in mine))
        grid = np.full((len(labels), len(depths)), np.nan)
        for r in mine:
            grid[labels.index((r["policy"], r["length"])), depths.index(r["depth"])] = r["accuracy"]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_yticks(range(len(labels)), [f"{p} @ {n}" for p, n in labels])
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7)
        ax.set_xlabel("depth of the key in the stream")
        ax.set_title(f"passkey accuracy, budget {budget}")
    save_figure(fig, path)
