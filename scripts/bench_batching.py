"""What batching the decodes of several slots would gain: N sequences each decoding one token,
as N llama_decode calls (what the server does: one request decodes at a time) or as one call
holding N tokens, one per sequence (continuous batching), in the server's context layout
(8 sequence slots, a KV stream each, every slot holding --context tokens already).

    python scripts/bench_batching.py            # a minute

Writes bench/results/batching.json, batching.csv and batching.png.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from infmllm_gguf._llama_cpp import llama_cpp as lc
from results_io import RESULTS, write_results

from infmllm_gguf import default_model_path
from infmllm_gguf.system import physical_cores
from infmllm_gguf.texts import genesis

SLOTS = 8


def decode(ctx, batch, entries: list[tuple[int, int, int]]) -> None:
    """One llama_decode of (token, position, seq) entries, logits for each."""
    batch.n_tokens = len(entries)
    for i, (tok, pos, seq) in enumerate(entries):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, True
    if lc.llama_decode(ctx, batch) != 0:
        raise RuntimeError("llama_decode failed")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=256, help="tokens already in each slot")
    ap.add_argument("--rounds", type=int, default=32, help="tokens decoded per sequence and mode")
    ap.add_argument("--out", default=str(RESULTS / "batching"))
    args = ap.parse_args()
    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(str(default_model_path()).encode(), lc.llama_model_default_params())
    vocab = lc.llama_model_get_vocab(model)
    data = genesis()[:20000].encode()
    buf = (lc.llama_token * len(data))()
    n = lc.llama_tokenize(vocab, data, len(data), buf, len(buf), True, False)
    text = np.array(buf[:n], np.int32)
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
            t0 = time.perf_counter()
            for r in range(args.rounds):
                entries = [(int(text[args.context + r]), args.context + r, seq) for seq in range(n_seq)]
                if mode == "batched":
                    decode(ctx, batch, entries)
                else:
                    for e in entries:
                        decode(ctx, batch, [e])
            seconds[mode] = time.perf_counter() - t0
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    seqs = [r["sequences"] for r in rows]
    ax.plot(seqs, [r["serial_tok_s"] for r in rows], "o-", label="one llama_decode per sequence")
    ax.plot(seqs, [r["batched_tok_s"] for r in rows], "s-", label="one llama_decode for all")
    ax.set(xlabel="sequences decoding together", ylabel="tokens / s", title="decode batching across slots")
    ax.set_xscale("log", base=2)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out}.json, .csv, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
