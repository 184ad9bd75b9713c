"""Passkey answers under each page-scoring rule of the recall tier, key for key.

The passkey streams of the recall benchmark's "recall" run (same keys, haystacks, preamble and
answer length) are answered with each rule, a `Recall.score`:
  max-mean   score="peak", the shipped rule: a page's strongest standardised q·k (over every
             layer, kv head and query row) less their mean
  max        score="peak-max": the strongest one alone
  max-half-mean
             score="peak-max-half-mean": the strongest less half their mean
  attention  score="attention": a page's share of the softmax attention with keys at their
             full-cache distance
  both       score="both": the two rankings' standing-out pages in turn
  text       score="text": the pages where the question's runs of tokens were said
Each rule streams the keys in a session of its own (the configuration NAME+recall-turn of
bench/configs.py with that score); a turn's recall acts only when the question is answered,
so every rule answers from the same cache.

Per key: correct, the answer, whether all of the needle was cached when it answered, and
whether the recall brought back part of the stream's opening (its first three pages).

    python -m bench recall-rules --quick          # 4x/8x, 1 key per depth (minutes)
    python -m bench recall-rules                  # 4x..32x, 4 keys per depth
    python -m bench recall-rules --sinks 48 --out bench/results/recall_rules_sinks48
                                                  # the preamble held in the policy's sinks

Writes bench/results/recall_rules.json, .csv and .png (accuracy per rule and length).
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
from tqdm import tqdm

from bench.common import add_out, progress, write_results, wrote
from bench.configs import CONFIGS
from bench.recall import add_stream_arguments, plot, stream_meta
from infmllm_gguf import Llama, Recall
from infmllm_gguf.evaluate import passkey_draws, passkey_filler, passkey_trial
from infmllm_gguf.recall import PeakScorer

RULES = {  # Recall.score
    "max-mean": "peak",
    "max": "peak-max",
    "max-half-mean": "peak-max-half-mean",
    "attention": "attention",
    "both": "both",
    "text": "text",
}
OPENING_PAGES = 3


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="4x/8x, 1 key per depth")
    add_stream_arguments(ap, 4, "keys per depth")
    ap.add_argument("--rules", nargs="+", choices=list(RULES), default=list(RULES))
    ap.add_argument("--sinks", type=int, help="the policy's sinks (default its own; 48 hold the preamble)")
    add_out(ap, "recall_rules")


def session(args: argparse.Namespace, rule: str) -> Llama:
    """A session of the policy whose recall scores pages by `rule`."""
    policy, recall = CONFIGS[f"{args.policy}+recall-turn"].with_recall(score=RULES[rule]).build(args.budget)
    if args.sinks is not None:
        if not hasattr(policy, "sinks"):
            raise SystemExit(f"--sinks: the {policy.name} policy keeps no sinks")
        policy = dataclasses.replace(policy, sinks=args.sinks)
    return Llama(n_ctx=policy.capacity, kv_policy=policy, seed=0, recall=recall)


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.multiples, args.trials = [4, 8], 1

    rows = []
    sinks = None
    with progress(len(args.multiples) * len(args.depths) * args.trials, "streams") as bar:
        for multiple in args.multiples:
            length_rows, sinks = answer_keys(args, args.budget * multiple, bar)
            rows += length_rows
    summarise(args, rows)
    meta = {**stream_meta(args, Recall()), "sinks": sinks}
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
    wrote(out, "json", "csv", "png")
    return 0


def answer_keys(args: argparse.Namespace, length: int, bar: tqdm) -> tuple[list[dict], int | None]:
    """The keys of one stream length, each answered by every rule's session in turn: a row per
    key and rule, and the policy's sinks."""
    rows = []
    sessions = {rule: session(args, rule) for rule in args.rules}
    first = next(iter(sessions.values()))
    sinks = getattr(first.policy, "sinks", None)
    filler = passkey_filler(first)
    draws = passkey_draws(np.random.default_rng(0), len(filler), args.depths, args.trials, spread=True)
    for depth, key, start in draws:  # the recall benchmark's keys and haystacks
        for rule, llm in sessions.items():
            result = passkey_trial(
                llm, filler, length, depth, key, 16, True, start, preamble=not args.no_preamble
            )
            opening = OPENING_PAGES * llm.recall.page
            rows.append(
                {
                    "rule": rule,
                    "sample": PeakScorer.SAMPLE,
                    "length": length,
                    **result,
                    "opening_recalled": any(a < opening for a, _ in llm.recalled()),
                }
            )
        bar.update(1)
    for llm in sessions.values():
        llm.close()
    return rows, sinks


def summarise(args: argparse.Namespace, rows: list[dict]) -> None:
    """A line per rule on stdout: keys answered at each length, needle whole, opening recalled."""
    for rule in args.rules:
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
