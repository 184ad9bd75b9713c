"""Choose InfMLLM's defaults by streaming perplexity: one knob at a time around a base setting.

The knobs: recent fraction, retrieval window, local window, bias; next to full context,
StreamingLLM and H2O on the same tokens.  Tune on KJV; check the winner on the Jargon File
(never tuned on).

    python -m bench sweep-infmllm --budgets 256 512 --tokens 8000          # tune (KJV)
    python -m bench sweep-infmllm --text jargon --only-base --budgets 256 512  # check

Writes bench/results/sweep_<text>.json and .csv.  "gap_closed" is the share of the
StreamingLLM -> full-context perplexity gap that a setting closes (negative: worse than
StreamingLLM).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, write_results, wrote
from bench.configs import CONFIGS
from infmllm_gguf import InfMLLM, KVPolicy, Llama
from infmllm_gguf.evaluate import run_ppl
from infmllm_gguf.texts import load_text

SWEEP = {
    "recent_fraction": [0.25, 0.5, 0.75, 0.875, 0.9375],
    "retrieval_window": [8, 32],
    "local_window": [0, 2],
    "bias": [0.0, 1e-3, 1e-2],
}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--text", default="kjv")
    ap.add_argument("--tokens", type=int, default=8000)
    ap.add_argument("--budgets", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--recent-fraction", type=float, default=0.25)
    ap.add_argument("--retrieval-window", type=int, default=8)
    ap.add_argument("--local-window", type=int, default=0)
    ap.add_argument("--bias", type=float, default=1e-3)
    ap.add_argument("--only-base", action="store_true", help="just the base setting and the baselines")
    ap.add_argument("--out", default=None, help="results (default: bench/results/sweep_<text>)")


def one_at_a_time(base: dict[str, Any], sweep: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The base setting, then each knob of `sweep` changed to each of its other values."""
    out = [dict(base)]
    for knob, values in sweep.items():
        out += [{**base, knob: v} for v in values if v != base[knob]]
    return out


def infmllm(budget: int, setting: dict[str, Any]) -> InfMLLM:
    """InfMLLM at `budget` with a setting's knobs, its recent window as a fraction of the budget."""
    knobs = {k: v for k, v in setting.items() if k != "recent_fraction"}
    return InfMLLM(budget, recent=int(budget * setting["recent_fraction"]), **knobs)


def ppl(policy: KVPolicy, tokens: np.ndarray, n_ctx: int, desc: str) -> float:
    llm = Llama(n_ctx=n_ctx, kv_policy=policy)
    result = run_ppl(llm, tokens, desc=desc)
    llm.close()
    return result["ppl"]


def run(args: argparse.Namespace) -> int:
    base = {
        "recent_fraction": args.recent_fraction,
        "retrieval_window": args.retrieval_window,
        "local_window": args.local_window,
        "bias": args.bias,
    }

    probe = Llama(n_ctx=256, kv_policy="full")
    tokens = np.array(probe.tokenize(load_text(args.text)[: args.tokens * 8]), np.int32)[: args.tokens]
    probe.close()
    full_policy, _ = CONFIGS["full"].build(None)
    full = ppl(full_policy, tokens, len(tokens) + 1, "full")
    rows = [{"budget": len(tokens), "policy": "full", "ppl": full}]
    for budget in args.budgets:
        baselines = {}
        for name in ("streamingllm", "h2o"):
            policy, _ = CONFIGS[name].build(budget)
            baselines[name] = ppl(policy, tokens, policy.capacity, name)
        rows += [{"budget": budget, "policy": k, "ppl": v} for k, v in baselines.items()]
        for setting in [base] if args.only_base else one_at_a_time(base, SWEEP):
            policy = infmllm(budget, setting)
            rows.append(
                {
                    "budget": budget,
                    "policy": "infmllm",
                    **setting,
                    "ppl": ppl(policy, tokens, policy.capacity, str(setting)),
                }
            )
        sl = baselines["streamingllm"]
        for row in rows:
            if row["budget"] == budget:
                row["gap_closed"] = (sl - row["ppl"]) / (sl - full)
        print(f"budget {budget}: full {full:.3f}, " + ", ".join(f"{k} {v:.3f}" for k, v in baselines.items()))
        for row in sorted(
            (r for r in rows if r["budget"] == budget and r["policy"] == "infmllm"), key=lambda r: r["ppl"]
        ):
            knobs = ", ".join(f"{k}={row[k]:g}" for k in base)
            print(f"  infmllm {knobs}: {row['ppl']:.3f} (gap closed {row['gap_closed']:+.0%})")

    out = write_results(
        args.out or RESULTS / f"sweep_{Path(args.text).stem}",
        {"text": args.text, "tokens": len(tokens), "base": base},
        rows,
        ["budget", "policy", *base, "ppl", "gap_closed"],
    )
    wrote(out, "json", "csv")
    return 0
