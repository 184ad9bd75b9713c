"""What batching the decodes of several slots would gain: serial against batched decodes.

N sequences each decode one token, as N llama_decode calls (one sequence at a time) or as one
call holding N tokens, one per sequence (what the server's continuous batching does), in the
server's context layout (8 sequence slots, a KV stream each, every slot holding --context
tokens already).

    python -m bench batching            # a minute

Writes bench/results/batching.json, batching.csv and batching.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import Stopwatch, add_out, pyplot, save_figure, write_results, wrote
from bench.native import load_model
from infmllm_gguf.bindings import llama_cpp as lc
from infmllm_gguf.system import physical_cores

SLOTS = 8


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--context", type=int, default=256, help="tokens already in each slot")
    ap.add_argument("--rounds", type=int, default=32, help="tokens decoded per sequence and mode")
    add_out(ap, "batching")


def decode(ctx: int, batch: lc.llama_batch, entries: list[tuple[int, int, int]]) -> None:
    """One llama_decode of (token, position, seq) entries, logits for each."""
    batch.n_tokens = len(entries)
    for i, (tok, pos, seq) in enumerate(entries):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, True
    if lc.llama_decode(ctx, batch) != 0:
        raise RuntimeError("llama_decode failed")


def run(args: argparse.Namespace) -> int:
    model, text = load_model()
    p = lc.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch = 512 * SLOTS, 512, 512
    p.n_seq_max, p.kv_unified = SLOTS, False
    p.n_threads = p.n_threads_batch = physical_cores()
    p.no_perf = True
    ctx = lc.llama_init_from_model(model, p)
    batch = lc.llama_batch_init(512, 0, 1)
    for seq in range(SLOTS):  # fill every slot
        for i in range(0, args.context, 256):
            piece = text[i : min(args.context, i + 256)]
            decode(ctx, batch, [(int(t), i + j, seq) for j, t in enumerate(piece)])
    rows = []
    for n_seq in (1, 2, 4, 8):
        seconds = {}
        for mode in ("serial", "batched"):
            mem = lc.llama_get_memory(ctx)
            for seq in range(n_seq):  # back to the filled context
                lc.llama_memory_seq_rm(mem, seq, args.context, -1)
            clock = Stopwatch()
            for r in range(args.rounds):
                entries = [(int(text[args.context + r]), args.context + r, seq) for seq in range(n_seq)]
                if mode == "batched":
                    decode(ctx, batch, entries)
                else:
                    for e in entries:
                        decode(ctx, batch, [e])
            seconds[mode] = clock.seconds
        tokens = n_seq * args.rounds
        rows.append({
            "sequences": n_seq,
            "serial_tok_s": round(tokens / seconds["serial"], 1),
            "batched_tok_s": round(tokens / seconds["batched"], 1),
            "gain": round(seconds["serial"] / seconds["batched"], 2),
        })  # fmt: skip
        print(rows[-1], flush=True)
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
    lc.llama_model_free(model)
    meta = {"context": args.context, "rounds": args.rounds, "slots": SLOTS, "threads": physical_cores()}
    out = write_results(args.out, meta, rows, ["sequences", "serial_tok_s", "batched_tok_s", "gain"])
    plot(rows, out.with_suffix(".png"))
    wrote(out, "json", "csv", "png")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(6, 4))
    seqs = [r["sequences"] for r in rows]
    ax.plot(seqs, [r["serial_tok_s"] for r in rows], "o-", label="one llama_decode per sequence")
    ax.plot(seqs, [r["batched_tok_s"] for r in rows], "s-", label="one llama_decode for all")
    ax.set(xlabel="sequences decoding together", ylabel="tokens / s", title="decode batching across slots")
    ax.set_xscale("log", base=2)
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=120)
