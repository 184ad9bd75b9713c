"""The server under load: 1, 2, 4 and 8 concurrent clients, each holding one long conversation.

Starts `infmllm-gguf serve` on 127.0.0.1 (8 slots, so every conversation keeps its slot) and
drives it with the `openai` client, streaming: per request the time to the first token; per
run the aggregate generated tokens per second (streamed text chunks, one per token but where a
stop string or a multi-byte character holds text back) and the server's resident memory, sampled
twice a second (flat: every conversation stays within budget + chunk however long it runs).
The conversations generating at once share decode steps (continuous batching), so aggregate
tok/s grows with the clients while the steps hold more sequences.

    python -m bench server --quick     # 10 turns per client (minutes)
    python -m bench server             # 100 turns per client

Writes bench/results/server.json, server.csv and server.png.  Two builds side by side: run once
per build with its venv's Python and a label, into the same --out (rows merge by label and
clients), e.g. --python ../old/.venv/bin/python --label before, then --label after.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.chat_load import free_port, load, start, stop
from bench.common import add_out, merge_rows, progress, pyplot, save_figure, write_results, wrote


def start_server(args: argparse.Namespace, sessions: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [
        args.python, "-m", "infmllm_gguf.cli", "serve", "--budget", str(args.budget), "--slots", "8",
        "--port", str(port), "--sessions-dir", sessions, "--max-queue", "16",
    ]  # fmt: skip
    # from the sessions folder: in the checkout Python would import the unbuilt sources
    return start(cmd, port, cwd=sessions, log=Path(sessions) / "server.log"), port


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
                stop(proc)
            r = rows[-1]
            bar.write(
                f"{clients} clients: {r['tokens_per_s']} tok/s, ttft p50 {r['ttft_p50_s']} s "
                f"p95 {r['ttft_p95_s']} s, {r['errors']} failed turns, "
                f"RSS {r['rss_start_mb']} -> {r['rss_end_mb']} MB"
            )
    meta = {
        "budget": args.budget,
        "turns": turns,
        "max_tokens": args.max_tokens,
        "slots": 8,
        "decoding": "continuous batching",
    }
    if args.label is not None:
        rows = merge_rows(args.out, meta, rows, key=("build", "clients"))
    columns = [
        "build", "clients", "requests", "seconds", "tokens_per_s", "ttft_p50_s", "ttft_p95_s", "errors",
        "rss_start_mb", "rss_end_mb", "rss_max_mb",
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
