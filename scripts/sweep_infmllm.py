"""Choose InfMLLM's defaults by streaming perplexity: one knob at a time around a base setting
(recent fraction, retrieval window, local window, bias), next to full context, StreamingLLM and
H2O on the same tokens.  Tune on KJV; check the winner on the Jargon File (never tuned on).

    python scripts/sweep_infmllm.py --budgets 256 512 --tokens 8000          # tune (KJV)
    python scripts/sweep_infmllm.py --text jargon --only-base --budgets 256 512  # check

Writes bench/results/sweep_<text>.json and .csv.  "gap_closed" is the share of the
StreamingLLM -> full-context perplexity gap that a setting closes (negative: worse than
StreamingLLM).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from results_io import RESULTS, write_results

from infmllm_gguf import Llama
from infmllm_gguf.cli import run_ppl
from infmllm_gguf.policies import H2O, FullCache, InfMLLM, KVPolicy, StreamingLLM
from infmllm_gguf.texts import load_text


def variants(budget: int, base: dict, only_base: bool) -> list[dict]:
    """The base setting, then one knob changed at a time."""
    out = [dict(base)]
    if only_base:
        return out
    sweep = {
        "recent_fraction": [0.25, 0.5, 0.75, 0.875, 0.9375],
        "retrieval_window": [8, 32],
        "local_window": [0, 2],
        "bias": [0.0, 1e-3, 1e-2],
    }
    for knob, values in sweep.items():
        for v in values:
            if v != base[knob]:
                out.append({**base, knob: v})
    return out


def infmllm(budget: int, cfg: dict) -> InfMLLM:
    return InfMLLM(
        budget,
        recent=int(budget * cfg["recent_fraction"]),
        retrieval_window=cfg["retrieval_window"],
        local_window=cfg["local_window"],
        bias=cfg["bias"],
    )


def ppl(policy: KVPolicy, tokens: np.ndarray, n_ctx: int, desc: str) -> float:
    llm = Llama(n_ctx=n_ctx, kv_policy=policy)
    result = run_ppl(llm, tokens, desc=desc)
    llm.close()
    return result["ppl"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default="kjv")
    ap.add_argument("--tokens", type=int, default=8000)
    ap.add_argument("--budgets", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--recent-fraction", type=float, default=0.25)
    ap.add_argument("--retrieval-window", type=int, default=8)
    ap.add_argument("--local-window", type=int, default=0)
    ap.add_argument("--bias", type=float, default=1e-3)
    ap.add_argument("--only-base", action="store_true", help="just the base setting and the baselines")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base = {
        "recent_fraction": args.recent_fraction,
        "retrieval_window": args.retrieval_window,
        "local_window": args.local_window,
        "bias": args.bias,
    }

    probe = Llama(n_ctx=256, kv_policy="full")
    tokens = np.array(probe.tokenize(load_text(args.text)[: args.tokens * 8]), np.int32)[: args.tokens]
    probe.close()
    full = ppl(FullCache(), tokens, len(tokens) + 1, "full")
    rows = [{"budget": len(tokens), "policy": "full", "ppl": full}]
    for budget in args.budgets:
        baselines = {
            "streamingllm": ppl(StreamingLLM(budget), tokens, StreamingLLM(budget).capacity, "streamingllm"),
            "h2o": ppl(H2O(budget), tokens, H2O(budget).capacity, "h2o"),
        }
        rows += [{"budget": budget, "policy": k, "ppl": v} for k, v in baselines.items()]
        for cfg in variants(budget, base, args.only_base):
            policy = infmllm(budget, cfg)
            rows.append(
                {
                    "budget": budget,
                    "policy": "infmllm",
                    **cfg,
                    "ppl": ppl(policy, tokens, policy.capacity, str(cfg)),
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
    print(f"wrote {out}.json/.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
