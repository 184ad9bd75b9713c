"""Compare builds of the package on one small workload, taking turns, for before/after checks.

Each build is a directory put first on PYTHONPATH (a copy of another commit's `infmllm_gguf/`
with the installed build products beside it) or `installed` for the installed package.  A
round runs every build once, each in a fresh process, so all builds see the same machine
state; the figures are medians over rounds.  The workload uses only the public API that old
and new builds share:

- prefill: the KJV (or Genesis) tokens fed in 512-token pieces under InfMLLM at `--budget`;
- decode: `generate_text` at temperature 0 after that stream (tok/s), and the same after a
  full cache of `--budget` tokens, whose ratio is the decode ratio InfMLLM / full;
- perplexity of the stream under InfMLLM (`stream_logprobs`): equal builds give equal values;
- the process's peak RSS.

    python -m bench builds --build before=/tmp/old_pkg --build after=installed --rounds 3

Writes bench/results/builds.json, .csv and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import ROOT

# the worker imports only this module and the build it measures (bench.common needs a new one)

METRICS = ("prefill_tok_s", "decode_tok_s", "full_decode_tok_s", "decode_ratio", "ppl", "peak_rss_mb")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--build", action="append", required=True, metavar="LABEL=DIR",
        help="a build: DIR first on PYTHONPATH, or `installed` (repeat for each build)",
    )  # fmt: skip
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=8192, help="stream length for prefill and perplexity")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--steps", type=int, default=64, help="tokens generated for the decode figures")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "builds"))


def workload(tokens: int, budget: int, steps: int) -> dict[str, float]:
    """One process's figures for the build it imported."""
    import resource

    from infmllm_gguf import InfMLLM, Llama
    from infmllm_gguf.texts import kjv

    llm = Llama(n_ctx=2 * budget, kv_policy=InfMLLM(budget=budget))
    text = llm.tokenize(kjv()[: 8 * tokens])[:tokens]
    t0 = time.perf_counter()
    logprobs = [llm.stream_logprobs(text[i : i + 512]) for i in range(0, len(text), 512)]
    prefill = len(text) / (time.perf_counter() - t0)
    lp = np.concatenate(logprobs)[1:]
    ppl = float(np.exp(-lp.mean()))

    def decode_rate(model: Llama) -> float:
        t = time.perf_counter()
        before = model.n_streamed
        model.generate_text(max_tokens=steps, temperature=0.0)
        return (model.n_streamed - before) / (time.perf_counter() - t)

    decode = decode_rate(llm)
    full = Llama(n_ctx=2 * budget, kv_policy="full")
    full.eval(text[:budget])
    full_decode = decode_rate(full)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "full_decode_tok_s": full_decode,
        "decode_ratio": decode / full_decode,
        "ppl": ppl,
        "peak_rss_mb": peak_kib / 1024,
    }


def run_build(label: str, path: str, args: argparse.Namespace) -> dict[str, float]:
    env = dict(os.environ)
    if path != "installed":
        env["PYTHONPATH"] = path
    call = f"workload({args.tokens}, {args.budget}, {args.steps})"
    code = f"import json; from bench.builds import workload; print(json.dumps({call}))"
    command = [sys.executable, "-c", code]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"build {label} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> int:
    from bench.common import log, write_results, wrote

    builds = dict(b.split("=", 1) for b in args.build)
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in builds}
    for r in range(args.rounds):
        for label, path in builds.items():
            figures = run_build(label, path, args)
            runs[label].append(figures)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in figures.items())
            log(f"round {r + 1}/{args.rounds} {label}: {shown}")
    rows = [
        {"build": label, **{m: float(np.median([f[m] for f in runs[label]])) for m in METRICS}}
        for label in builds
    ]
    settings = {k: getattr(args, k) for k in ("rounds", "tokens", "budget", "steps")}
    meta = {"settings": settings, "builds": builds}
    out = write_results(args.out, {**meta, "runs": runs}, rows, ("build", *METRICS))
    plot(rows, out.with_suffix(".png"))
    wrote(out, "json", "csv", "png")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    """Each metric relative to the first build (1.0 = equal)."""
    from bench.common import grouped_bars, pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    base = rows[0]
    bars = {row["build"]: [row[m] / base[m] for m in METRICS] for row in rows}
    grouped_bars(ax, bars, [m.replace("_", " ") for m in METRICS])
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel(f"relative to {base['build']}")
    ax.set_title("builds side by side (medians over rounds)")
    ax.legend()
    save_figure(fig, path)
