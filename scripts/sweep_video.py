"""Choose InfMLLM's defaults for video streams by recall of frame facts (bench_video's stream).

InfMLLM's text defaults came from streaming perplexity (scripts/sweep_infmllm.py), which mostly
rewards a large recent window.  A video stream asks something else: whether a frame's content
is still in the cache when asked about tens or hundreds of frames later, after the recent window
has moved on.  This runs the same synthetic codebook stream as bench_video.py through InfMLLM
settings (one knob at a time around the text defaults) next to StreamingLLM, and reports recall
per delay.

    python scripts/sweep_video.py                 # 300 frames, budget 1024, delays 10/25/35/60

Writes bench/results/sweep_video.json and .csv.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench_video import run
from results_io import RESULTS, write_results

from infmllm_gguf import default_model_path
from infmllm_gguf.codebook import read_codebook, write_codebook_mmproj
from infmllm_gguf.policies import InfMLLM, KVPolicy, StreamingLLM

BASE = {"recent_fraction": InfMLLM.default_recent_fraction, "local_window": 0, "protect_newest_image": False}
SWEEP = {"recent_fraction": [0.25, 0.5, 0.75], "local_window": [2], "protect_newest_image": [True]}


def variants() -> list[dict]:
    """The text defaults, then one knob changed at a time."""
    out = [dict(BASE)]
    for knob, values in SWEEP.items():
        out += [{**BASE, knob: v} for v in values]
    return out


def infmllm(budget: int, cfg: dict) -> InfMLLM:
    return InfMLLM(
        budget,
        recent=int(budget * cfg["recent_fraction"]),
        local_window=cfg["local_window"],
        protect_newest_image=cfg["protect_newest_image"],
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--delays", type=int, nargs="+", default=[10, 25, 35, 60])
    ap.add_argument("--per-delay", type=int, default=6, help="facts asked at each delay")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "sweep_video"))
    args = ap.parse_args()
    args.model = args.model or str(default_model_path())
    args.every, args.full_ctx = args.frames, 0  # one checkpoint row per run; no full-cache run here
    args.offset = 0.5  # facts mid-spacing: no reference run needs them early

    settings: list[tuple[str, dict, KVPolicy]] = [("streamingllm", {}, StreamingLLM(args.budget))]
    settings += [("infmllm", cfg, infmllm(args.budget, cfg)) for cfg in variants()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        mmproj = write_codebook_mmproj(args.model, Path(tmp) / "mmproj-codebook.gguf")
        words = list(read_codebook(mmproj))
        for name, cfg, policy in settings:
            label = name + "".join(f" {k}={v}" for k, v in cfg.items())
            summary, _, _ = run(label, policy, args, mmproj, words)
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
    print(f"wrote {out}.json/.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
