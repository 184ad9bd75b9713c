"""The server under load: 1, 2, 4 and 8 concurrent clients, each holding one long conversation.

Starts `infmllm-gguf serve` on 127.0.0.1 (8 slots, so every conversation keeps its slot) and
drives it with the `openai` client, streaming: per request the time to the first token; per
run the aggregate generated tokens per second (streamed text chunks, one per token but where a
stop string or a multi-byte character holds text back) and the server's resident memory, sampled
twice a second (flat: every conversation stays within budget + chunk however long it runs).
Decoding is serialised in one context, so aggregate tok/s stays about flat with the clients
while the time to first token grows with the queue.

    python -m bench server --quick     # 10 turns per client (minutes)
    python -m bench server             # 100 turns per client

Writes bench/results/server.json, server.csv and server.png.  Two builds side by side: run once
per build with its venv's Python and a label, into the same --out (rows merge by label and
clients), e.g. --python ../old/.venv/bin/python --label before, then --label after.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.common import (
    Stopwatch,
    add_out,
    merge_rows,
    process_rss_mb,
    progress,
    pyplot,
    save_figure,
    write_results,
    wrote,
)

MODEL = "smollm2-135m"


def start_server(args: argparse.Namespace, sessions: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        args.python, "-m", "infmllm_gguf.cli", "serve", "--budget", str(args.budget), "--slots", "8",
        "--port", str(port), "--sessions-dir", sessions, "--max-queue", "16",
    ]  # fmt: skip
    # from the sessions folder: in the checkout Python would import the unbuilt sources
    proc = subprocess.Popen(cmd, cwd=sessions, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc, port
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise SystemExit("the server did not start")


def load(port: int, pid: int, clients: int, turns: int, max_tokens: int, bar: tqdm) -> dict:
    """`clients` conversations at once of `turns` turns each; throughput, latency and memory."""
    from openai import OpenAI  # the test extra's, imported when a run needs it

    ttft: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    rss: list[tuple[float, float]] = []
    done = threading.Event()
    clock = Stopwatch()

    def watch() -> None:
        while not done.is_set():
            rss.append((clock.seconds, process_rss_mb(pid)))
            time.sleep(0.5)

    def converse(i: int) -> None:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        messages: list[dict] = []
        for turn in range(turns):
            messages.append(
                {"role": "user", "content": f"Turn {turn}. Tell me one more thing about the sea."}
            )
            turn_clock = Stopwatch()
            first, parts, n = None, [], 0
            stream = client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0.7, seed=turn,
                stream=True, user=f"bench-{clients}-{i}",
            )  # fmt: skip
            for chunk in stream:
                text = chunk.choices[0].delta.content if chunk.choices else None
                if text:
                    first = first or turn_clock.seconds
                    parts.append(text)
                    n += 1
            messages.append({"role": "assistant", "content": "".join(parts)})
            with lock:
                if first is not None:
                    ttft.append(first)
                tokens[0] += n
                bar.update()

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=converse, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = clock.seconds
    done.set()
    watcher.join()
    return summary(clients, turns, wall, tokens[0], ttft, rss)


def summary(
    clients: int, turns: int, wall: float, tokens: int, ttft: list[float], rss: list[tuple[float, float]]
) -> dict:
    """A load run's row: throughput, time-to-first-token percentiles, and the server's RSS (at
    the start and end of the samples past the first tenth, the warm-up; the peak; the trace)."""
    mem = np.array([m for _, m in rss])
    warm = mem[len(mem) // 10 :] if len(mem) > 10 else mem
    return {
        "clients": clients,
        "turns": turns,
        "requests": clients * turns,
        "seconds": round(wall, 1),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3),
        "ttft_p95_s": round(float(np.percentile(ttft, 95)), 3),
        "rss_start_mb": round(float(warm[0]), 1),
        "rss_end_mb": round(float(warm[-1]), 1),
        "rss_max_mb": round(float(mem.max()), 1),
        "rss_trace": [(round(t, 1), round(m, 1)) for t, m in rss],
    }


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="10 turns per client")
    ap.add_argument("--turns", type=int, default=100)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=16)
    add_out(ap, "server")
    ap.add_argument(
        "--python", default=sys.executable,
        help="the Python whose infmllm-gguf serves (another venv's, to compare two builds)",
    )  # fmt: skip
    ap.add_argument(
        "--label", default=None, help="the build's name; rows of other labels in --out are kept (merged)"
    )


def run(args: argparse.Namespace) -> int:
    turns = 10 if args.quick else args.turns
    rows = []
    with (
        tempfile.TemporaryDirectory() as sessions,
        progress(sum(args.clients) * turns, "server", unit="turn") as bar,
    ):
        for clients in args.clients:
            proc, port = start_server(args, sessions)  # a fresh server per run: RSS from its start
            try:
                rows.append(
                    {
                        "build": args.label or "this build",
                        **load(port, proc.pid, clients, turns, args.max_tokens, bar),
                    }
                )
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            r = rows[-1]
            bar.write(
                f"{clients} clients: {r['tokens_per_s']} tok/s, ttft p50 {r['ttft_p50_s']} s "
                f"p95 {r['ttft_p95_s']} s, RSS {r['rss_start_mb']} -> {r['rss_end_mb']} MB"
            )
    meta = {
        "budget": args.budget,
        "turns": turns,
        "max_tokens": args.max_tokens,
        "slots": 8,
        "decoding": "serial",
    }
    if args.label is not None:
        rows = merge_rows(args.out, meta, rows, key=("build", "clients"))
    columns = [
        "build", "clients", "requests", "seconds", "tokens_per_s", "ttft_p50_s", "ttft_p95_s", "rss_start_mb",
        "rss_end_mb", "rss_max_mb",
    ]  # fmt: skip
    out = write_results(args.out, meta, rows, columns)
    plot(rows, out)
    wrote(out, "json", "csv", "png")
    return 0


def plot(rows: list[dict], out: Path) -> None:
    fig, ax = pyplot().subplots(1, 3, figsize=(15, 4))
    builds = list(dict.fromkeys(r["build"] for r in rows))
    for build in builds:
        mine = [r for r in rows if r["build"] == build]
        name = f"{build}: " if len(builds) > 1 else ""
        clients = [r["clients"] for r in mine]
        ax[0].plot(clients, [r["tokens_per_s"] for r in mine], "o-", label=build)
        ax[1].plot(clients, [r["ttft_p50_s"] for r in mine], "o-", label=f"{name}p50")
        ax[1].plot(clients, [r["ttft_p95_s"] for r in mine], "s--", label=f"{name}p95")
        for r in mine:
            t, m = zip(*r["rss_trace"])
            ax[2].plot(t, m, label=f"{name}{r['clients']} clients")
    ax[0].set(xlabel="concurrent clients", ylabel="generated tokens / s (all clients)", title="throughput")
    if len(builds) > 1:
        ax[0].legend()
    ax[1].set(xlabel="concurrent clients", ylabel="seconds", title="time to first token")
    ax[1].legend()
    ax[2].set(xlabel="seconds into the run", ylabel="server RSS (MB)", title="memory")
    ax[2].legend()
    for a in ax[:2]:
        a.set_xscale("log", base=2)
        a.grid(alpha=0.3)
    save_figure(fig, out.with_suffix(".png"), dpi=120)
