"""Page-selection quality of the recall tier: does a recall bring back the pages that a full
cache, holding the whole stream, attends to most when the question is asked?

For each passkey stream (as bench_recall.py: the preamble unless --no-preamble, a KJV haystack
from a random start per key, the key at a depth, in a paragraph of its own, the question at the
end) two runs:
  - the full cache (n_ctx = stream length) with query capture on: the question's last
    `query_window` query rows of every layer and head, softmax-attended over all the cached
    keys (read back from the cache) exactly as the model does it, averaged over layers, heads
    and rows, summed per page of `page` stream tokens: the truly most-attended pages;
  - the policy with `Recall()`: after the question's turn recall, the pages it brought back.
Among the pages the policy evicted (those in its store) the k most attended by the full cache
are the targets; reported: the share of them that came back (k = 1, 3), whether the needle's
pages came back, and what a random choice of as many pages would find (recalled / stored).
Ranked by a page's attention to its tokens the policy no longer holds (`top3_evicted_found`):
what a recall can bring back, without the attention the sinks draw (they stay cached, and
page 0 holds them).  And as attention mass: the share of the full cache's attention to
evicted tokens that the recalled pages hold (`evicted_mass_recalled`), against the share the
same number of pages holds at best (`evicted_mass_best`, chosen knowing the attention).

    python scripts/bench_recall_selection.py --quick   # 2k tokens, 2 depths (minutes)
    python scripts/bench_recall_selection.py           # 2k and 4k tokens, 4 depths, 2 keys
    python scripts/bench_recall_selection.py --score attention --out bench/results/recall_selection_attention

Writes bench/results/recall_selection.json and .csv.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from results_io import RESULTS, write_results
from tqdm import tqdm

from infmllm_gguf import Llama, Recall
from infmllm_gguf.cli import passkey_tokens
from infmllm_gguf.policies import FullCache, make_policy
from infmllm_gguf.recall import keys_as_float
from infmllm_gguf.texts import kjv


def beyond_start_found(top3: np.ndarray, recalled: set[int], page: int) -> float:
    """The share of the full cache's three most attended pages that came back, less the pages
    of the stream's first 32 tokens: every head attends to those (the sinks' neighbours), and
    the selection counts them out as generic on purpose."""
    targets = [int(p) for p in top3 if p >= 32 // page]
    return float(np.mean([p in recalled for p in targets])) if targets else float("nan")


def attention_by_token(llm: Llama, tokens: list[int], rows: int) -> np.ndarray:
    """Mean attention of the stream's last `rows` queries (all layers and heads) to each token,
    in a full cache holding all of `tokens`."""
    kv = llm._stream.kv
    layers = kv.layers()
    la = layers[0]
    kv.set_query_capture(rows)
    llm.reset()
    llm.eval(tokens)
    flat, held = kv.queries(len(layers) * la.n_head * rows * la.head_dim)
    assert held == rows, f"captured {held} query rows, expected {rows}"
    q = flat.reshape(len(layers), la.n_head, rows, la.head_dim)
    positions = np.sort(kv.cells().positions)
    k_rows, _ = kv.read_rows(positions, len(layers) * la.k_row_bytes, len(layers) * la.v_row_bytes)
    keys = keys_as_float(k_rows.reshape(len(layers), len(positions), la.k_row_bytes), la.type_k)
    keys = keys.reshape(len(layers), len(positions), la.n_head_kv, la.head_dim)
    group = la.n_head // la.n_head_kv
    n = len(positions)
    visible = positions[None, :] <= (n - rows + np.arange(rows))[:, None]  # causal: [rows, keys]
    mass = np.zeros(n)
    for layer in range(len(layers)):
        k = np.repeat(keys[layer], group, axis=1)  # [keys, head, dim]
        logits = np.einsum("hrd,nhd->hrn", q[layer], k) / np.sqrt(la.head_dim)
        logits = np.where(visible[None], logits, -np.inf)
        w = np.exp(logits - logits.max(axis=2, keepdims=True))
        w /= w.sum(axis=2, keepdims=True)
        mass += w.mean(axis=(0, 1))
    return mass / len(layers)  # positions are the stream's indices 0..n-1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--policy", default="infmllm")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7])
    ap.add_argument("--keys", type=int, default=2, help="keys per depth")
    ap.add_argument("--no-preamble", action="store_true", help="the earlier form: no opening preamble")
    ap.add_argument("--score", default="peak", choices=Recall.SCORES, help="the recall's page score")
    ap.add_argument("--out", default=str(RESULTS / "recall_selection"))
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.depths, args.keys = [2048], [0.1, 0.5], 1
    recall = Recall(score=args.score)
    rng = np.random.default_rng(0)
    rows = []
    bar = tqdm(total=len(args.lengths) * len(args.depths) * args.keys, desc="selection", file=sys.stderr)
    for length in args.lengths:
        full = Llama(n_ctx=length + 16, kv_policy=FullCache(), seed=0)
        policy = make_policy(args.policy, budget=args.budget)
        llm = Llama(n_ctx=policy.capacity, kv_policy=policy, seed=0, recall=recall)
        filler = llm.tokenize(kjv()[:200_000], add_bos=False)
        for depth in args.depths:
            for _ in range(args.keys):
                key = str(rng.integers(10_000, 100_000))
                start = int(rng.integers(len(filler)))
                tokens, needle = passkey_tokens(
                    llm,
                    filler,
                    length,
                    depth,
                    key,
                    paragraphs=True,
                    start=start,
                    preamble=not args.no_preamble,
                )
                attention = attention_by_token(full, tokens, recall.query_window)
                page_of = np.arange(len(attention)) // recall.page
                mass = np.bincount(page_of, weights=attention)
                llm.reset()
                llm.eval(tokens)
                stream = llm._stream
                stream.recall_turn()  # the question's recall, as the answer would start with it
                stored = stream.store.page_ids()
                recalled = {a // recall.page for a, _ in llm.recalled()}
                ranked = stored[np.argsort(-mass[stored], kind="stable")]
                # what a recall can bring back: attention to the tokens the policy no longer holds
                evicted = np.ones(len(attention), bool)
                evicted[stream._stream_index[~stream._recalled]] = False
                answer = llm.generate_text(max_tokens=16)  # no second recall: the turn is answered
                lost = np.bincount(page_of, weights=attention * evicted)
                ranked_lost = stored[np.argsort(-lost[stored], kind="stable")]
                back = np.array(sorted(recalled & set(stored.tolist())), np.int64)
                best = ranked_lost[: len(back)]  # the same number of pages, chosen knowing the answer
                needle_pages = set(range(needle.start // recall.page, (needle.stop - 1) // recall.page + 1))
                rows.append(
                    {
                        "length": length,
                        "depth": depth,
                        "key": key,
                        "pages_stored": len(stored),
                        "pages_recalled": len(recalled),
                        "top1_found": float(ranked[0] in recalled),
                        "top3_found": float(np.mean([p in recalled for p in ranked[:3]])),
                        "top3_beyond_start_found": beyond_start_found(ranked[:3], recalled, recall.page),
                        "top3_evicted_found": float(np.mean([p in recalled for p in ranked_lost[:3]])),
                        "evicted_mass_recalled": float(lost[back].sum() / lost[stored].sum()),
                        "evicted_mass_best": float(lost[best].sum() / lost[stored].sum()),
                        "random_expected": len(recalled) / len(stored),
                        "needle_in_top3": bool(needle_pages & set(ranked[:3].tolist())),
                        "needle_recalled": bool(needle_pages & recalled),
                        "answer_correct": "".join(c for c in answer if c.isdigit()).startswith(key),
                        "top3": ranked[:3].tolist(),
                        "top3_evicted": ranked_lost[:3].tolist(),
                        "recalled": sorted(recalled),
                    }
                )
                bar.update(1)
        full.close()
        llm.close()
    bar.close()
    for length in args.lengths:
        mine = [r for r in rows if r["length"] == length]
        print(
            f"{length:>6} tokens: top-1 found {np.mean([r['top1_found'] for r in mine]):.2f}, "
            f"top-3 found {np.mean([r['top3_found'] for r in mine]):.2f} "
            f"(random {np.mean([r['random_expected'] for r in mine]):.2f}; "
            f"beyond the first 32 tokens {np.nanmean([r['top3_beyond_start_found'] for r in mine]):.2f}; "
            f"by attention to evicted tokens {np.mean([r['top3_evicted_found'] for r in mine]):.2f}), "
            f"evicted attention brought back {np.mean([r['evicted_mass_recalled'] for r in mine]):.2f} "
            f"of at most {np.mean([r['evicted_mass_best'] for r in mine]):.2f}, "
            f"needle among the full cache's top 3 {np.mean([r['needle_in_top3'] for r in mine]):.2f}, "
            f"needle recalled {np.mean([r['needle_recalled'] for r in mine]):.2f}, "
            f"answered {np.mean([r['answer_correct'] for r in mine]):.2f}"
        )
    columns = list(rows[0])
    out = write_results(
        args.out,
        {
            "budget": args.budget,
            "policy": args.policy,
            "recall": repr(recall),
            "preamble": not args.no_preamble,
        },
        rows,
        columns,
    )
    print(f"wrote {out}.json/.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
