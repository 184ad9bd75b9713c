"""Passkey answers under other page-scoring rules of the recall tier, each from the same state.

Each passkey stream of bench_recall.py's recall run (same keys, haystacks, preamble and answer
length) is streamed once and its state saved before the question; then for every rule the
state is restored, `PageStore.page_score` is the rule, and the question is answered (its turn
recall scored by that rule).  A stream costs one pass however many rules are compared, and the
shipped rule's answers are those of bench_recall.py's "recall" run, key for key.

Rules (z: a page's standardised q·k for every layer, kv head and query row):
  max-mean       the shipped rule: the strongest single one less their mean
  max            the strongest single one
  max-half-mean  the strongest less half their mean
  attention      not a rule for z: Recall(score="attention"), a page's share of the softmax
                 attention with keys at their full-cache distance (PageStore.attention_scores)
  both           Recall(score="both"): the shipped rule's and the attention score's standing-out
                 pages in turn
  text           Recall(score="text"): the pages where the question's runs of tokens were said

`--samples` also varies how many pages' exact scores set the standardisation
(`PageStore.SAMPLE`): each (rule, sample) pair answers from the same state, labelled
"RULE @N".

Per key: correct, the answer, whether all of the needle was cached when it answered, and
whether the recall brought back part of the stream's opening (its first three pages).

    python scripts/bench_recall_rules.py --quick          # 4x/8x, 1 key per depth (minutes)
    python scripts/bench_recall_rules.py                  # 4x..32x, 4 keys per depth (~30 min)
    python scripts/bench_recall_rules.py --sinks 48 --out bench/results/recall_rules_sinks48
                                                          # the preamble held in the policy's sinks
    python scripts/bench_recall_rules.py --rules max-mean --samples 64 128 256 \
        --out bench/results/recall_rules_sample                # the standardisation's sample

Writes bench/results/recall_rules.json, .csv and .png (accuracy per rule and length).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable

import numpy as np
from bench_recall import plot
from results_io import RESULTS, write_results
from tqdm import tqdm

from infmllm_gguf import Llama, Recall
from infmllm_gguf.cli import passkey_answer, passkey_draws, passkey_tokens
from infmllm_gguf.policies import make_policy
from infmllm_gguf.recall import PageStore
from infmllm_gguf.texts import kjv

RULES: dict[str, Callable[[np.ndarray], np.ndarray] | str] = {
    "max-mean": PageStore.page_score,
    "max": lambda z: z.max(axis=1),
    "max-half-mean": lambda z: z.max(axis=1) - 0.5 * z.mean(axis=1),
    "attention": "attention",  # Recall(score=...)
    "both": "both",
    "text": "text",
}
OPENING_PAGES = 3


def answer_with(
    llm: Llama, rule: Callable[[np.ndarray], np.ndarray] | str, key: str, needle: range, sample: int
) -> dict:
    """Answer the question in the stream's current state with `rule` scoring the pages, their
    standardisation set by `sample` pages (a str: that `Recall.score`, the shipped rule)."""
    stream = llm._stream
    shipped, shipped_sample = PageStore.__dict__["page_score"], PageStore.SAMPLE  # the staticmethod
    shipped_recall = stream.recall
    if isinstance(rule, str):
        stream.recall = dataclasses.replace(shipped_recall, score=rule)
    else:
        PageStore.page_score, PageStore.SAMPLE = staticmethod(rule), sample
    try:
        result = passkey_answer(llm, key, needle, answer_tokens=16)
    finally:
        PageStore.page_score, PageStore.SAMPLE = shipped, shipped_sample
        stream.recall = shipped_recall
    opening = OPENING_PAGES * llm.recall.page
    return {**result, "opening_recalled": any(a < opening for a, _ in llm.recalled())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--policy", default="infmllm")
    ap.add_argument("--multiples", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--trials", type=int, default=4, help="keys per depth")
    ap.add_argument("--rules", nargs="+", choices=list(RULES), default=["max-mean", "max", "max-half-mean"])
    ap.add_argument("--no-preamble", action="store_true", help="the earlier form: no opening preamble")
    ap.add_argument(
        "--samples",
        type=int,
        nargs="+",
        default=[PageStore.SAMPLE],
        help="pages whose exact scores set the standardisation (default: the shipped number)",
    )
    ap.add_argument("--sinks", type=int, help="the policy's sinks (default its own; 48 hold the preamble)")
    ap.add_argument("--out", default=str(RESULTS / "recall_rules"))
    args = ap.parse_args()
    if min(args.samples) < 1:
        ap.error("--samples must be >= 1")
    labels = {
        (rule, n): rule if len(args.samples) == 1 else f"{rule} @{n}"
        for rule in args.rules
        for n in args.samples
    }
    if args.quick:
        args.multiples, args.trials = [4, 8], 1

    rows = []
    total = len(args.multiples) * len(args.depths) * args.trials
    bar = tqdm(total=total, desc="streams", file=sys.stderr)
    for multiple in args.multiples:
        length = args.budget * multiple
        policy = make_policy(args.policy, budget=args.budget)
        if args.sinks is not None:
            if not hasattr(policy, "sinks"):
                ap.error(f"--sinks: the {policy.name} policy keeps no sinks")
            policy = dataclasses.replace(policy, sinks=args.sinks)
        llm = Llama(n_ctx=policy.capacity, kv_policy=policy, seed=0, recall=Recall())
        filler = llm.tokenize(kjv()[:200_000], add_bos=False)
        draws = passkey_draws(np.random.default_rng(0), len(filler), args.depths, args.trials, spread=True)
        for depth, key, start in draws:  # bench_recall.py's keys and haystacks
            tokens, needle = passkey_tokens(
                llm, filler, length, depth, key, paragraphs=True, start=start, preamble=not args.no_preamble
            )
            llm.reset()
            llm.eval(tokens)
            state = llm.save_state()
            for (rule, sample), label in labels.items():
                llm.load_state(state)
                result = answer_with(llm, RULES[rule], key, needle, sample)
                rows.append({"rule": label, "sample": sample, "length": length, "depth": depth, **result})
            bar.update(1)
        llm.close()
    bar.close()
    for rule in labels.values():
        per_length = [
            sum(r["correct"] for r in rows if r["rule"] == rule and r["length"] == args.budget * m)
            for m in args.multiples
        ]
        mine = [r for r in rows if r["rule"] == rule]
        whole, opening = sum(r["needle_whole"] for r in mine), sum(r["opening_recalled"] for r in mine)
        print(
            f"{rule:>14}: correct {' / '.join(map(str, per_length))} of {len(args.depths) * args.trials} "
            f"at {' / '.join(f'{m}x' for m in args.multiples)}; "
            f"needle whole {whole}, opening recalled {opening} of {len(mine)}"
        )
    meta = {
        "budget": args.budget,
        "policy": args.policy,
        "depths": args.depths,
        "recall": repr(Recall()),
        "preamble": not args.no_preamble,
        "sinks": getattr(policy, "sinks", None),
    }
    columns = [
        "rule",
        "sample",
        "length",
        "depth",
        "key",
        "correct",
        "needle_whole",
        "opening_recalled",
        "answer",
    ]
    out = write_results(args.out, meta, rows, columns)
    title = f"page-scoring rules of the recall tier, budget {args.budget}"
    plot(rows, out.with_suffix(".png"), series="rule", value="correct", title=title)
    print(f"wrote {out}.json/.csv/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
