"""Speed and memory over stream length: each policy side by side with plain llama-cpp-python.

Every runner streams the same KJV tokens.  At each checkpoint (budget, 2x, 4x, ... tokens) it is
fed up to the checkpoint in 512-token pieces (prefill tok/s), then decodes `--steps` single
tokens (decode tok/s).  Runners take turns checkpoint by checkpoint, so every ratio is
measured on the same machine state.  "plain" is llama-cpp-python's own `Llama` (the copy
bundled in this package, scoring off) with n_ctx = budget: a full cache up to n_ctx, then
llama.cpp's context shift (keep the first 4 tokens, drop half of the rest, shift positions).

    python -m bench speed --quick     # 8k tokens, budget 256 (a few minutes)
    python -m bench speed             # 64k tokens, budget 1024 (about an hour on 2 cores)

Writes bench/results/speed.json, speed.csv and speed.png.  RSS is the whole process (all runners
alive); flat RSS over the stream is the claim, per-runner KV buffers are fixed at creation.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    Stopwatch,
    add_out,
    current_rss_mb,
    peak_rss_mb,
    progress,
    pyplot,
    save_figure,
    write_results,
    wrote,
)
from bench.configs import CONFIGS, add_policies
from infmllm_gguf import Llama, default_model_path
from infmllm_gguf.bindings import LlamaCppPython, llama_cpp
from infmllm_gguf.texts import kjv

PIECE = 512


class PlainRunner:
    """llama-cpp-python's Llama with llama.cpp's context shift once n_ctx is full."""

    name = "plain"

    def __init__(
        self, n_ctx: int, n_threads: int, n_keep: int = 4, model_path: str | None = None, **params: Any
    ) -> None:
        """params: more of llama-cpp-python's Llama arguments (n_gpu_layers, flash_attn, ...)."""
        self.llm = LlamaCppPython(
            model_path or str(default_model_path()),
            n_ctx=n_ctx,
            n_batch=PIECE,
            n_threads=n_threads,
            verbose=False,
            **params,
        )
        self.n_ctx, self.n_keep = n_ctx, n_keep

    def eval(self, tokens: np.ndarray) -> None:
        i = 0
        while i < len(tokens):
            if self.llm.n_tokens == self.n_ctx:
                self.context_shift()
            take = min(self.n_ctx - self.llm.n_tokens, PIECE, len(tokens) - i)
            self.llm.eval(tokens[i : i + take].tolist())
            i += take

    def context_shift(self) -> None:
        n_past = self.llm.n_tokens
        n_discard = (n_past - self.n_keep) // 2
        memory = llama_cpp.llama_get_memory(self.llm.ctx)
        llama_cpp.llama_memory_seq_rm(memory, 0, self.n_keep, self.n_keep + n_discard)
        llama_cpp.llama_memory_seq_add(memory, 0, self.n_keep + n_discard, n_past, -n_discard)
        ids = self.llm.input_ids
        ids[self.n_keep : n_past - n_discard] = ids[self.n_keep + n_discard : n_past]
        self.llm.n_tokens = n_past - n_discard

    def truncate(self, n: int) -> None:
        """Keep the first n tokens only (a decode's tokens taken back)."""
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.llm.ctx), 0, n, -1)
        self.llm.n_tokens = n

    @property
    def n_cached(self) -> int:
        return self.llm.n_tokens

    def close(self) -> None:
        self.llm.close()


class PolicyRunner:
    """A configuration of bench/configs.py at the budget, streaming in this package's Llama."""

    def __init__(self, name: str, budget: int, n_threads: int) -> None:
        policy, recall = CONFIGS[name].build(budget)
        self.llm = Llama(n_ctx=policy.capacity, kv_policy=policy, recall=recall, n_threads=n_threads)
        self.name = name

    def eval(self, tokens: np.ndarray) -> None:
        self.llm.eval(tokens)

    @property
    def n_cached(self) -> int:
        return self.llm.n_cached

    def close(self) -> None:
        self.llm.close()


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="8k tokens at budget 256")
    ap.add_argument("--tokens", type=int, default=65_536)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32, help="single-token decodes timed per checkpoint")
    add_policies(ap, ["infmllm", "streamingllm", "h2o"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    add_out(ap, "speed")


def checkpoints(first: int, n_tokens: int) -> list[int]:
    points, c = [], first
    while c <= n_tokens:
        points.append(c)
        c *= 2
    return points


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.tokens, args.budget = 8192, 256

    policy_runners = [PolicyRunner(p, args.budget, args.threads) for p in args.policies]
    # plain gets the policies' capacity as n_ctx: at the first checkpoint (= budget) both hold
    # exactly the same cells, later plain shifts its context while the policies evict
    capacity = policy_runners[0].llm.policy.capacity
    runners: list[PlainRunner | PolicyRunner] = [PlainRunner(capacity, args.threads), *policy_runners]
    text_tokens = np.array(policy_runners[0].llm.tokenize(kjv()[: args.tokens * 8]), np.int32)
    points = checkpoints(args.budget, args.tokens)
    need = points[-1] + len(points) * args.steps
    if len(text_tokens) < need:
        raise SystemExit(f"the text has {len(text_tokens)} tokens, {need} needed")

    rows = measure(runners, text_tokens, points, args.steps)
    for r in runners:
        r.close()

    summary = summarise(rows, [r.name for r in runners])
    result = {
        "threads": args.threads,
        "budget": args.budget,
        "tokens": points[-1],
        "steps": args.steps,
        "rss_first_mb": rows[len(runners) - 1]["rss_mb"],
        "rss_last_mb": rows[-1]["rss_mb"],
        "peak_rss_mb": peak_rss_mb(),
        "summary": summary,
    }
    report(result, args.budget, points[0])
    out = write_results(args.out, result, rows, list(rows[0]))
    plot(rows, [r.name for r in runners], out.with_suffix(".png"), args.budget)
    wrote(out, "json", "csv", "png")
    return 0


def measure(
    runners: list[PlainRunner | PolicyRunner], text_tokens: np.ndarray, points: list[int], steps: int
) -> list[dict]:
    """Runners taking turns at each checkpoint: fed up to it (prefill), then `steps` single-token
    decodes; a row per runner and checkpoint, with the process RSS."""
    rows = []
    with progress(len(points) * len(runners), "checkpoints") as bar:
        for k, point in enumerate(points):
            start = points[k - 1] + steps if k else 0  # every runner has been fed the same tokens
            for r in runners:
                clock = Stopwatch()
                r.eval(text_tokens[start:point])
                prefill_s = clock.seconds
                decode_tokens = text_tokens[point : point + steps]
                clock = Stopwatch()
                for tok in decode_tokens:
                    r.eval(np.array([tok], np.int32))
                decode_s = clock.seconds
                rows.append(
                    {
                        "runner": r.name,
                        "stream_tokens": point,
                        "prefill_tok_s": (point - start) / prefill_s,
                        "decode_tok_s": steps / decode_s,
                        "cached": r.n_cached,
                        "rss_mb": current_rss_mb(),
                    }
                )
                bar.set_postfix(runner=r.name, tokens=point)
                bar.update()
    return rows


def summarise(rows: list[dict], names: list[str]) -> dict:
    """Add each row's decode speed relative to plain at the same checkpoint; per runner, its
    decode speeds at the budget and at the end, and against plain."""
    for row in rows:  # decode speed relative to plain at the same checkpoint
        plain = next(x for x in rows if x["runner"] == "plain" and x["stream_tokens"] == row["stream_tokens"])
        row["decode_vs_plain"] = row["decode_tok_s"] / plain["decode_tok_s"]
    summary = {}
    for name in names:
        mine = [x for x in rows if x["runner"] == name]
        first_full = mine[0]  # the first checkpoint is the budget: a full cache
        summary[name] = {
            "decode_tok_s_at_budget": first_full["decode_tok_s"],
            "decode_vs_plain_at_budget": first_full["decode_vs_plain"],
            "decode_tok_s_last": mine[-1]["decode_tok_s"],
            "last_over_first_full": mine[-1]["decode_tok_s"] / first_full["decode_tok_s"],
            "decode_vs_plain_median": float(np.median([x["decode_vs_plain"] for x in mine])),
        }
    return summary


def report(result: dict, budget: int, first_point: int) -> None:
    """A line per runner on stdout, then the process RSS at the first checkpoint and the end."""
    for name, s in result["summary"].items():
        print(
            f"{name:>13}: decode {s['decode_tok_s_at_budget']:.1f} -> {s['decode_tok_s_last']:.1f} tok/s "
            f"(last/first {s['last_over_first_full']:.2f}), vs plain at {budget} cells "
            f"{s['decode_vs_plain_at_budget']:.2f}, median over the stream {s['decode_vs_plain_median']:.2f}"
        )
    print(
        f"process RSS {result['rss_first_mb']:.0f} MB at {first_point} tokens, "
        f"{result['rss_last_mb']:.0f} MB at the end"
    )


def plot(rows: list[dict], names: list[str], path: Path, budget: int) -> None:
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4))
    for name in names:
        mine = [x for x in rows if x["runner"] == name]
        xs = [x["stream_tokens"] for x in mine]
        axes[0].plot(xs, [x["decode_tok_s"] for x in mine], marker="o", label=name)
        axes[1].plot(xs, [x["prefill_tok_s"] for x in mine], marker="o", label=name)
    xs = sorted({x["stream_tokens"] for x in rows})
    axes[2].plot(xs, [max(x["rss_mb"] for x in rows if x["stream_tokens"] == p) for p in xs], marker="o")
    for ax, title in zip(axes, ["decode tok/s", "prefill tok/s", "process RSS (MB, all runners)"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("stream length (tokens)")
        ax.set_title(f"{title}, budget {budget}")
    axes[0].legend()
    axes[2].set_ylim(bottom=0)
    save_figure(fig, path)
