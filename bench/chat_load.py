"""Chat clients against an OpenAI-compatible server, for the server benchmarks: start a server
process and wait for it, then drive it with concurrent conversations through the `openai`
client, streaming, each turn re-sending the whole conversation as OpenAI clients do."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.common import Stopwatch, process_rss_mb

MODEL = "smollm2-135m"  # the model id clients send


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, cwd: str | Path, log: Path) -> subprocess.Popen:
    """Start a server (its output to log) and wait until its /health answers 200; a server that
    exits or does not come up stops the run with its log's end."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    for _ in range(600):
        if proc.poll() is not None:
            break
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except (urllib.error.URLError, ConnectionError):  # HTTPError too: 503 while loading
            time.sleep(0.2)
    stop(proc)
    tail = log.read_text(errors="replace")[-3000:]
    raise SystemExit(f"the server did not start: {' '.join(cmd)}\n{tail}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def load(port: int, pid: int, clients: int, turns: int, max_tokens: int, bar: tqdm) -> dict:
    """`clients` conversations at once of `turns` turns each; throughput, latency, failed turns
    and memory.  A failed turn (an HTTP error status, or the connection or stream broken) is
    counted by its status (`stream` for an error event after the stream began) and leaves the
    conversation as it was; the next turn goes on."""
    import openai  # the test extra's, imported when a run needs it

    ttft: list[float] = []
    tokens = [0]
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    rss: list[tuple[float, float]] = []
    done = threading.Event()
    clock = Stopwatch()

    def watch() -> None:
        while not done.is_set():
            rss.append((clock.seconds, process_rss_mb(pid)))
            time.sleep(0.5)

    def converse(i: int) -> None:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600
        )
        messages: list[dict] = []
        for turn in range(turns):
            # every conversation its own: a server cannot reuse one client's prompt for another
            ask = f"I am client {i}. Turn {turn}: tell me one more thing about the sea."
            messages.append({"role": "user", "content": ask})
            turn_clock = Stopwatch()
            first, parts, n, error = None, [], 0, None
            try:
                stream = client.chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0.7,
                    seed=1000 * i + turn, stream=True, user=f"bench-{clients}-{i}",
                )  # fmt: skip
                for chunk in stream:
                    text = chunk.choices[0].delta.content if chunk.choices else None
                    if text:
                        first = first or turn_clock.seconds
                        parts.append(text)
                        n += 1
            except openai.APIStatusError as exc:
                error = str(exc.status_code)
            except openai.APIConnectionError:
                error = "connection"
            except openai.APIError as exc:  # an error event in the stream: its code where it has one
                body = exc.body if isinstance(exc.body, dict) else {}
                error = f"stream {body['code']}" if "code" in body else "stream"
            if error is None:
                messages.append({"role": "assistant", "content": "".join(parts)})
            else:
                messages.pop()
            with lock:
                if error is not None:
                    errors[error] += 1
                elif first is not None:
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
    return summary(clients, turns, wall, tokens[0], ttft, rss, errors)


def summary(
    clients: int,
    turns: int,
    wall: float,
    tokens: int,
    ttft: list[float],
    rss: list[tuple[float, float]],
    errors: Counter[str],
) -> dict:
    """A load run's row: throughput, time-to-first-token percentiles (of the turns answered),
    failed turns (all, and by status as `400:3 503:1`), and the server's RSS (at the start and
    end of the samples past the first tenth, the warm-up; the peak; the trace)."""
    mem = np.array([m for _, m in rss])
    warm = mem[len(mem) // 10 :] if len(mem) > 10 else mem

    def percentile(q: float) -> float | None:
        return round(float(np.percentile(ttft, q)), 3) if ttft else None

    return {
        "clients": clients,
        "turns": turns,
        "requests": clients * turns,
        "seconds": round(wall, 1),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": percentile(50),
        "ttft_p95_s": percentile(95),
        "errors": sum(errors.values()),
        "errors_by_status": " ".join(f"{k}:{v}" for k, v in sorted(errors.items())),
        "rss_start_mb": round(float(warm[0]), 1),
        "rss_end_mb": round(float(warm[-1]), 1),
        "rss_max_mb": round(float(mem.max()), 1),
        "rss_trace": [(round(t, 1), round(m, 1)) for t, m in rss],
    }


def stream_rate(port: int, replies: int, max_tokens: int) -> dict:
    """One client, `replies` long replies one after another: tokens per second after the first
    (the per-token cost of a single stream, its prompt and first token left out)."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    rates, ttft = [], []
    for i in range(replies):
        clock, times = Stopwatch(), []
        ask = [{"role": "user", "content": f"Write a long story about the sea, part {i}."}]
        stream = client.chat.completions.create(
            model=MODEL, messages=ask, max_tokens=max_tokens, temperature=0.7, seed=i, stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                times.append(clock.seconds)
        if len(times) > 1:
            rates.append((len(times) - 1) / (times[-1] - times[0]))
            ttft.append(times[0])
    return {
        "clients": 1,
        "turns": replies,
        "requests": replies,
        "tokens_per_s": round(float(np.median(rates)), 1) if rates else None,
        "ttft_p50_s": round(float(np.median(ttft)), 3) if ttft else None,
        "ttft_p95_s": None,
        "errors": replies - len(rates),
        "errors_by_status": "",
    }
