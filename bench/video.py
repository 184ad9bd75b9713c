"""Video streams through the bounded cache: speed, memory and recall of frame facts, per policy.

The video is synthetic and readable offline: SmolLM2 with the closed-form codebook projector
(infmllm_gguf.codebook) reads each frame's words exactly as if they were text.  Frame i (1 fps,
each after its `[hh:mm:ss]` marker) shows 16 random codebook words; some frames show a fact
instead, "the code for NAME is NAME d d d d", asked once `delay` frames later in completion form
("Question: what is the code for NAME? Answer: the code for NAME is NAME") and taken back after
the answer.  An answer is right when its first four digits are the code.  The full cache is the
reference while the stream fits in its n_ctx: its answers say what the model can do with
everything in view.

    python -m bench video --quick   # 600 frames, budget 1024, delays 1/10/100 (minutes)
    python -m bench video           # 3600 frames (an hour at 1 fps), budgets 1024 and 2048

Also times a real encoded video file (written here with PyAV): decoding alone and the whole
feed.  Writes bench/results/video.json, video.csv (per-checkpoint rows), video_recall.csv and
video.png.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench.common import (
    Stopwatch,
    add_out,
    current_rss_mb,
    grouped_bars,
    peak_rss_mb,
    pyplot,
    save_figure,
    write_csv,
    write_results,
    wrote,
)
from bench.configs import CONFIGS, add_policies
from infmllm_gguf import ContextFullError, KVPolicy, Llama, Recall, default_model_path

DIGITS = [str(d) for d in range(10)]

# The name right before the code lets the model find the fact by its name alone: the 135M model
# copies it far more often than with "... NAME is d d d d".
FACT = "the code for {name} is {name} {code}"
QUESTION = "\nQuestion: what is the code for {name}?\nAnswer: the code for {name} is {name}"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="600 frames, budget 1024, delays 1 10 100")
    ap.add_argument("--model", default=None)
    ap.add_argument("--frames", type=int, default=3600)
    ap.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048])
    add_policies(ap, ["full", "streamingllm", "h2o", "snapkv", "infmllm"])
    ap.add_argument("--delays", type=int, nargs="+", default=[1, 10, 100, 1000])
    ap.add_argument("--per-delay", type=int, default=3, help="facts asked at each delay")
    ap.add_argument(
        "--offset", type=float, default=0.0, help="first fact of a delay at this part of a spacing"
    )
    ap.add_argument("--full-ctx", type=int, default=16384, help="n_ctx of the full-cache reference")
    ap.add_argument("--every", type=int, default=60, help="frames between checkpoint rows")
    ap.add_argument("--file-frames", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    add_out(ap, "video")


@contextlib.contextmanager
def codebook(model: str) -> Iterator[tuple[Path, list[str]]]:
    """The codebook projector of `model`, in a temporary file, and its words."""
    from infmllm_gguf.codebook import read_codebook, write_codebook_mmproj

    with tempfile.TemporaryDirectory() as tmp:
        mmproj = write_codebook_mmproj(model, Path(tmp) / "mmproj-codebook.gguf")
        yield mmproj, list(read_codebook(mmproj))


def plan(
    words: list[str], n_frames: int, delays: list[int], per_delay: int, seed: int, offset: float = 0.0
) -> tuple[dict, dict]:
    """Which frames show a fact and when each is asked: the facts of each delay are spread
    evenly, the first `offset` of a spacing in (0: from the start, while the full cache fits).

    Returns ({frame: (name, code)}, {frame: (name, code, delay)})."""
    rng = np.random.default_rng(seed)
    names = [w for w in words if w.isalpha() and len(w) > 3]
    rng.shuffle(names)
    facts: dict[int, tuple[str, str]] = {}
    asks: dict[int, tuple[str, str, int]] = {}
    for d in delays:
        span = n_frames - d - 2
        for j in range(per_delay):
            frame = 1 + int((j + offset) * span / per_delay)
            while frame in facts or frame + d in asks:
                frame += 1
            name, code = names[len(facts)], " ".join(rng.choice(DIGITS, 4))
            facts[frame], asks[frame + d] = (name, code), (name, code, d)
    return facts, asks


def frames(mmproj: Path, words: list[str], facts: dict, n_frames: int, seed: int) -> Iterator[np.ndarray]:
    """The stream's pictures; fact names never appear in the filler."""
    from infmllm_gguf.codebook import render_words

    rng = np.random.default_rng(seed + 1)
    names = {name for name, _ in facts.values()}
    filler = [w for w in words if w.isalpha() and w not in names]
    for i in range(n_frames):
        if i in facts:
            name, code = facts[i]
            yield render_words(FACT.format(name=name, code=code), mmproj)
        else:
            yield render_words(list(rng.choice(filler, 16)), mmproj)


def ask(llm: Llama, name: str) -> str:
    """Ask aside: the question and answer are taken back afterwards (while still cached), since
    a small model copies an earlier answer instead of reading the frame."""
    mark = llm.n_streamed
    llm.feed(QUESTION.format(name=name), add_bos=False)
    answer = llm.generate_text(10, temperature=0.0, stop="\n")
    if not llm.rewind(mark):
        llm.feed("\n", add_bos=False)  # the question made the cache evict: it stays, closed
    return answer


def stream(
    label: str,
    policy: KVPolicy,
    recall: Recall | None,
    args: argparse.Namespace,
    mmproj: Path,
    words: list[str],
) -> tuple[dict, list[dict], list[dict]]:
    """One stream of args.frames frames through `policy` (with `recall`); the full cache gets
    n_ctx args.full_ctx.  Returns (summary, checkpoint rows, fact rows)."""
    facts, asks = plan(words, args.frames, args.delays, args.per_delay, args.seed, args.offset)
    n_ctx = policy.capacity if policy.evicts else args.full_ctx
    llm = Llama(args.model, n_ctx=n_ctx, kv_policy=policy, recall=recall, mmproj_path=mmproj)
    rows, facts_asked = [], []
    clock = Stopwatch()
    last = [clock.seconds, 0]

    def on_frame(info: dict) -> None:
        n = info["frame"]
        if n - 1 in asks:
            name, code, delay = asks[n - 1]
            answer = ask(llm, name)
            got = "".join(ch for ch in answer if ch.isdigit())[:4]
            facts_asked.append(
                {
                    "run": label,
                    "frame": n - 1,
                    "delay": delay,
                    "name": name,
                    "code": code,
                    "answer": answer.strip(),
                    "correct": got == code.replace(" ", ""),
                }
            )
        if n % args.every == 0 or n == args.frames:
            now = clock.seconds
            rows.append(
                {
                    "run": label,
                    "frame": n,
                    "cached": llm.n_cached,
                    "rss_mb": current_rss_mb(),
                    "s_per_frame": (now - last[0]) / (n - last[1]),
                    "evictions": llm.kv_stats()["evictions"],
                }
            )
            last[:] = [now, n]

    failed_at = None
    try:
        llm.feed_video(frames(mmproj, words, facts, args.frames, args.seed), fps=1.0, on_frame=on_frame)
    except ContextFullError:
        failed_at = rows[-1]["frame"] if rows else 0
        print(f"{label}: the full cache is full after about {failed_at} frames", file=sys.stderr)
    llm.close()
    summary = summarise(label, clock.seconds, failed_at, rows, facts_asked, args.delays)
    print(f"{label}: {summary}")
    return summary, rows, facts_asked


def summarise(
    label: str,
    seconds: float,
    failed_at: int | None,
    rows: list[dict],
    facts_asked: list[dict],
    delays: list[int],
) -> dict:
    """A stream's summary: its time, where the full cache filled up, recall per delay, and the
    checkpoints' median s/frame, most cells and first and last RSS."""
    return {
        "run": label,
        "seconds": seconds,
        "full_at_frame": failed_at,
        "recall_by_delay": {
            d: float(np.mean([x["correct"] for x in facts_asked if x["delay"] == d]))
            for d in delays
            if any(x["delay"] == d for x in facts_asked)
        },
        "s_per_frame_median": float(np.median([x["s_per_frame"] for x in rows])),
        "cached_max": max(x["cached"] for x in rows),
        "rss_first_mb": rows[0]["rss_mb"],
        "rss_last_mb": rows[-1]["rss_mb"],
    }


def time_file(args: argparse.Namespace, mmproj: Path, words: list[str]) -> dict:
    """A real encoded video (MPEG-4 Part 2 written with PyAV): decoding alone, then the whole feed."""
    from infmllm_gguf.codebook import render_words
    from infmllm_gguf.video import file_frames, write_video

    filler = [w for w in words if w.isalpha()]
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        pictures = [render_words(list(rng.choice(filler, 16)), mmproj) for _ in range(args.file_frames)]
        write_video(path, pictures)
        clock = Stopwatch()
        n = sum(1 for _ in file_frames(path, fps=1.0))
        decode_s = clock.seconds
        policy, _ = CONFIGS["infmllm"].build(1024)
        llm = Llama(args.model, n_ctx=1152, kv_policy=policy, mmproj_path=mmproj)
        stats = llm.feed_video(path, fps=1.0)
        llm.close()
    return {
        "file_frames": n,
        "decode_ms_per_frame": 1000 * decode_s / n,
        "feed_s_per_frame": stats["seconds_per_frame"],
        "feed_frames": stats["frames"],
    }


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.frames, args.budgets, args.delays, args.per_delay = 600, [1024], [1, 10, 100], 5
    args.model = args.model or str(default_model_path())

    with codebook(args.model) as (mmproj, words):
        runs, rows, recall = [], [], []
        for name in args.policies:
            config = CONFIGS[name]
            for budget in [None] if config.full else args.budgets:
                label = f"full@{args.full_ctx}" if config.full else f"{name}@{budget}"
                summary, run_rows, run_recall = stream(label, *config.build(budget), args, mmproj, words)
                runs.append(summary)
                rows += run_rows
                recall += run_recall
        file_timing = time_file(args, mmproj, words)
    print(f"encoded video file: {file_timing}")
    meta = {
        "frames": args.frames,
        "budgets": args.budgets,
        "delays": args.delays,
        "per_delay": args.per_delay,
        "full_ctx": args.full_ctx,
        "runs": runs,
        "file": file_timing,
        "recall": recall,
        "peak_rss_mb": peak_rss_mb(),
    }
    out = write_results(args.out, meta, rows, list(rows[0]))
    write_csv(out.with_name(out.name + "_recall.csv"), recall, list(recall[0]))
    plot(rows, runs, args.delays, out.with_suffix(".png"))
    wrote(out, "json", "csv", "png")
    print(f"wrote {out}_recall.csv")
    return 0


def plot(rows: list[dict], runs: list[dict], delays: list[int], path: Path) -> None:
    fig, axes = pyplot().subplots(2, 2, figsize=(12, 8))
    for run_summary in runs:
        mine = [r for r in rows if r["run"] == run_summary["run"]]
        x = [r["frame"] for r in mine]
        axes[0, 0].plot(x, [r["cached"] for r in mine], label=run_summary["run"])
        axes[0, 1].plot(x, [r["rss_mb"] for r in mine], label=run_summary["run"])
        axes[1, 0].plot(x, [r["s_per_frame"] for r in mine], label=run_summary["run"])
    for ax, title in zip(axes.flat[:3], ["cache cells", "process RSS (MB)", "seconds per frame"]):
        ax.set_title(title)
        ax.set_xlabel("frame (1 fps)")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    bars = {r["run"]: [r["recall_by_delay"].get(d, np.nan) for d in delays] for r in runs}
    grouped_bars(axes[1, 1], bars, [f"{d} frames" for d in delays])
    axes[1, 1].set_title("recall of a frame's fact, asked later")
    axes[1, 1].set_ylim(0, 1.05)
    save_figure(fig, path)
