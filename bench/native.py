"""Native overheads: in-graph scoring's cost per decode, and one eviction round's.

Side by side in one run: decode tok/s with in-graph scoring on vs off at a given number of
filled cells, and the cost of one eviction round against one decode step.

    python -m bench native [--fills 1024 2048] [--steps 64] [--rounds 3] [--flash-attn]

Writes bench/results/native_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, Stopwatch, progress, wrote
from infmllm_gguf import default_model_path
from infmllm_gguf.bindings import llama_cpp as lc
from infmllm_gguf.kv import KVCache, decode, select_keep
from infmllm_gguf.texts import genesis


@lc.llama_log_callback
def quiet(level, text, user_data):  # llama.cpp's logs, left out
    pass


def load_model() -> tuple[int, np.ndarray]:
    """The default model loaded straight with llama.cpp (its logs off), and Genesis in its tokens."""
    lc.llama_log_set(quiet, None)
    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(str(default_model_path()).encode(), lc.llama_model_default_params())
    vocab = lc.llama_model_get_vocab(model)
    data = genesis().encode()
    buf = (lc.llama_token * len(data))()
    n = lc.llama_tokenize(vocab, data, len(data), buf, len(buf), True, False)
    return model, np.array(buf[:n], np.int32)


def make_context(model: int, n_ctx: int, flash_attn: bool) -> int:
    p = lc.llama_context_default_params()
    p.n_ctx = n_ctx
    p.n_batch = p.n_ubatch = 512
    p.n_threads = p.n_threads_batch = os.cpu_count() or 2
    p.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
    p.no_perf = True
    return lc.llama_init_from_model(model, p)


def decode_steps(ctx: int, tokens: np.ndarray, start: int) -> float:
    """Seconds per single-token decode over len(tokens) steps, then roll them back."""
    clock = Stopwatch()
    for i, tok in enumerate(tokens):
        decode(ctx, [tok], [start + i])
    elapsed = clock.seconds / len(tokens)
    lc.llama_memory_seq_rm(lc.llama_get_memory(ctx), 0, start, -1)
    return elapsed


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--fills", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument(
        "--out", default=str(RESULTS / "native_speed.json"), help="the JSON file (default: %(default)s)"
    )


def decode_speeds(model: int, text: np.ndarray, args: argparse.Namespace) -> list[dict]:
    """Decode tok/s with in-graph scoring off and on at each filled-cell count, one row each."""
    rows = []
    for fill in args.fills:
        ctx = make_context(model, fill + args.steps + 256, args.flash_attn)
        kv = KVCache(ctx)
        decode(ctx, text[:fill], np.arange(fill))
        steps = text[fill : fill + args.steps]
        times: dict[str, list[float]] = {"off": [], "on": []}
        with progress(args.rounds, f"decode at {fill} cells") as bar:
            for _ in range(args.rounds):
                for mode in ("off", "on"):  # interleaved: both see the same machine state
                    kv.set_scoring(args.queries if mode == "on" else 0)
                    decode_steps(ctx, steps[:4], fill)  # warm the rebuilt graph
                    times[mode].append(decode_steps(ctx, steps, fill))
                bar.update()
        off, on = np.median(times["off"]), np.median(times["on"])
        rows.append(
            {
                "filled_cells": fill,
                "tok_s_scoring_off": 1 / off,
                "tok_s_scoring_on": 1 / on,
                "ratio_on_off": off / on,
            }
        )
        lc.llama_free(ctx)
    return rows


def eviction_round(model: int, text: np.ndarray, args: argparse.Namespace) -> dict:
    """One eviction round on a full 2048 + 256 cache (read cells, select, evict 256, compact)
    against one plain decode step; the K-shift it leaves is paid by the next decode, so that
    decode is timed too."""
    budget, chunk = 2048, 256
    ctx = make_context(model, budget + chunk + 64, args.flash_attn)
    kv = KVCache(ctx)
    kv.set_scoring(args.queries)
    decode(ctx, text[: budget + chunk], np.arange(budget + chunk))
    plain_step = decode_steps(ctx, text[budget + chunk : budget + chunk + 16], budget + chunk)
    rounds = []
    for _ in range(args.rounds):
        clock = Stopwatch()
        view = kv.cells()
        keep = select_keep(view.scores, budget, 4, budget // 4, 0, 1e-3)
        kv.evict(view.positions[~keep])
        nxt = kv.compact()
        t_evict = clock.seconds
        clock = Stopwatch()
        decode(ctx, text[nxt : nxt + 1], [nxt])
        t_shift_step = clock.seconds
        rounds.append({"evict_compact_s": t_evict, "next_decode_with_kshift_s": t_shift_step})
        decode(ctx, text[: chunk - 1], np.arange(nxt + 1, nxt + chunk))  # refill to budget + chunk
    evict = float(np.median([r["evict_compact_s"] for r in rounds]))
    shift_step = float(np.median([r["next_decode_with_kshift_s"] for r in rounds]))
    return {
        "cells": budget + chunk,
        "evicted": chunk,
        "evict_select_compact_s": evict,
        "kshift_extra_s": shift_step - plain_step,
        "decode_step_s": plain_step,
        "round_over_step": (evict + max(0.0, shift_step - plain_step)) / plain_step,
    }


def report(result: dict) -> None:
    """The decode rows and the eviction round, one line each, on stdout."""
    for row in result["decode"]:
        print(
            f"{row['filled_cells']:>5} cells: scoring off {row['tok_s_scoring_off']:.1f} tok/s, "
            f"on {row['tok_s_scoring_on']:.1f} tok/s, ratio {row['ratio_on_off']:.3f}"
        )
    e = result["eviction_round"]
    print(
        f"eviction round over {e['cells']} cells: "
        f"select+evict+compact {e['evict_select_compact_s'] * 1e3:.2f} ms, "
        f"K-shift extra {e['kshift_extra_s'] * 1e3:.2f} ms, "
        f"one decode step {e['decode_step_s'] * 1e3:.2f} ms "
        f"-> {e['round_over_step']:.2f} steps"
    )


def run(args: argparse.Namespace) -> int:
    model, text = load_model()
    rows = decode_speeds(model, text, args)
    eviction = eviction_round(model, text, args)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "flash_attn": args.flash_attn,
        "retrieval_window": args.queries,
        "decode": rows,
        "eviction_round": eviction,
    }
    report(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    wrote(out)
    return 0
