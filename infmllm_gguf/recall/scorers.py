"""Page scorers: each ranks the stored pages for one recall, by one `score()` method.

A scorer reads the parts of a `Probe` (what a recall knows: the newest queries, the RoPE and
the queries' shift, the pages of control tokens, the new text's matches) that it `needs`, and
returns `Ranking`s: a score per slot of the store (-inf where the page is not ranked) and how
`selection.py` turns it into pages.  `InTurn` composes two scorers, as "both" does; `SCORERS`
maps each `Recall.score` name to the construction of its scorer.  A new rule is a class here
with its name in `SCORERS` and in `Recall.SCORES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar, Protocol

import numpy as np

from infmllm_gguf.kv import Rope
from infmllm_gguf.recall.store import PageStore


@dataclasses.dataclass(frozen=True)
class Probe:
    """What one recall scores the pages with; each scorer reads the parts it `needs`.

    q: the queries per layer as [layer, kv head, dim, the query rows of the heads that read
      it]; attention: (rope, shift), the RoPE and the stream index less the position at which
      the queries were decoded; structural: ids of the pages holding control tokens; text:
      `text_matches` of the new text (the places that continued its runs, and their weights).
    """

    q: np.ndarray | None = None
    attention: tuple[Rope, int] | None = None
    structural: np.ndarray | None = None
    text: tuple[np.ndarray, np.ndarray] | None = None


@dataclasses.dataclass(frozen=True)
class Ranking:
    """A score per slot of the store (-inf: not ranked) and how pages are picked from it: those
    that stand out (`every=False`) or every ranked page, best first; each pick brings the pages
    at the offsets `unit` from it, in that order."""

    score: np.ndarray
    every: bool = False
    unit: tuple[int, ...] = (0,)


class Scorer(Protocol):
    needs: tuple[str, ...]  # the Probe fields it reads besides q

    def score(self, store: PageStore, probe: Probe) -> list[Ranking]: ...


def max_less_mean(z: np.ndarray) -> np.ndarray:
    """Per page, from z [pages, n] (its standardised q·k for every layer, kv head and query
    row): the strongest single one, which a needle read by a few heads has, less their mean,
    which is high for text every head attends to (the stream's opening).  Without the mean
    the needle's pages come back whole more often and so does the opening, which the model
    then copies where it is ordinary text."""
    return z.max(axis=1) - z.mean(axis=1)


def strongest(z: np.ndarray) -> np.ndarray:
    """Per page: the strongest single standardised q·k; finds more needles than
    `max_less_mean` and brings the stream's opening back far more often (docs/results.md)."""
    return z.max(axis=1)


def max_less_half_mean(z: np.ndarray) -> np.ndarray:
    """Per page: the strongest single standardised q·k less half their mean."""
    return z.max(axis=1) - 0.5 * z.mean(axis=1)


def _standardise(s: np.ndarray) -> np.ndarray:
    s -= s.mean(axis=1, keepdims=True)
    s /= s.std(axis=1, keepdims=True) + 1e-6
    return s


@dataclasses.dataclass(frozen=True)
class PeakScorer:
    """`Recall(score="peak")`: the min/max summary shortlists `shortlist` pages by each of two
    cheap rankings, the stored keys re-rank the shortlist by `page_rule` of their standardised
    q·k (what a question's answer stands out by)."""

    shortlist: int = 64
    page_rule: Callable[[np.ndarray], np.ndarray] = max_less_mean
    needs: ClassVar[tuple[str, ...]] = ()
    SAMPLE: ClassVar[int] = 64  # pages whose exact scores set the standardisation

    def score(self, store: PageStore, probe: Probe) -> list[Ranking]:
        q, n = probe.q, store.n_pages
        short = self._shortlist(store, q)
        # exact: the real keys of the shortlisted pages, max over each page's keys, standardised
        # like the bound but over an even sample of all pages (the shortlist alone is biased)
        sample = np.unique(np.linspace(0, n - 1, min(n, self.SAMPLE)).astype(np.int64))
        slots = np.union1d(short, sample)
        exact = _exact(store, slots, q)  # [l, k, slots, q]
        in_sample = np.isin(slots, sample)
        mean = exact[:, :, in_sample].mean(axis=2, keepdims=True)
        std = exact[:, :, in_sample].std(axis=2, keepdims=True) + 1e-6
        z = ((exact - mean) / std).transpose(2, 0, 1, 3).reshape(len(slots), -1)
        score = np.full(n, -np.inf, np.float32)
        score[slots] = self.page_rule(z)
        score[np.setdiff1d(slots, short)] = -np.inf  # sampled only: not shortlisted
        return [Ranking(score)]

    def _shortlist(self, store: PageStore, q: np.ndarray) -> np.ndarray:
        """The slots of the two cheap rankings' best `shortlist` pages each, from the min/max
        summary: the upper bound of q·k (Quest's), loose where a page's keys spread, and
        q·(min + max)/2, the page's centre."""
        z_bound = np.full(store.n_pages, -np.inf, np.float32)
        z_center = np.full(store.n_pages, -np.inf, np.float32)
        for layer in range(store.n_layer):  # one layer at a time keeps the matrices small
            center, radius = store.bounds(layer)
            by_center = center @ q[layer]  # [kv head, pages, q]
            bound = by_center + radius @ np.abs(q[layer])
            for z, s in ((z_bound, bound), (z_center, by_center)):
                np.maximum(z, _standardise(s).max(axis=(0, 2)), out=z)
        return np.union1d(
            np.argsort(-z_bound, kind="stable")[: self.shortlist],
            np.argsort(-z_center, kind="stable")[: self.shortlist],
        )


def _exact(store: PageStore, slots: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per layer, kv head, page (slot) and query: the largest q·k over the page's real keys."""
    keys, _, _, sizes = store.keys(slots)
    logits = np.matmul(keys.transpose(1, 2, 0, 3), q)
    starts = np.cumsum(np.concatenate([[0], sizes]))[:-1]
    return np.maximum.reduceat(logits, starts, axis=2)


@dataclasses.dataclass(frozen=True)
class AttentionScorer:
    """`Recall(score="attention")`: per page, its share of the queries' softmax attention over
    all stored keys, summed over layers, kv heads and query rows, each key rotated to stream
    index - shift, the distance from the queries it would have in a cache that never evicted.
    The cells the cache holds are left out of the softmax: with them the full cache's most
    attended pages came back less often (docs/results.md, "The attention score").  Every
    stored key is read (in chunks of CHUNK pages, the softmax carried across them), so the
    cost grows with the store.  Logits are scaled by 1/sqrt(head_dim), as most models'
    attention is (not Gemma's).  Pages of control tokens (`Probe.structural`), attended to as
    sinks wherever they stand, score 0."""

    needs: ClassVar[tuple[str, ...]] = ("attention",)
    CHUNK: ClassVar[int] = 64  # pages read at once

    def score(self, store: PageStore, probe: Probe) -> list[Ranking]:
        (rope, shift), q, n = probe.attention, probe.q, store.n_pages
        scale = np.float32(1 / np.sqrt(store.head_dim))
        parts = []
        peak = total = None  # per (layer, kv head, row): the largest logit so far, the exp sum
        for first in range(0, n, self.CHUNK):
            slots = np.arange(first, min(n, first + self.CHUNK))
            keys, sidx, rot_pos, sizes = store.keys(slots)
            keys = rope.rotate(keys, sidx - shift - rot_pos)
            logits = np.matmul(keys.transpose(1, 2, 0, 3), q) * scale
            top = logits.max(axis=2)
            e = np.exp(logits - top[:, :, None])
            starts = np.cumsum(np.concatenate([[0], sizes]))[:-1]
            parts.append((slots, top, np.add.reduceat(e, starts, axis=2)))  # [l, k, pages, q]
            if peak is None:
                peak, total = top, e.sum(axis=2)
            else:
                new = np.maximum(peak, top)
                total = total * np.exp(peak - new) + e.sum(axis=2) * np.exp(top - new)
                peak = new
        score = np.empty(n, np.float32)
        for slots, top, sums in parts:
            score[slots] = np.einsum("lkpq,lkq->p", sums, np.exp(top - peak) / total)
        if probe.structural is not None:
            score[np.isin(store.slot_pages(), probe.structural)] = 0.0
        return [Ranking(score)]


@dataclasses.dataclass(frozen=True)
class TextScorer:
    """`Recall(score="text")`: per page, the summed weight of the places (`Probe.text`, from
    `text_matches`) that lie in it; every page with a match is picked, most weight first."""

    needs: ClassVar[tuple[str, ...]] = ("text",)

    def score(self, store: PageStore, probe: Probe) -> list[Ranking]:
        after, weight = probe.text
        pids, at = np.unique(after // store.page, return_inverse=True)
        votes = np.bincount(at, weights=weight, minlength=len(pids))
        score = np.full(store.n_pages, -np.inf, np.float32)
        for pid, vote in zip(pids.tolist(), votes):
            slot = store.slot_of(pid)
            if slot is not None and vote > 0:
                score[slot] = vote
        return [Ranking(score, every=True)]


@dataclasses.dataclass(frozen=True)
class InTurn:
    """Two scorers' picks taken in turn, the first's first, each of the first's with the pages
    at the offsets `unit` from it.  "both" is the peak's with the page after and before it
    (what a page stands out by is often answered in the next one: "The pass key of | the red
    door is 48213") and the attention's alone (it is itself what a full cache attends to)."""

    first: Scorer
    second: Scorer
    unit: tuple[int, ...] = (0, 1, -1)

    @property
    def needs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.first.needs, *self.second.needs)))

    def score(self, store: PageStore, probe: Probe) -> list[Ranking]:
        first = [dataclasses.replace(r, unit=self.unit) for r in self.first.score(store, probe)]
        return first + self.second.score(store, probe)


# each Recall.score name and the construction of its scorer from the shortlist size
SCORERS: dict[str, Callable[[int], Scorer]] = {
    "peak": PeakScorer,
    "attention": lambda shortlist: AttentionScorer(),
    "both": lambda shortlist: InTurn(PeakScorer(shortlist), AttentionScorer()),
    "text": lambda shortlist: TextScorer(),
    "peak-max": lambda shortlist: PeakScorer(shortlist, strongest),
    "peak-max-half-mean": lambda shortlist: PeakScorer(shortlist, max_less_half_mean),
}


def make_scorer(name: str, shortlist: int = 64) -> Scorer:
    """The scorer `Recall(score=name, shortlist=shortlist)` ranks pages with."""
    if name not in SCORERS:
        raise ValueError(f"no page scorer named {name!r}; the scorers are {', '.join(SCORERS)}")
    return SCORERS[name](shortlist)


# the lengths of the token runs score="text" matches: runs of 2 and 3 together closed more of
# the gap to a full cache's perplexity than either alone (and than 1 or 4) on KJV and the Jargon File
TEXT_GRAMS = (2, 3)


def _gram_hashes(tokens: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hash, valid) of every run of n consecutive keys; a run holding an image key (< 0) is not
    valid.  The hash is polynomial in uint64 arithmetic (wrapping), so any vocabulary fits."""
    m = len(tokens) - n + 1
    if m <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, bool)
    t = tokens.astype(np.int64)
    h = np.zeros(m, np.uint64)
    for i in range(n):
        h = h * np.uint64(0x100000001B3) + t[i : i + m].astype(np.uint64)
    valid = np.lib.stride_tricks.sliding_window_view(t, n).min(axis=1) >= 0
    return h, valid


def text_matches(
    history: np.ndarray, first: int, text: np.ndarray, grams: tuple[int, ...] = TEXT_GRAMS
) -> tuple[np.ndarray, np.ndarray]:
    """Where the runs of n tokens (n in `grams`) in `text` occurred in `history` (whose first
    key has stream index `first`): per occurrence, the stream index of the key that followed
    it, and a weight of (the run's count in text) / (its occurrences in history) — a common
    phrase votes a little for many places, a rare one much for a few; a place that continues
    a longer run gets a vote per length.  Runs are matched whole (a hash collision aside), so
    the places are those a model copying the text would read next."""
    after, weight = [np.zeros(0, np.int64)], [np.zeros(0)]
    for n in grams:
        runs, ok = _gram_hashes(text, n)
        hist, hist_ok = _gram_hashes(history, n)
        if not ok.any() or len(hist) == 0:
            continue
        uniq, in_text = np.unique(runs[ok], return_counts=True)
        at = np.minimum(np.searchsorted(uniq, hist), len(uniq) - 1)
        hit = np.flatnonzero(hist_ok & (uniq[at] == hist))
        seen = np.bincount(at[hit], minlength=len(uniq))
        after.append(first + hit + n)
        weight.append(in_text[at[hit]] / seen[at[hit]])
    return np.concatenate(after), np.concatenate(weight)
