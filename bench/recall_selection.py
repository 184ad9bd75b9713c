"""Page-selection quality of the recall tier: does a recall bring back what a full cache attends to?

The pages a full cache, holding the whole stream, attends to most when the question is asked
are set against those a recall brings back.  For each passkey stream (as the recall
benchmark's: the preamble unless --no-preamble, a KJV haystack from a random start per key,
the key at a depth, in a paragraph of its own, the question at the end) two runs:
  - the full cache (n_ctx = stream length) with query capture on: the question's last
    `query_window` query rows of every layer and head, softmax-attended over all the cached
    keys (read back from the cache) exactly as the model does it, averaged over layers, heads
    and rows, summed per page of `page` stream tokens: the truly most-attended pages;
  - the policy with `Recall()` (the configuration NAME+recall-turn, its score --score): the
    pages its recall brought back when the answer's first token is sampled.
Among the pages the policy evicted (stored) the k most attended by the full cache are the
targets; reported: the share of them that came back (k = 1, 3), whether the needle's pages
came back, and what a random choice of as many pages would find (recalled / stored).  Ranked
by a page's attention to its tokens the policy no longer holds (`top3_evicted_found`): what a
recall can bring back, without the attention the sinks draw (they stay cached, and page 0
holds them).  And as attention mass: the share of the full cache's attention to evicted
tokens that the recalled pages hold (`evicted_mass_recalled`), against the share the same
number of pages holds at best (`evicted_mass_best`, chosen knowing the attention).

The policy's own cells at the question (evictions to make room for the recall included) are
those a twin session caches there: the same policy and recall tier, but a store with no room,
so that it evicts as the session does and recalls nothing.  Every other token of the stream
was evicted once, and so is in the session's store.

    python -m bench recall-selection --quick   # 2k tokens, 2 depths (minutes)
    python -m bench recall-selection           # 2k and 4k tokens, 4 depths, 2 keys
    python -m bench recall-selection --score attention --out bench/results/recall_selection_attention

Writes bench/results/recall_selection.json and .csv.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from bench.common import add_out, progress, write_results, wrote
from bench.configs import CONFIGS
from bench.recall import add_stream_arguments, stream_meta
from infmllm_gguf import Llama, Recall
from infmllm_gguf.evaluate import passkey_draws, passkey_filler, passkey_tokens
from infmllm_gguf.recall import keys_as_float

NO_ROOM_MB = 1e-9  # a store limit no page fits in: every page is dropped as it is stored


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="2k tokens, 2 depths, 1 key")
    add_stream_arguments(ap)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7])
    ap.add_argument("--keys", type=int, default=2, help="keys per depth")
    ap.add_argument("--score", default="peak", choices=Recall.SCORES, help="the recall's page score")
    add_out(ap, "recall_selection")


def beyond_start_found(top3: np.ndarray, recalled: set[int], page: int) -> float:
    """The share of the full cache's three most attended pages that came back, less the pages
    of the stream's first 32 tokens: every head attends to those (the sinks' neighbours), and
    the selection counts them out as generic on purpose."""
    targets = [int(p) for p in top3 if p >= 32 // page]
    return float(np.mean([p in recalled for p in targets])) if targets else float("nan")


def attention_by_token(llm: Llama, tokens: list[int], rows: int) -> np.ndarray:
    """Mean attention of the stream's last `rows` queries (all layers and heads) to each token,
    in a full cache holding all of `tokens`."""
    kv = llm.kv
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


def answer_seen(llm: Llama, max_tokens: int) -> tuple[str, np.ndarray, list[tuple[int, int]]]:
    """Answer the question the stream ends with; also the cached stream indices and the
    recalled pages' ranges as the answer's first token is sampled (after the turn's recall)."""
    seen: list[tuple[np.ndarray, list[tuple[int, int]]]] = []  # before the first token only

    def before_token() -> None:
        if not seen:
            seen.append((llm.cached_stream_indices(), llm.recalled()))

    with llm.turn(poll=before_token):
        answer = llm.generate_text(max_tokens=max_tokens)
    return answer, *seen[0]


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.lengths, args.depths, args.keys = [2048], [0.1, 0.5], 1
    config = CONFIGS[f"{args.policy}+recall-turn"].with_recall(score=args.score)
    rng = np.random.default_rng(0)  # one draw of keys and haystacks over all lengths
    rows = []
    with progress(len(args.lengths) * len(args.depths) * args.keys, "selection") as bar:
        for length in args.lengths:
            full = Llama(n_ctx=length + 16, kv_policy="full", seed=0)
            policy, recall = config.build(args.budget)
            llm = Llama(n_ctx=policy.capacity, kv_policy=policy, seed=0, recall=recall)
            no_room = dataclasses.replace(recall, store_limit_mb=NO_ROOM_MB)
            twin = Llama(n_ctx=policy.capacity, kv_policy=policy, seed=0, recall=no_room)
            filler = passkey_filler(llm)
            for depth, key, start in passkey_draws(rng, len(filler), args.depths, args.keys, spread=True):
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
                selection = page_selection(full, twin, llm, recall, tokens, needle, key)
                rows.append({"length": length, "depth": depth, "key": key, **selection})
                bar.update(1)
            full.close()
            llm.close()
            twin.close()
    summarise(args, rows)
    out = write_results(args.out, stream_meta(args, recall), rows, list(rows[0]))
    wrote(out, "json", "csv")
    return 0


def page_selection(
    full: Llama, twin: Llama, llm: Llama, recall: Recall, tokens: list[int], needle: range, key: str
) -> dict:
    """One stream through the full cache, the twin and the session, and how the pages the
    session recalled compare with those the full cache attends to most."""
    attention = attention_by_token(full, tokens, recall.query_window)
    page_of = np.arange(len(attention)) // recall.page
    mass = np.bincount(page_of, weights=attention)
    twin.reset()
    twin.eval(tokens)
    _, kept, _ = answer_seen(twin, 1)
    llm.reset()
    llm.eval(tokens)
    answer, _, ranges = answer_seen(llm, 16)  # the recall is the question's turn's
    # what a recall can bring back: attention to the tokens the policy no longer holds
    evicted = np.ones(len(attention), bool)
    evicted[kept] = False
    stored = np.unique(np.flatnonzero(evicted) // recall.page)
    recalled = {a // recall.page for a, _ in ranges}
    ranked = stored[np.argsort(-mass[stored], kind="stable")]
    lost = np.bincount(page_of, weights=attention * evicted)
    ranked_lost = stored[np.argsort(-lost[stored], kind="stable")]
    back = np.array(sorted(recalled & set(stored.tolist())), np.int64)
    best = ranked_lost[: len(back)]  # the same number of pages, chosen knowing the answer
    needle_pages = set(range(needle.start // recall.page, (needle.stop - 1) // recall.page + 1))
    return {
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


def summarise(args: argparse.Namespace, rows: list[dict]) -> None:
    """A line per stream length on stdout: the rows' means."""
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
