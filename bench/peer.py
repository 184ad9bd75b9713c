"""Our server beside stock llama-server (built from the pinned llama.cpp), under the same load.

llama-server is built here from the pinned llama-cpp-python sdist (cmake/upstream.json, the
sdist cached and hash-checked as the package build does), unpatched, CPU only, once: the build
(build/peer-llama-server-<sha>/) is reused by later runs; `--llama-server PATH` uses a binary
you have.  Then each server in turn (never both at once) serves the embedded SmolLM2 with the
same threads, slots and cells per slot, a fresh process per run:

- llama-server with 8 slots of 1,152 cells each (-np 8 -c 9216, the KV cache not unified);
- `infmllm-gguf serve --slots 8 --n-ctx 1152 --budget 1024` (budget + chunk = 1,152 cells).

llama.cpp rounds each slot up to a multiple of 256 cells, so both allocate 1,280 per slot:
llama-server fills all of them, ours keeps at most its 1,152.

The load, per number of clients (1, 2, 4, 8, 16): each client holds one conversation through
the `openai` client, streaming 16-token replies, each turn sending the whole conversation;
the conversations fit llama-server's slot.  One more run: one client's long conversation
that outgrows llama-server's slot (llama-server answers 400 once the prompt exceeds it; ours
evicts and answers every turn).  Per server and run: aggregate generated tok/s, time to first
token p50 and p95, failed turns by HTTP status, the server's peak RSS.  And a single stream's
rate: one client, three 256-token replies, tokens per second after each reply's first token.

    python -m bench peer --build-only     # build llama-server (or find the cached build)
    python -m bench peer --quick          # 5 turns per client (minutes)
    python -m bench peer                  # 20 turns per client

Writes bench/results/peer.json, peer.csv and peer.png.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tqdm import tqdm

from bench import ROOT
from bench.chat_load import MODEL, free_port, load, start, stop, stream_rate
from bench.common import (
    add_out,
    log,
    process_rss_mb,
    progress,
    pyplot,
    save_figure,
    write_results,
    wrote,
)

sys.path.insert(0, str(ROOT / "cmake"))
from prepare_source import LLAMA_SUBDIR, UPSTREAM, cache_dir, download_sdist  # noqa: E402

SERVERS = ("llama-server", "ours")
STREAM_TOKENS = 256  # the single stream's replies


# --- building llama-server -------------------------------------------------------------------


def build_dir() -> Path:
    """The (git-ignored) folder of this pin's llama-server build: source and cmake tree."""
    return ROOT / "build" / f"peer-llama-server-{UPSTREAM['sha256'][:12]}"


def extract_llama_cpp(sdist: Path, dest: Path) -> None:
    """The sdist's llama.cpp tree as it is (no patches), without the submodule's .git file
    (it points to a repository the sdist lacks, and llama.cpp's build asks git for its
    version)."""
    top = f"{UPSTREAM['sdist'].removesuffix('.tar.gz')}/{LLAMA_SUBDIR.as_posix()}/"
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for member in tar.getmembers():
            rel = member.name[len(top) :] if member.name.startswith(top) else ""
            if rel and (member.isfile() or member.isdir()) and rel.split("/")[0] != ".git":
                member.name = rel
                members.append(member)
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **kwargs)


def cmake_options() -> list[str]:
    """Release, CPU only, only what llama-server needs, nothing fetched from the network (no web
    UI: neither npm nor its prebuilt download), and no AMX kernels on a CPU that has them, as
    the package's own build (CMakeLists.txt says why)."""
    options = [
        "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_CUDA=OFF", "-DGGML_VULKAN=OFF",
        "-DGGML_METAL=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
    ]  # fmt: skip
    if " amx" in Path("/proc/cpuinfo").read_text():
        flags = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        options += [f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}"]
    return options


def run_step(cmd: list[str], tree: Path) -> None:
    """Run one build command, its output on ours, the command line first.  Git stops above
    tree: llama.cpp names its build after the commit it finds, which would be this checkout's."""
    log(f"$ {shlex.join(cmd)}")
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tree.parent)}
    if subprocess.run(cmd, env=env).returncode != 0:
        raise SystemExit(f"llama-server build step failed: {shlex.join(cmd)}")


def build_llama_server(jobs: int) -> Path:
    """The stock llama-server of the pinned sdist, built on first use and cached."""
    base = build_dir()
    binary = base / "cmake" / "bin" / "llama-server"
    if binary.is_file():
        log(f"llama-server: using the cached build {binary}")
        return binary
    src = base / "src"
    if not (src / "CMakeLists.txt").is_file():
        sdist = download_sdist(cache_dir())  # the cached file when its sha256 matches the pin
        log(f"llama-server: extracting llama.cpp from {sdist} into {src}")
        staging = base / "src.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        extract_llama_cpp(sdist, staging)
        staging.rename(src)
    if not (base / "cmake" / "CMakeCache.txt").is_file():
        run_step(["cmake", "-S", str(src), "-B", str(base / "cmake"), *cmake_options()], base)
    run_step(["cmake", "--build", str(base / "cmake"), "--target", "llama-server", "-j", str(jobs)], base)
    log(f"llama-server: built {binary}")
    return binary


# --- the servers -----------------------------------------------------------------------------


def server_command(server: str, args: argparse.Namespace, port: str, sessions: str) -> list[str]:
    """The command line of one server: the same model, threads, slots and cells per slot."""
    if server == "llama-server":
        return [
            str(args.llama_server), "--model", str(args.model), "--alias", MODEL, "--host", "127.0.0.1",
            "--port", port, "--threads", str(args.threads), "--threads-batch", str(args.threads),
            "--parallel", str(args.slots), "--ctx-size", str(args.slots * args.n_ctx), "--no-kv-unified",
            "--flash-attn", "off", "--no-webui", "--offline",
        ]  # fmt: skip
    return [
        args.python, "-m", "infmllm_gguf.cli", "serve", "--model", str(args.model), "--model-alias", MODEL,
        "--host", "127.0.0.1", "--port", port, "--threads", str(args.threads), "--slots", str(args.slots),
        "--n-ctx", str(args.n_ctx), "--budget", str(args.budget), "--sessions-dir", sessions,
        "--max-queue", str(max(args.clients)),
    ]  # fmt: skip


def run_one(
    server: str, args: argparse.Namespace, scenario: str, clients: int, turns: int, bar: tqdm
) -> dict:
    """A fresh server process (memory from its start), one load against it, the server stopped."""
    with tempfile.TemporaryDirectory() as tmp:
        sessions = Path(tmp) / "sessions"
        sessions.mkdir()
        port = free_port()
        cmd = server_command(server, args, str(port), str(sessions))
        # from the sessions folder: in a checkout without a build Python would import the sources
        proc = start(cmd, port, cwd=sessions, log=Path(tmp) / "server.log")
        try:
            if scenario == "stream":
                row = stream_rate(port, turns, STREAM_TOKENS)
                bar.update(turns)
            else:
                row = load(port, proc.pid, clients, turns, args.max_tokens, bar)
            row["rss_peak_mb"] = round(process_rss_mb(proc.pid, "VmHWM"), 1)
        finally:
            stop(proc)
    return row


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="5 turns per client")
    ap.add_argument("--turns", type=int, default=20, help="turns per client (fitting llama-server's slot)")
    ap.add_argument(
        "--long-turns", type=int, default=60,
        help="turns of the one long conversation, which outgrows llama-server's slot (0: no such run)",
    )  # fmt: skip
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per reply")
    ap.add_argument("--threads", type=int, default=2, help="each server's threads")
    ap.add_argument("--slots", type=int, default=8, help="each server's slots")
    ap.add_argument("--n-ctx", type=int, default=1152, help="cells per slot, both servers")
    ap.add_argument(
        "--budget", type=int, default=1024,
        help="our KV budget per slot; budget + chunk (budget / 8) must fit --n-ctx",
    )  # fmt: skip
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M)")
    ap.add_argument(
        "--llama-server", default=None, help="a llama-server binary (default: build the pinned one)"
    )
    ap.add_argument("--build-jobs", type=int, default=os.cpu_count() or 1, help="parallel compile jobs")
    ap.add_argument("--build-only", action="store_true", help="build (or find) llama-server and stop")
    ap.add_argument(
        "--python", default=sys.executable, help="the Python whose infmllm-gguf serves (default: this one)"
    )
    add_out(ap, "peer")


def run(args: argparse.Namespace) -> int:
    # absolute paths: the servers run from a temporary folder
    args.llama_server = (
        Path(args.llama_server).resolve() if args.llama_server else build_llama_server(args.build_jobs)
    )
    if args.build_only:
        print(args.llama_server)
        return 0
    if args.model is None:
        from infmllm_gguf.models import default_model_path

        args.model = default_model_path()
    args.model = Path(args.model).resolve()
    turns = 5 if args.quick else args.turns
    runs = [("shared", clients, turns) for clients in args.clients]
    if args.long_turns:
        runs.append(("long", 1, args.long_turns))
    runs.append(("stream", 1, 3))
    rows = []
    with progress(len(SERVERS) * sum(c * t for _, c, t in runs), "peer", unit="turn") as bar:
        for server in SERVERS:  # one server at a time, never both
            for scenario, clients, n in runs:
                row = run_one(server, args, scenario, clients, n, bar)
                r = {"server": server, "scenario": scenario, **row}
                rows.append(r)
                bar.write(
                    f"{server}, {scenario}, {clients} clients x {n} turns: {r['tokens_per_s']} tok/s, "
                    f"ttft p50 {r['ttft_p50_s']} s p95 {r['ttft_p95_s']} s, "
                    f"{r['errors']} failed turns {r['errors_by_status']}, peak RSS {r['rss_peak_mb']} MB"
                )
    meta = {
        "turns": turns,
        "long_turns": args.long_turns,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "slots": args.slots,
        "n_ctx_per_slot": args.n_ctx,
        "budget": args.budget,
        "model": Path(args.model).name,
        "llama_cpp_commit": UPSTREAM["llama_cpp_commit"],
        "commands": {s: shlex.join(server_command(s, args, "PORT", "SESSIONS")) for s in SERVERS},
    }
    columns = [
        "server", "scenario", "clients", "turns", "requests", "seconds", "tokens_per_s", "ttft_p50_s",
        "ttft_p95_s", "errors", "errors_by_status", "rss_peak_mb",
    ]  # fmt: skip
    out = write_results(args.out, meta, rows, columns)
    plot(rows, out)
    wrote(out, "json", "csv", "png")
    return 0


def plot(rows: list[dict], out: Path) -> None:
    """Throughput, TTFT and peak RSS against clients for both servers, and ours / llama-server;
    the long conversation's failed turns in the title."""
    fig, ax = pyplot().subplots(2, 2, figsize=(12, 8))
    shared = [r for r in rows if r["scenario"] == "shared"]
    by = {(r["server"], r["clients"]): r for r in shared}
    for server in SERVERS:
        mine = [r for r in shared if r["server"] == server]
        clients = [r["clients"] for r in mine]
        ax[0, 0].plot(clients, [r["tokens_per_s"] for r in mine], "o-", label=server)
        p95 = [float("nan") if r["ttft_p95_s"] is None else r["ttft_p95_s"] for r in mine]
        ax[0, 1].plot(clients, p95, "o-", label=f"{server} p95")
        ax[1, 1].plot(clients, [r["rss_peak_mb"] for r in mine], "o-", label=server)
    both = sorted(c for s, c in by if s == "ours" and ("llama-server", c) in by)

    def ratio(key: str) -> list[float]:
        values = [(by["ours", c][key], by["llama-server", c][key]) for c in both]
        return [ours / theirs if ours and theirs else float("nan") for ours, theirs in values]

    ax[1, 0].plot(both, ratio("tokens_per_s"), "o-", label="tok/s (higher: ours faster)")
    ax[1, 0].plot(both, ratio("ttft_p95_s"), "s--", label="TTFT p95 (lower: ours sooner)")
    ax[1, 0].axhline(1.0, color="grey", lw=0.8)
    ax[0, 0].set(xlabel="concurrent clients", ylabel="generated tokens / s (all clients)", title="throughput")
    ax[0, 1].set(xlabel="concurrent clients", ylabel="seconds", title="time to first token, p95")
    ax[1, 0].set(xlabel="concurrent clients", ylabel="ours / llama-server", title="ratio")
    ax[1, 1].set(xlabel="concurrent clients", ylabel="MB", title="server peak RSS")
    ticks = sorted({r["clients"] for r in shared})
    for a in ax.flat:
        a.set_xscale("log", base=2)
        a.set_xticks(ticks, [str(c) for c in ticks])
        a.minorticks_off()
        a.grid(alpha=0.3)
        a.legend()
    title = []
    long = {r["server"]: r for r in rows if r["scenario"] == "long"}
    if long:
        turns = next(iter(long.values()))["turns"]
        failed = ", ".join(f"{s} {r['errors']} failed" for s, r in long.items())
        title.append(f"one conversation of {turns} turns: {failed}")
    stream = {r["server"]: r for r in rows if r["scenario"] == "stream"}
    if stream:
        rates = ", ".join(f"{s} {r['tokens_per_s']} tok/s" for s, r in stream.items())
        title.append(f"one stream after its first token: {rates}")
    fig.suptitle("\n".join(title))
    save_figure(fig, out.with_suffix(".png"), dpi=120)
