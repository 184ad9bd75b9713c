"""Speed and memory on a GPU: a random-weight 1B model, every layer and the KV cache offloaded.

The model has a real 1B shape (TinyLlama-1.1B's), quantized Q4_K_M by llama.cpp's own quantizer.

1. Decode tok/s with InfMLLM against plain llama-cpp-python (the copy vendored in this
   package, scoring off) at the same filled cells, flash attention off and on: both are first
   filled to the policy's steady state, then take turns decoding `--steps` single tokens,
   `--rounds` times; the ratio is of the medians.
2. A long stream (`--stream-tokens`, default 1M) through InfMLLM in `--piece`-token pieces:
   tokens/s and the GPU's memory in use (ggml's device memory: total - free, the whole device)
   at checkpoints; flat memory is the claim.  `--max-seconds` stops it early, said so in the
   results, rather than overrun a lease.

Random weights compute the same kernels as real ones, so the speeds are real; nothing a
model says is measured.  Writes gpu.json, gpu.csv (the stream's checkpoints) and gpu.png
to `--out` (default bench/results/gpu/).

    python -m bench gpu                              # on a GPU machine (a few minutes)
    python -m bench gpu --shape small --stream-tokens 20000 --out /tmp/gpu   # CPU dry run
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, Stopwatch, current_rss_mb, log, pyplot, save_figure, write_results, wrote
from bench.speed import PlainRunner
from infmllm_gguf import InfMLLM, Llama, build_info, devices, synthetic

SHAPES = {"tinyllama-1b": synthetic.TINYLLAMA_1B, "small": synthetic.SMALL}


def gpu_memory_used() -> tuple[str, int]:
    """(device name, bytes in use) of the first GPU, or of the CPU where there is none."""
    found = devices()
    dev = next((d for d in found if d.type == "gpu"), found[0])
    return dev.name, dev.memory_total - dev.memory_free


def make_model(shape: synthetic.LlamaShape, work: Path) -> Path:
    clock = Stopwatch()
    f16 = synthetic.write_llama(work / "random-f16.gguf", shape)
    written = clock.seconds
    q4 = synthetic.quantize(f16, work / "random-q4_k_m.gguf")
    f16.unlink()
    log(
        f"model: {shape.n_params / 1e9:.2f}B parameters, written in {written:.0f} s, quantized Q4_K_M "
        f"in {clock.seconds - written:.0f} s ({q4.stat().st_size / 2**20:.0f} MiB)"
    )
    return q4


def decode_rate(decode_one: Callable[[np.ndarray], object], tokens: np.ndarray) -> float:
    """Single-token decodes per second over `tokens`."""
    clock = Stopwatch()
    for tok in tokens:
        decode_one(np.array([tok], np.int32))
    return len(tokens) / clock.seconds


def offloaded(model: Path, policy: InfMLLM, args: argparse.Namespace, **params: Any) -> Llama:
    """`model` with every layer offloaded, its cache of n_ctx = capacity managed by `policy`."""
    return Llama(
        str(model),
        n_ctx=policy.capacity,
        n_batch=args.piece,
        kv_policy=policy,
        n_gpu_layers=-1,
        n_threads=args.threads,
        **params,
    )


def bench_decode(model: Path, args: argparse.Namespace, flash_attn: bool, rng: np.random.Generator) -> dict:
    """InfMLLM vs plain decode at the same filled cells, taking turns."""
    policy = InfMLLM(budget=args.budget)
    ours = offloaded(model, policy, args, flash_attn=flash_attn)
    fill = rng.integers(300, args.n_vocab, policy.capacity + args.budget).astype(np.int32)
    ours.eval(fill)  # past the budget: evicting at its steady state
    cells = ours.n_cached
    plain = PlainRunner(
        cells + args.steps, args.threads, model_path=str(model), n_gpu_layers=-1, flash_attn=flash_attn
    )
    plain.eval(fill[:cells])  # the same number of cells, room for one round's decode
    rates: dict[str, list[float]] = {"infmllm": [], "plain": []}
    steps = rng.integers(300, args.n_vocab, (args.rounds, 2, args.steps)).astype(np.int32)
    for r in range(args.rounds):
        rates["infmllm"].append(decode_rate(ours.eval, steps[r, 0]))
        rates["plain"].append(decode_rate(plain.llm.eval, steps[r, 1]))
        plain.truncate(cells)  # back to the same fill for the next round
    row = {
        "flash_attn": flash_attn,
        "cells": cells,
        "infmllm_tok_s": float(np.median(rates["infmllm"])),
        "plain_tok_s": float(np.median(rates["plain"])),
        "evictions_during_decode": ours.kv_stats()["evictions"],
    }
    row["ratio"] = row["infmllm_tok_s"] / row["plain_tok_s"]
    ours.close()
    plain.close()
    log(
        f"decode, flash attention {'on' if flash_attn else 'off'}, {cells} cells: InfMLLM "
        f"{row['infmllm_tok_s']:.1f} tok/s, plain {row['plain_tok_s']:.1f} tok/s, ratio {row['ratio']:.3f}"
    )
    return row


def bench_stream(model: Path, args: argparse.Namespace, rng: np.random.Generator) -> tuple[list[dict], dict]:
    """One long InfMLLM stream: tok/s and device memory at checkpoints."""
    policy = InfMLLM(budget=args.budget, chunk=args.piece)
    llm = offloaded(model, policy, args, n_ubatch=args.piece, flash_attn=True)
    every = max(args.piece, args.stream_tokens // 25 // args.piece * args.piece)
    rows, fed, stopped = [], 0, False
    clock = Stopwatch()
    t_last = last_fed = 0
    while fed < args.stream_tokens:
        n = min(args.piece, args.stream_tokens - fed)
        llm.eval(rng.integers(300, args.n_vocab, n).astype(np.int32))
        fed += n
        if fed % every == 0 or fed == args.stream_tokens:
            now = clock.seconds
            name, used = gpu_memory_used()
            rows.append(
                {
                    "stream_tokens": fed,
                    "elapsed_s": now,
                    "tok_s": (fed - last_fed) / (now - t_last),
                    "device": name,
                    "device_mem_used_mib": used / 2**20,
                    "rss_mib": current_rss_mb(),
                    "n_cached": llm.n_cached,
                    "evictions": llm.kv_stats()["evictions"],
                }
            )
            t_last, last_fed = now, fed
            log(
                f"stream {fed:>9,} tokens: {rows[-1]['tok_s']:8.0f} tok/s, {name} memory "
                f"{rows[-1]['device_mem_used_mib']:.0f} MiB, {llm.n_cached} cells"
            )
            if now > args.max_seconds:
                stopped = True
                log(f"stream stopped at {fed:,} tokens: --max-seconds {args.max_seconds} reached")
                break
    llm.close()
    mem = [r["device_mem_used_mib"] for r in rows]
    summary = {
        "stream_tokens": fed,
        "stopped_early": stopped,
        "stream_s": rows[-1]["elapsed_s"],
        "stream_tok_s": fed / rows[-1]["elapsed_s"],
        "device_mem_first_mib": mem[0],
        "device_mem_last_mib": mem[-1],
        "device_mem_max_minus_min_mib": max(mem) - min(mem),
    }
    return rows, summary


def plot(decode: list[dict], stream: list[dict], meta: dict, path: Path) -> None:
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4))
    labels = [f"FA {'on' if r['flash_attn'] else 'off'}" for r in decode]
    x = np.arange(len(decode))
    axes[0].bar(x - 0.2, [r["plain_tok_s"] for r in decode], 0.4, label="plain llama.cpp")
    axes[0].bar(x + 0.2, [r["infmllm_tok_s"] for r in decode], 0.4, label="InfMLLM")
    for i, r in enumerate(decode):
        axes[0].text(i + 0.2, r["infmllm_tok_s"], f"{r['ratio']:.2f}x", ha="center", va="bottom")
    axes[0].set_xticks(x, labels)
    axes[0].set_title(f"decode tok/s at {decode[0]['cells']} cells")
    axes[0].legend()
    xs = [r["stream_tokens"] for r in stream]
    axes[1].plot(xs, [r["tok_s"] for r in stream], marker="o")
    axes[1].set_title(f"stream tok/s, InfMLLM budget {meta['budget']}")
    axes[2].plot(xs, [r["device_mem_used_mib"] for r in stream], marker="o")
    axes[2].set_title(f"{stream[0]['device']} memory in use (MiB)")
    axes[2].set_ylim(bottom=0)
    for ax in axes[1:]:
        ax.set_xlabel("stream length (tokens)")
    fig.suptitle(f"{meta['gpu']}: random {meta['model_params_b']:.2f}B Llama, Q4_K_M")
    save_figure(fig, path)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1b")
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=64, help="single-token decodes per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--piece", type=int, default=1024, help="tokens per eval in the long stream")
    ap.add_argument("--stream-tokens", type=int, default=1_000_000)
    ap.add_argument("--max-seconds", type=float, default=200.0, help="stop the stream past this")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument(
        "--out", default=str(RESULTS / "gpu"), help="the folder of the results (default: %(default)s)"
    )


def run(args: argparse.Namespace) -> int:
    args.n_vocab = SHAPES[args.shape].n_vocab  # random tokens past the byte vocabulary

    info = build_info()
    gpus = [d for d in devices() if d.type == "gpu"]
    gpu = gpus[0].description if gpus else "no GPU (CPU dry run)"
    log(f"backends {info['backends']}, device: {gpu}")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as work:
        model = make_model(SHAPES[args.shape], Path(work))
        decode = [bench_decode(model, args, fa, rng) for fa in (False, True)]
        stream, summary = bench_stream(model, args, rng)
    meta = {
        "gpu": gpu,
        "backends": info["backends"],
        "shape": args.shape,
        "model_params_b": SHAPES[args.shape].n_params / 1e9,
        "quant": "Q4_K_M",
        "budget": args.budget,
        "piece": args.piece,
        "steps": args.steps,
        "rounds": args.rounds,
        "decode": decode,
        **summary,
    }
    out = Path(args.out) / "gpu"
    write_results(out, meta, stream, list(stream[0]))
    plot(decode, stream, meta, out.with_suffix(".png"))
    log(
        f"stream: {summary['stream_tokens']:,} tokens in {summary['stream_s']:.0f} s "
        f"({summary['stream_tok_s']:.0f} tok/s); device memory {summary['device_mem_first_mib']:.0f} -> "
        f"{summary['device_mem_last_mib']:.0f} MiB (spread {summary['device_mem_max_minus_min_mib']:.0f} MiB)"
    )
    wrote(out, "json", "csv", "png")
    return 0
