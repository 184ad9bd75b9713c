"""Video as a stream of frames: decoded one at a time (PyAV, which ships its own FFmpeg), sampled
at a fixed rate, each fed as an image after a short time marker.  Nothing per frame is kept
outside the KV cache, so an hour of video streams through the same bounded memory as a minute.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm


def time_marker(seconds: float) -> str:
    """`[hh:mm:ss]`, the text fed before each frame."""
    s = int(seconds)
    return f"[{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}]"


def file_frames(path: str | os.PathLike, fps: float) -> Iterator[tuple[float, np.ndarray]]:
    """(time in seconds, H x W x 3 uint8 frame) at about fps frames per second of the file's time.

    Raises FileNotFoundError or ValueError (unreadable file, no video stream) before yielding."""
    try:
        import av
    except ImportError as exc:
        raise ImportError('video files need PyAV: pip install "infmllm-gguf[vision]"') from exc
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, ValueError) as exc:
        raise ValueError(f"could not read the video {path}: {exc}") from exc
    return _decode(container, path, fps)


def _decode(container: Any, path: Path, fps: float) -> Iterator[tuple[float, np.ndarray]]:
    import av

    with container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        next_t = 0.0
        try:
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else next_t
                if t + 1e-6 < next_t:
                    continue
                next_t = t + 1.0 / fps
                yield t, frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as exc:
            raise ValueError(f"could not decode the video {path}: {exc}") from exc


def write_video(path: str | os.PathLike, frames: Sequence[Any], fps: int = 1) -> Path:
    """Write frames (PIL images or H x W x 3 uint8 arrays, all one size) as an MPEG-4 file at
    near-lossless quality: a real encoded video for tests and benchmarks."""
    import av

    path = Path(path)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        first = np.asarray(frames[0])
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "1"}
        for frame in frames:
            rgb = np.asarray(frame.convert("RGB") if hasattr(frame, "convert") else frame)
            rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode())
    return path


def iterable_frames(frames: Iterable[Any], fps: float) -> Iterator[tuple[float, Any]]:
    """Frames from any iterable (a webcam loop, a list of pictures), the i-th at time i / fps."""
    for i, frame in enumerate(frames):
        yield i / fps, frame


def frames_of(source: str | os.PathLike | Iterable[Any], fps: float) -> Iterator[tuple[float, Any]]:
    """(time, frame) pairs of a video file or an iterable of frames; the first frame is read
    before this returns, so an unreadable or empty video fails here, before anything is fed."""
    if not isinstance(fps, (int, float)) or not np.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if isinstance(source, (str, os.PathLike)):
        frames = file_frames(source, fps)
    elif isinstance(source, Iterable) and not isinstance(source, (bytes, bytearray, np.ndarray)):
        frames = iterable_frames(source, fps)
    else:
        raise TypeError(f"a video is a file path or an iterable of frames, not {type(source).__name__}")
    first = next(frames, None)
    if first is None:
        name = f" {source}" if isinstance(source, (str, os.PathLike)) else ""
        raise ValueError(f"the video{name} has no frames")
    return itertools.chain([first], frames)


def expected_frames(source: str | os.PathLike | Iterable[Any], fps: float) -> int | None:
    """How many frames frames_of will give, when the container says (for a progress bar)."""
    if isinstance(source, (str, os.PathLike)):
        try:
            import av

            with av.open(str(source)) as container:
                duration = container.duration  # microseconds
            return max(1, int(duration / 1e6 * fps)) if duration else None
        except Exception:  # only a progress bar's total depends on it
            return None
    return len(source) if hasattr(source, "__len__") else None


def feed_video(
    feed_image: Callable[..., int],
    stream: Any,
    source: str | os.PathLike | Iterable[Any],
    fps: float,
    timestamps: bool,
    on_frame: Callable[[dict[str, Any]], None] | None,
    progress: bool,
) -> dict[str, Any]:
    """`Llama.feed_video`: each sampled frame through feed_image(frame, prompt=...) (which
    returns the cells fed), preceded by its time marker with `timestamps`, with a progress bar
    and on_frame(stats) after each; returns the run's stats.  An unreadable or empty video
    fails before any frame."""
    frames = frames_of(source, fps)
    st = stream.stats
    evictions_before, t0 = st.evictions, time.perf_counter()
    n_frames = n_cells = 0
    t = 0.0
    with tqdm(total=expected_frames(source, fps), unit="frame", desc="video", disable=not progress) as bar:
        for t, frame in frames:
            n_cells += feed_image(frame, prompt=f"\n{time_marker(t)} " if timestamps else None)
            n_frames += 1
            info = {
                "frame": n_frames,
                "time": t,
                "n_cached": stream.n_cached,
                "evictions": st.evictions - evictions_before,
                "seconds_per_frame": (time.perf_counter() - t0) / n_frames,
            }
            bar.update()
            bar.set_postfix(t=time_marker(t), cached=info["n_cached"], evictions=info["evictions"])
            if on_frame is not None:
                on_frame(info)
    seconds = time.perf_counter() - t0
    return {
        "frames": n_frames,
        "video_seconds": t,
        "cells": n_cells,
        "seconds": seconds,
        "seconds_per_frame": seconds / n_frames,
        "evictions": st.evictions - evictions_before,
        "n_cached": stream.n_cached,
    }
