"""Choose InfMLLM's defaults for video streams by recall of frame facts (the video benchmark's stream).

InfMLLM's text defaults came from streaming perplexity (the sweep-infmllm benchmark), which
mostly rewards a large recent window.  A video stream asks something else: whether a frame's
content is still in the cache when asked about tens or hundreds of frames later, after the
recent window has moved on.  This runs the same synthetic codebook stream as the video
benchmark through InfMLLM settings (one knob at a time around the text defaults) next to
StreamingLLM, and reports recall per delay.

    python -m bench sweep-video                 # 300 frames, budget 1024, delays 10/25/35/60

Writes bench/results/sweep_video.json and .csv.
"""

from __future__ import annotations

import argparse

from bench.common import add_out, write_results, wrote
from bench.configs import CONFIGS
from bench.sweep_infmllm import infmllm, one_at_a_time
from bench.video import codebook, stream
from infmllm_gguf import InfMLLM, KVPolicy, default_model_path

BASE = {"recent_fraction": InfMLLM.default_recent_fraction, "local_window": 0, "protect_newest_image": False}
SWEEP = {"recent_fraction": [0.25, 0.5, 0.75], "local_window": [2], "protect_newest_image": [True]}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--delays", type=int, nargs="+", default=[10, 25, 35, 60])
    ap.add_argument("--per-delay", type=int, default=6, help="facts asked at each delay")
    ap.add_argument("--seed", type=int, default=0)
    add_out(ap, "sweep_video")


def run(args: argparse.Namespace) -> int:
    args.model = args.model or str(default_model_path())
    args.every, args.full_ctx = args.frames, 0  # one checkpoint row per run; no full-cache run here
    args.offset = 0.5  # facts mid-spacing: no reference run needs them early

    streamingllm, _ = CONFIGS["streamingllm"].build(args.budget)
    settings: list[tuple[str, dict, KVPolicy]] = [("streamingllm", {}, streamingllm)]
    settings += [("infmllm", cfg, infmllm(args.budget, cfg)) for cfg in one_at_a_time(BASE, SWEEP)]
    rows = []
    with codebook(args.model) as (mmproj, words):
        for name, cfg, policy in settings:
            label = name + "".join(f" {k}={v}" for k, v in cfg.items())
            summary, _, _ = stream(label, policy, None, args, mmproj, words)
            recall = summary["recall_by_delay"]
            rows.append(
                {
                    "policy": name,
                    **cfg,
                    **{f"recall_{d}": recall.get(d) for d in args.delays},
                    "s_per_frame": summary["s_per_frame_median"],
                }
            )
    meta = {"frames": args.frames, "budget": args.budget, "delays": args.delays, "per_delay": args.per_delay}
    columns = ["policy", *BASE, *(f"recall_{d}" for d in args.delays), "s_per_frame"]
    out = write_results(args.out, meta, rows, columns)
    for row in rows:
        print(", ".join(f"{k}={row.get(k)}" for k in columns))
    wrote(out, "json", "csv")
    return 0
