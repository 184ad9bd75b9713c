"""From scores to pages: which stored pages a recall brings back.

`select` builds the scorer a `Recall.score` names (`scorers.SCORERS`), takes each of its
rankings' picks (the pages that stand out, with `adjacent` their runs of adjacent pages above
the median; or every ranked page) in turn, and adds the pages after and before them while
the room lasts (`with_neighbours`).
"""

from __future__ import annotations

import itertools

import numpy as np

from infmllm_gguf.kv import Rope
from infmllm_gguf.recall.scorers import SCORERS, Probe, Ranking, make_scorer
from infmllm_gguf.recall.store import PageStore


def select(
    store: PageStore,
    queries: np.ndarray | None,
    room: int,
    shortlist: int = 64,
    adjacent: bool = False,
    attention: tuple[Rope, int] | None = None,
    score: str = "peak",
    structural: np.ndarray | None = None,
    text: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[int]:
    """Page ids to bring back for queries [layer, head, rows, dim]: the picks of the scorer
    `score` names (see `Recall.score`), best first, then the pages after and before each of
    them, at most `room` tokens in all.  `attention` = (rope, shift) for the scorers that
    move keys to their full-cache distance; `structural`: page ids the attention ranking
    leaves out (pages of control tokens: recalled, a past chat turn made the model answer as
    a chat); `text` = `text_matches` for score="text", which needs no queries."""
    probe = Probe(attention=attention, structural=structural, text=text)
    scorer = make_scorer(score, shortlist) if score in SCORERS else None
    if scorer is None or any(getattr(probe, need) is None for need in scorer.needs):
        raise ValueError(f"score {score!r} is not one of {tuple(SCORERS)} or lacks its input")
    if store.n_pages == 0 or room <= 0:
        return []
    if queries is not None:
        rows = store.n_head // store.n_head_kv * queries.shape[2]
        # per layer [kv head, dim, group * rows]: the query heads that read each kv head
        q = queries.reshape(store.n_layer, store.n_head_kv, rows, store.head_dim).transpose(0, 1, 3, 2)
        probe = Probe(q, attention, structural, text)
    slot_pages = store.slot_pages()
    units = [
        [[pid + step for step in ranking.unit] for pid in picks(ranking, slot_pages, adjacent)]
        for ranking in scorer.score(store, probe)
    ]
    best: list[int] = []
    for turn in itertools.zip_longest(*units, fillvalue=[]):
        best.extend(pid for unit in turn for pid in unit if pid in store and pid not in best)
    return with_neighbours(store, best, room)


def picks(ranking: Ranking, slot_pages: np.ndarray, adjacent: bool) -> list[int]:
    """The page ids a ranking picks, best first: every ranked page, or those that stand out."""
    score = ranking.score
    ranked = np.argsort(-score, kind="stable")[: int(np.isfinite(score).sum())]
    if ranking.every:
        return [int(slot_pages[i]) for i in ranked]
    return standing_out(score, ranked, slot_pages, adjacent)


def standing_out(score: np.ndarray, ranked: np.ndarray, slot_pages: np.ndarray, adjacent: bool) -> list[int]:
    """The ranked slots' pages that stand out by score, best first: at least halfway from the
    ranked slots' median to their best (pages of ordinary score crowd the answer out, the 135M
    model then copies them); with `adjacent` followed by their runs above the median."""
    median = np.median(score[ranked])
    cut = (score[ranked].max() + median) / 2
    best = [int(slot_pages[i]) for i in ranked if score[i] >= cut]
    if adjacent:
        best = with_runs(best, {int(slot_pages[i]) for i in ranked if score[i] >= median})
    return best


def with_runs(best: list[int], above: set[int]) -> list[int]:
    """best, then for each of its pages the adjacent pages in `above`, outwards on both sides
    until one is not: a fact that straddles page boundaries comes back whole though only
    one of its pages stands out (the needle "The pass key is 3|4961. Remember it. 3|4961 is
    the pass key" ranks its last page first and the others below the cut)."""
    chosen = list(best)
    for first in best:
        for step in (1, -1):
            pid = first + step
            while pid in above and pid not in chosen:
                chosen.append(pid)
                pid += step
    return chosen


def with_neighbours(store: PageStore, pids: list[int], room: int) -> list[int]:
    """The stored pages among pids, in their order, then the page after and the page before
    each of them, until the next one would pass `room` tokens.  Every chosen page comes
    before any neighbour: a needle ranked fourth must not lose its place to the neighbours
    of the three pages ahead of it."""
    chosen: list[int] = []
    used = 0
    for pid in [*pids, *(n for first in pids for n in (first + 1, first - 1))]:
        if pid not in store or pid in chosen:
            continue
        size = store.page_size(pid)
        if used + size > room:
            break
        chosen.append(pid)
        used += size
    return chosen
