"""The recall tier: evicted K/V rows wait in host memory and come back when the stream needs them.

Eviction that cannot know the next question cannot keep its answer.  So what a policy evicts
is copied out first (native row reads) and kept in position-aligned pages of `page` stream
tokens, each with the element-wise min and max of its keys per layer and kv head.  A recall
scores the pages against the newest query rows: two cheap rankings from the summary (the
upper bound of q·k that Quest and ArkVale use, and q·(min + max)/2, the page's centre, which
the loose bound misses needles without) shortlist pages, and the real stored keys re-rank
the shortlist exactly.  Scores are standardised per (layer, kv head, query row) over an even
sample of all pages, so heads of different scale compare; a page counts by its strongest
single (layer, head, row) — a sum over heads dilutes a needle — less its mean over them,
since a page that every head attends to (the text right after the sinks) is generic rather
than an answer.  Pages that stand out (with `adjacent` also the pages next to them that score
above the median), then the pages after and before them, are written back into a reserve of
the budget, in stream order, and llama.cpp's own K-shift re-positions them with the rest of
the cache.

Keys are compared as stored: rotated at their compacted position at eviction time, which
lies within the cache's window like the query's own, so the relative distances seen are
those the model sees in the cache.  `Recall(score="attention")` instead ranks every page by its
share of the queries' softmax attention, each stored key moved on the host to the distance
from the queries it had in the stream (what a cache that never evicted would attend to);
`score="both"` takes the two rankings' standing-out pages in turn; pages of control tokens
(chat-template markers) are left out of the attention ranking.  `score="text"` reads no keys
at all: the pages where the new text's short runs of tokens occurred before (where what follows
was said once already) come back, most matched first.
"""

from __future__ import annotations

import dataclasses
import itertools
import mmap
import os
import tempfile
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np
from threadpoolctl import ThreadpoolController

from infmllm_gguf.kv import LayerLayout, Rope

GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16 = 0, 1, 30


class RecallError(RuntimeError):
    """The recall store cannot be used (e.g. a corrupt spill file); the stream goes on without it."""


@dataclasses.dataclass(frozen=True)
class Recall:
    """Configuration of the recall tier (one per `Llama`; the store itself lives in the stream).

    reserve: cells of the budget that recalled pages may occupy (default budget // 4); the
      policy keeps the rest, and the part recalled pages do not hold until a recall needs it
      (so "turn" costs a stream nothing between questions).  page: stream tokens per page.
      when: "turn" recalls once per question or prompt, before answering (the prompt's last
      `query_window` tokens are decoded again with the pages in place); "chunk" also recalls
      after every eviction, scored by the newest `query_window` query rows (by the text about
      to be decoded with score="text").  every: in chunk mode, also recall every `every`
      tokens fed between evictions (default None: once per eviction, i.e. per policy chunk);
      a text-scored recall then matches the next `every` tokens, a closer aim than a whole
      chunk's (docs/recall.md).  store_limit_mb:
      host memory for stored rows; past it the oldest pages are dropped, or spilled to a file
      in `spill_dir`.
      shortlist: pages each of the two summary rankings passes on to the exact re-rank with
      the stored keys (which bounds a recall's cost however large the store grows).
      reencode: after a turn's recall, decode the cached text from the first recalled cell on
      again, so that the recalled pages and what follows them are computed in the context
      they now sit in (their stored rows were computed in their original one); at most a
      budget of tokens per turn, text only, `when="turn"` only.
      adjacent: a chosen page also brings the adjacent pages that score above the shortlist's
      median, outwards, before any page's plain neighbours, so that a fact across page
      boundaries comes back whole (with `reencode` a fragment decoded again loses what its
      stored rows knew); they take room the neighbours of other chosen pages would have.
      score: "peak" ranks pages by their strongest standardised q·k less its mean over heads,
      among a shortlist (`PageStore.peak_scores`): what a question's answer stands out by.
      "attention" ranks them by their share of the queries' softmax attention over every
      stored key, each moved to the distance from the queries it would have had in a cache
      that never evicted (`PageStore.attention_scores`): what a full cache would attend to,
      nearby text included, at a cost that grows with the store; pages holding control
      tokens (chat-template markers, attended to as sinks) are left out of it.  "both" takes
      the two rankings' standing-out pages in turn, the peak's first, each with the page
      after and before it: the answer's pages and what a full cache would attend to, at the
      cost of the two.  "text" reads no queries: the pages where the new text's runs of
      2 and 3 tokens occurred before, each ranked by the place that continued there
      (`text_matches`) — what a full cache would copy from; in chunk mode the new text is the
      piece about to be decoded (the stream knows it before decoding it), in turn mode the
      turn's newest `query_window` tokens.  `adjacent` leaves it as it is.
    """

    reserve: int | None = None
    page: int = 16
    when: str = "turn"
    store_limit_mb: float = 1024.0
    spill_dir: str | os.PathLike | None = None
    query_window: int = 8
    shortlist: int = 64
    reencode: bool = False
    adjacent: bool = False
    score: str = "peak"
    every: int | None = None

    WHEN: ClassVar[tuple[str, ...]] = ("turn", "chunk")
    SCORES: ClassVar[tuple[str, ...]] = ("peak", "attention", "both", "text")

    def __post_init__(self) -> None:
        for name, minimum in (("page", 1), ("query_window", 1), ("shortlist", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        for name in ("reserve", "every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if self.every is not None and self.when != "chunk":
            raise ValueError('every sets how often chunk mode recalls: when="chunk" only')
        if self.when not in self.WHEN:
            raise ValueError(f"when must be one of {', '.join(self.WHEN)}, got {self.when!r}")
        if self.score not in self.SCORES:
            raise ValueError(f"score must be one of {', '.join(self.SCORES)}, got {self.score!r}")
        if self.reencode and self.when != "turn":
            raise ValueError('reencode decodes a budget of tokens again per recall: when="turn" only')
        limit = self.store_limit_mb
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
            raise ValueError(f"store_limit_mb must be a number > 0, got {limit!r}")
        if self.spill_dir is not None and not Path(self.spill_dir).is_dir():
            raise ValueError(f"spill_dir {self.spill_dir} is not a directory")

    def reserve_for(self, budget: int) -> int:
        return self.reserve if self.reserve is not None else max(self.page, budget // 4)


def keys_as_float(rows: np.ndarray, type_k: int) -> np.ndarray:
    """K rows (uint8, last axis the bytes of n_embd_k keys) as float32 keys."""
    if type_k == GGML_TYPE_F32:
        return rows.view(np.float32)
    if type_k == GGML_TYPE_F16:
        return rows.view(np.float16).astype(np.float32)
    if type_k == GGML_TYPE_BF16:
        return (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    raise ValueError(f"no float view of ggml type {type_k}")


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


@dataclasses.dataclass
class _Page:
    stream_index: np.ndarray  # int64, sorted
    rot_pos: np.ndarray  # int32: the position each key was rotated at
    k: np.ndarray | None  # uint8 [m, layers * k_row]; None once spilled
    v: np.ndarray | None
    spill: tuple[int, int, int] | None = None  # (offset, bytes, crc32) in the spill file

    @property
    def n(self) -> int:
        return len(self.stream_index)


@dataclasses.dataclass
class StoreStats:
    pages_dropped: int = 0
    pages_spilled: int = 0
    tokens_stored: int = 0  # ever added


_blas: ThreadpoolController | None = None


def one_blas_thread():
    """A context in which numpy's BLAS runs on the calling thread: its worker threads, left
    spinning after a multithreaded product, would slow the llama.cpp decode and K-shift that
    follow a recall on the same cores (measured: +32 % decode time, 7x the K-shift's)."""
    global _blas
    if _blas is None:
        _blas = ThreadpoolController()  # finds the BLAS libraries numpy has loaded, once
    return _blas.limit(limits=1, user_api="blas")


class PageStore:
    """Evicted rows of one stream in pages of `page` stream tokens, with min/max key bounds."""

    SAMPLE: ClassVar[int] = 64  # pages whose exact scores set the standardisation
    CHUNK: ClassVar[int] = 64  # pages an attention score reads at once

    def __init__(self, layers: list[LayerLayout], page: int, limit_mb: float, spill_dir: str | None):
        first = layers[0]
        shape = (first.n_head, first.n_head_kv, first.head_dim, first.k_row_bytes, first.v_row_bytes)
        if any(
            (la.n_head, la.n_head_kv, la.head_dim, la.k_row_bytes, la.v_row_bytes) != shape for la in layers
        ):
            raise ValueError("the recall tier needs layers of one shape (heads, head size, row bytes)")
        if first.type_k not in (GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16):
            raise ValueError("the recall tier scores F32, F16 or BF16 keys; this cache's keys are quantized")
        self.n_layer = len(layers)
        self.n_head, self.n_head_kv, self.head_dim = first.n_head, first.n_head_kv, first.head_dim
        self.type_k = first.type_k
        self.k_row, self.v_row = first.k_row_bytes, first.v_row_bytes
        self.k_bytes, self.v_bytes = self.n_layer * self.k_row, self.n_layer * self.v_row  # per cell
        self.page = page
        self.limit_bytes = int(limit_mb * 2**20)
        self.spill_dir = spill_dir
        self._spill_file = None
        self._spill_map: mmap.mmap | None = None
        self._spill_size = 0
        self.clear()

    # --- contents -------------------------------------------------------------------------
    def clear(self) -> None:
        self._pages: dict[int, _Page] = {}
        # bounds, dense over slots 0..n_pages-1: [layer, kv head, slot, dim]
        self._center = np.zeros((self.n_layer, self.n_head_kv, 0, self.head_dim), np.float32)
        self._radius = np.zeros_like(self._center)
        self._slot_page: list[int] = []  # slot -> page id
        self._page_slot: dict[int, int] = {}
        self._mem_bytes = 0
        self.stats = StoreStats()
        self._close_spill()

    def close(self) -> None:
        self._close_spill()

    @property
    def n_pages(self) -> int:
        return len(self._pages)

    @property
    def nbytes(self) -> int:
        """Host memory held: rows in memory plus the bounds of every page."""
        return self._mem_bytes + 2 * self._center[:, :, : self.n_pages].nbytes

    @property
    def spilled_bytes(self) -> int:
        return self._spill_size

    def page_ids(self) -> np.ndarray:
        return np.fromiter(self._pages, np.int64, len(self._pages))

    def add(self, stream_index: np.ndarray, rot_pos: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Store n evicted cells: stream indices, positions their keys were rotated at, and their
        rows as `KVCache.read_rows` gives them ([layer][i][row])."""
        n = len(stream_index)
        if n == 0:
            return
        k = k.reshape(self.n_layer, n, self.k_row).transpose(1, 0, 2).reshape(n, -1)
        v = v.reshape(self.n_layer, n, self.v_row).transpose(1, 0, 2).reshape(n, -1)
        page_of = np.asarray(stream_index, np.int64) // self.page
        for pid in np.unique(page_of):
            sel = page_of == pid
            self._merge(int(pid), stream_index[sel], rot_pos[sel], k[sel], v[sel])
        self.stats.tokens_stored += n
        self._enforce_limit()

    def _merge(self, pid: int, sidx: np.ndarray, pos: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        old = self._pages.get(pid)
        if old is not None:
            ok, ov = self._rows(old)
            fresh = ~np.isin(sidx, old.stream_index)  # a cell stored twice keeps its first copy
            sidx = np.concatenate([old.stream_index, sidx[fresh]])
            pos, k, v = (np.concatenate([a, b[fresh]]) for a, b in ((old.rot_pos, pos), (ok, k), (ov, v)))
            self._forget_rows(old)
        order = np.argsort(sidx, kind="stable")
        page = _Page(
            sidx[order].astype(np.int64), pos[order].astype(np.int32), k[order].copy(), v[order].copy()
        )
        self._pages[pid] = page
        self._mem_bytes += page.k.nbytes + page.v.nbytes
        keys = keys_as_float(page.k, self.type_k).reshape(page.n, self.n_layer, self.n_head_kv, self.head_dim)
        lo, hi = keys.min(axis=0), keys.max(axis=0)  # [layer, kv head, dim]
        slot = self._page_slot.get(pid)
        if slot is None:
            slot = self._new_slot(pid)
        self._center[:, :, slot] = (hi + lo) / 2
        self._radius[:, :, slot] = (hi - lo) / 2

    def _new_slot(self, pid: int) -> int:
        slot = len(self._slot_page)
        if slot == self._center.shape[2]:
            grow = max(64, slot)
            pad = np.zeros((self.n_layer, self.n_head_kv, grow, self.head_dim), np.float32)
            self._center = np.concatenate([self._center, pad], axis=2)
            self._radius = np.concatenate([self._radius, pad], axis=2)
        self._slot_page.append(pid)
        self._page_slot[pid] = slot
        return slot

    def _drop(self, pid: int) -> None:
        page = self._pages.pop(pid)
        self._forget_rows(page)
        slot = self._page_slot.pop(pid)
        last = len(self._slot_page) - 1
        if slot != last:  # keep the slots dense: the last one moves into the hole
            moved = self._slot_page[last]
            self._center[:, :, slot] = self._center[:, :, last]
            self._radius[:, :, slot] = self._radius[:, :, last]
            self._slot_page[slot] = moved
            self._page_slot[moved] = slot
        self._slot_page.pop()
        self.stats.pages_dropped += 1

    def _forget_rows(self, page: _Page) -> None:
        if page.k is not None:
            self._mem_bytes -= page.k.nbytes + page.v.nbytes

    # --- saving ------------------------------------------------------------------------------
    def export(self) -> dict[str, np.ndarray]:
        """Every stored cell, page by page in slot order: stream index, rotation position and rows
        ([n, layers * row]; spilled pages read back), so that `load` rebuilds the same store."""
        pages = [self._pages[pid] for pid in self._slot_page]
        rows = [self._rows(p) for p in pages]
        stats = self.stats
        return {
            "page_sizes": np.array([p.n for p in pages], np.int64),
            "stream_index": np.concatenate([p.stream_index for p in pages] or [np.zeros(0, np.int64)]),
            "rot_pos": np.concatenate([p.rot_pos for p in pages] or [np.zeros(0, np.int32)]),
            "k": np.concatenate([k for k, _ in rows] or [np.zeros((0, self.k_bytes), np.uint8)]),
            "v": np.concatenate([v for _, v in rows] or [np.zeros((0, self.v_bytes), np.uint8)]),
            "stats": np.array([stats.pages_dropped, stats.pages_spilled, stats.tokens_stored], np.int64),
        }

    def load(self, state: dict[str, np.ndarray]) -> None:
        """Replace the contents with what `export` gave; checked first, so a ValueError changes
        nothing."""
        sizes, sidx = state["page_sizes"], state["stream_index"]
        n = len(sidx)
        if (
            sizes.sum() != n
            or len(state["rot_pos"]) != n
            or state["k"].shape != (n, self.k_bytes)
            or state["v"].shape != (n, self.v_bytes)
            or state["stats"].shape != (3,)
        ):
            raise ValueError("the saved recall store does not fit this cache's rows")
        bounds = np.cumsum(sizes)[:-1]
        names = ("stream_index", "rot_pos", "k", "v")
        groups = [np.split(state[name], bounds) if len(sizes) else [] for name in names]
        if any(len(g) == 0 or len(np.unique(g // self.page)) != 1 for g in groups[0]):
            raise ValueError("the saved recall store has pages that span page boundaries")
        self.clear()
        for page_sidx, pos, k, v in zip(*groups):
            self._merge(int(page_sidx[0]) // self.page, page_sidx, pos, k, v)
        self.stats = StoreStats(*(int(x) for x in state["stats"]))
        self._enforce_limit()

    # --- bounded memory -----------------------------------------------------------------------
    def _enforce_limit(self) -> None:
        if self.nbytes <= self.limit_bytes:
            return
        for pid in sorted(self._pages):  # oldest first
            if self.nbytes <= self.limit_bytes:
                return
            page = self._pages[pid]
            if self.spill_dir is not None and page.k is not None:
                self._spill(page)
            elif self.spill_dir is None:
                self._drop(pid)
        # spilled pages still hold their bounds in memory: drop the oldest of them if need be
        for pid in sorted(self._pages):
            if self.nbytes <= self.limit_bytes:
                return
            self._drop(pid)

    def _spill(self, page: _Page) -> None:
        if self._spill_file is None:
            self._spill_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the store
                prefix="infmllm-recall-", suffix=".spill", dir=self.spill_dir
            )
        data = page.k.tobytes() + page.v.tobytes()
        self._spill_file.seek(self._spill_size)
        self._spill_file.write(data)
        self._spill_file.flush()
        page.spill = (self._spill_size, len(data), zlib.crc32(data))
        self._spill_size += len(data)
        self._forget_rows(page)
        page.k = page.v = None
        self.stats.pages_spilled += 1

    def _rows(self, page: _Page) -> tuple[np.ndarray, np.ndarray]:
        if page.k is not None:
            return page.k, page.v
        offset, size, crc = page.spill
        if self._spill_map is None or len(self._spill_map) < offset + size:
            if self._spill_map is not None:
                self._spill_map.close()
            if os.fstat(self._spill_file.fileno()).st_size < offset + size:
                raise RecallError(f"the spill file {self._spill_file.name} is truncated")
            self._spill_map = mmap.mmap(self._spill_file.fileno(), 0, access=mmap.ACCESS_READ)
        data = self._spill_map[offset : offset + size]
        if zlib.crc32(data) != crc:
            raise RecallError(
                f"the spill file {self._spill_file.name} is corrupt (a page fails its checksum)"
            )
        kb = page.n * self.n_layer * self.k_row
        k = np.frombuffer(data[:kb], np.uint8).reshape(page.n, -1)
        v = np.frombuffer(data[kb:], np.uint8).reshape(page.n, -1)
        return k, v

    def _close_spill(self) -> None:
        if self._spill_map is not None:
            self._spill_map.close()
            self._spill_map = None
        if self._spill_file is not None:
            self._spill_file.close()  # a NamedTemporaryFile: deleted on close
            self._spill_file = None
        self._spill_size = 0

    # --- selection ------------------------------------------------------------------------
    def select(
        self,
        queries: np.ndarray | None,
        room: int,
        shortlist: int = 64,
        adjacent: bool = False,
        attention: tuple[Rope, int] | None = None,
        score: str = "peak",
        structural: np.ndarray | None = None,
        text: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> list[int]:
        """Page ids to bring back for queries [layer, head, rows, dim]: the pages that stand out
        by their score, best first, with `adjacent` the adjacent pages that score above the
        median (`with_runs`), then the pages after and before each of them, at most `room`
        tokens in all.  `score` (see `Recall.score`): "peak" (`peak_scores`), "attention"
        (`attention_scores`, `attention` = (rope, shift) given) or "both": the two rankings'
        standing-out pages in turn, the peak's first, each of the peak's with the page after
        and the page before it (what a page stands out by is often answered in the next one:
        "The pass key of | the red door is 48213"), an attention page alone (it is itself what
        a full cache attends to).  `structural`: page ids the attention ranking leaves out —
        pages of control tokens (chat-template markers), which queries attend to as sinks
        wherever they stand; recalled, a past chat turn made the model answer as a chat.
        "text" ranks the pages by `text` = `text_matches` (the places that continued the new
        text's runs, weighted) and needs no queries: every page with a match, most weight
        first."""
        needs = {"attention": attention, "both": attention, "text": text}
        if score not in Recall.SCORES or (score in needs and needs[score] is None):
            raise ValueError(f"score {score!r} is not one of {Recall.SCORES} or lacks its input")
        if self.n_pages == 0 or room <= 0:
            return []
        if score == "text":
            share = self.text_scores(*text)
            ranked = np.argsort(-share, kind="stable")
            return self.with_neighbours([self._slot_page[i] for i in ranked if share[i] > 0], room)
        group = self.n_head // self.n_head_kv
        rows = queries.shape[2]
        # per layer [kv head, dim, group * rows]: the query heads that read each kv head
        q = queries.reshape(self.n_layer, self.n_head_kv, group * rows, self.head_dim).transpose(0, 1, 3, 2)
        units: list[list[list[int]]] = []  # per ranking, its standing-out pages as units
        if score in ("peak", "both"):
            peak = self._standing_out(*self.peak_scores(q, shortlist), adjacent)
            units.append([[p, p + 1, p - 1] if score == "both" else [p] for p in peak])
        if score in ("attention", "both"):
            share = self.attention_scores(q, *attention)
            if structural is not None:
                share[np.isin(self._slot_page, structural)] = 0.0
            units.append([[p] for p in self._standing_out(share, np.arange(self.n_pages), adjacent)])
        best: list[int] = []
        for turn in itertools.zip_longest(*units, fillvalue=[]):
            best.extend(pid for unit in turn for pid in unit if pid in self._pages and pid not in best)
        return self.with_neighbours(best, room)

    def _standing_out(self, score: np.ndarray, candidates: np.ndarray, adjacent: bool) -> list[int]:
        """The candidates' pages that stand out by score, best first: at least halfway from the
        candidates' median to their best (pages of ordinary score crowd the answer out, the
        135M model then copies them); with `adjacent` followed by their runs above the median."""
        pids = self._slot_page
        median = np.median(score[candidates])
        cut = (score[candidates].max() + median) / 2
        ranked = np.argsort(-score, kind="stable")[: len(candidates)]
        best = [int(pids[i]) for i in ranked if score[i] >= cut]
        if adjacent:
            best = self.with_runs(best, {int(pids[i]) for i in ranked if score[i] >= median})
        return best

    def peak_scores(self, q: np.ndarray, shortlist: int) -> tuple[np.ndarray, np.ndarray]:
        """(score per slot, the shortlisted slots; the others score -inf) for q [layer, kv head,
        dim, query row]: the min/max summary shortlists, the stored keys re-rank the shortlist
        by `page_score` of their standardised q·k."""
        n = self.n_pages
        # two cheap rankings from the min/max summary: the upper bound of q·k (Quest's), loose
        # where a page's keys spread, and q·(min + max)/2, the page's centre
        z_bound = np.full(n, -np.inf, np.float32)
        z_center = np.full(n, -np.inf, np.float32)
        for layer in range(self.n_layer):  # one layer at a time keeps the matrices small
            center = self._center[layer, :, :n] @ q[layer]  # [kv head, pages, q]
            bound = center + self._radius[layer, :, :n] @ np.abs(q[layer])
            for z, s in ((z_bound, bound), (z_center, center)):
                s -= s.mean(axis=1, keepdims=True)
                s /= s.std(axis=1, keepdims=True) + 1e-6
                np.maximum(z, s.max(axis=(0, 2)), out=z)
        short = np.union1d(
            np.argsort(-z_bound, kind="stable")[:shortlist], np.argsort(-z_center, kind="stable")[:shortlist]
        )
        # exact: the real keys of the shortlisted pages, max over each page's keys, standardised
        # like the bound but over an even sample of all pages (the shortlist alone is biased)
        sample = np.unique(np.linspace(0, n - 1, min(n, self.SAMPLE)).astype(np.int64))
        slots = np.union1d(short, sample)
        exact = self._exact(slots, q)  # [l, k, slots, q]
        in_sample = np.isin(slots, sample)
        mean = exact[:, :, in_sample].mean(axis=2, keepdims=True)
        std = exact[:, :, in_sample].std(axis=2, keepdims=True) + 1e-6
        z = ((exact - mean) / std).transpose(2, 0, 1, 3).reshape(len(slots), -1)
        score = np.full(n, -np.inf, np.float32)
        score[slots] = self.page_score(z)
        score[np.setdiff1d(slots, short)] = -np.inf  # sampled only: not shortlisted
        return score, short

    def text_scores(self, after: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """Per slot: the summed weight of the places (stream indices) that lie in its page."""
        pids, at = np.unique(after // self.page, return_inverse=True)
        votes = np.bincount(at, weights=weight, minlength=len(pids))
        score = np.zeros(self.n_pages, np.float32)
        for pid, vote in zip(pids.tolist(), votes):
            slot = self._page_slot.get(pid)
            if slot is not None:
                score[slot] = vote
        return score

    def attention_scores(self, q: np.ndarray, rope: Rope, shift: int) -> np.ndarray:
        """Per slot, for q [layer, kv head, dim, query row]: its page's share of the queries'
        softmax attention over all stored keys, summed over layers, kv heads and query rows,
        each key rotated to stream index - `shift`, the distance from the queries it would have
        in a cache that never evicted.  The cells the cache holds are left out of the softmax:
        with them the full cache's most attended pages came back less often (0.50 of its top 3
        at 4k tokens against 0.81), its needle never whole.  Every stored key is read (in chunks
        of CHUNK pages, the softmax carried across them), so the cost grows with the store.
        Logits are scaled by 1/sqrt(head_dim), as most models' attention is (not Gemma's)."""
        n = self.n_pages
        scale = np.float32(1 / np.sqrt(self.head_dim))
        parts = []
        peak = total = None  # per (layer, kv head, row): the largest logit so far, the exp sum
        for first in range(0, n, self.CHUNK):
            slots = np.arange(first, min(n, first + self.CHUNK))
            pages = [self._pages[self._slot_page[s]] for s in slots]
            logits = self._logits(pages, q, rope, shift) * scale
            top = logits.max(axis=2)
            e = np.exp(logits - top[:, :, None])
            starts = np.cumsum([0] + [p.n for p in pages])[:-1]
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
        return score

    @staticmethod
    def page_score(z: np.ndarray) -> np.ndarray:
        """Per page, from z [pages, n] (its standardised q·k for every layer, kv head and query
        row): the strongest single one, which a needle read by a few heads has, less their mean,
        which is high for text every head attends to (the stream's opening).  Without the mean
        the needle's pages come back whole more often and so does the opening, which the model
        then copies where it is ordinary text."""
        return z.max(axis=1) - z.mean(axis=1)

    @staticmethod
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

    def with_neighbours(self, pids: list[int], room: int) -> list[int]:
        """The stored pages among pids, in their order, then the page after and the page before
        each of them, until the next one would pass `room` tokens.  Every chosen page comes
        before any neighbour: a needle ranked fourth must not lose its place to the neighbours
        of the three pages ahead of it."""
        chosen: list[int] = []
        used = 0
        for pid in [*pids, *(n for first in pids for n in (first + 1, first - 1))]:
            page = self._pages.get(pid)
            if page is None or pid in chosen:
                continue
            if used + page.n > room:
                break
            chosen.append(pid)
            used += page.n
        return chosen

    def _exact(self, slots: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Per layer, kv head, page (slot) and query: the largest q·k over the page's real keys."""
        pages = [self._pages[self._slot_page[s]] for s in slots]
        logits = self._logits(pages, q)
        starts = np.cumsum([0] + [p.n for p in pages])[:-1]
        return np.maximum.reduceat(logits, starts, axis=2)

    def _logits(
        self, pages: list[_Page], q: np.ndarray, rope: Rope | None = None, shift: int = 0
    ) -> np.ndarray:
        """q·k [layer, kv head, token, query row] of the pages' stored keys, pages in the given
        order; with `rope` each key first moved to stream index - `shift`."""
        keys = keys_as_float(np.concatenate([self._rows(p)[0] for p in pages]), self.type_k)
        keys = keys.reshape(-1, self.n_layer, self.n_head_kv, self.head_dim)
        if rope is not None:
            sidx = np.concatenate([p.stream_index for p in pages])
            keys = rope.rotate(keys, sidx - shift - np.concatenate([p.rot_pos for p in pages]))
        return np.matmul(keys.transpose(1, 2, 0, 3), q)

    def rows(
        self, pids: list[int], exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(stream index, rotation position, K, V) of the pages' cells in stream order, less those
        whose stream index is in `exclude`; K and V in `KVCache.write_rows`' layout
        ([layer][i][row])."""
        pages = sorted((self._pages[p] for p in pids), key=lambda p: p.stream_index[0])
        if not pages:
            empty = np.zeros(0, np.uint8)
            return np.zeros(0, np.int64), np.zeros(0, np.int32), empty, empty
        kv = [self._rows(p) for p in pages]
        sidx = np.concatenate([p.stream_index for p in pages])
        take = np.ones(len(sidx), bool) if exclude is None else ~np.isin(sidx, exclude)
        pos = np.concatenate([p.rot_pos for p in pages])[take]
        n = int(take.sum())
        k = np.concatenate([k for k, _ in kv])[take].reshape(n, self.n_layer, self.k_row).transpose(1, 0, 2)
        v = np.concatenate([v for _, v in kv])[take].reshape(n, self.n_layer, self.v_row).transpose(1, 0, 2)
        return sidx[take], pos, np.ascontiguousarray(k).ravel(), np.ascontiguousarray(v).ravel()
