"""KV-cache policies: one small dataclass per policy, kvpress-style.

A policy only says how cells are scored and which to keep; the runtime owns the single
eviction path (read cells -> policy.select -> native evict -> native compact) that every
policy goes through, and `EvictingPolicy.select` applies the one native rule
(`infmllm_select_keep`) to what a policy defines: its scores and its `KeepRule` (sinks, recent
window, local window, bias).  So comparisons are fair by construction.  `FullCache`, which
evicts nothing, is no budget of zero but a policy without a budget: `KVPolicy` is what every
policy answers (`evicts`, `reposition`, the per-session hooks), `EvictingPolicy` adds the budget,
the chunk and the selection.

Scores arrive per decode as the attention mass each cell received from the scored query
rows (native, in-graph).  How a policy turns them into a ranking is its whole identity:
  - InfMLLM / SnapKV: *fresh* scores from the newest `retrieval_window` queries only;
  - H2O: scores *accumulated* over every query ever seen by the cell.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from infmllm_gguf.kv import CellView, select_keep


@dataclass(frozen=True)
class KeepRule:
    """The native rule's parameters besides the scores (see `infmllm_select_keep`)."""

    sinks: int
    recent: int
    local_window: int = 0
    bias: float = 0.0


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class KVPolicy:
    """What the runtime asks of any policy: whether it evicts, and the per-session hooks.

    `reposition` (keyword only): True compacts the kept cells to positions 0..n-1 after each
    eviction (their keys re-rotated), as the Inf-MLLM paper does; False leaves every cell at
    the position it was decoded at, so positions grow with the stream up to the model's
    trained context.  False is what M-RoPE models need (their keys cannot be re-rotated)."""

    reposition: bool = field(default=True, kw_only=True)

    name: ClassVar[str] = ""
    evicts: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.reposition, bool):
            raise ValueError(f"reposition must be a bool, got {self.reposition!r}")

    # --- what the native scorer must compute (0: nothing, n: last n rows, -1: all rows)
    @property
    def score_queries(self) -> int:
        return 0

    def needs_scores(self, n_cells_after: int) -> bool:
        """Whether a decode that leaves n_cells_after cells cached must be scored."""
        return self.score_queries != 0

    @property
    def tolerated_scoring(self) -> int:
        """A scoring mode a decode may run under where this policy needs no scores (0: none):
        one whose scores it reads only through `observe`, so that decoding beside sequences
        that need them changes nothing for it."""
        return 0

    # --- per-session state, reset by the runtime
    def reset(self, n_cells_max: int) -> None:
        """Forget all per-session state (called on a new stream).

        n_cells_max is the KV buffer's size in cells (KVCache.size), which bounds the cell
        indices a view can hold; llama.cpp pads it past the requested n_ctx.
        """

    def observe(self, view: CellView, n_rows: int) -> None:
        """Called after every decode with the cells' latest scores from n_rows queries."""

    def forget(self, freed_cells: np.ndarray) -> None:
        """Called after eviction with the cells that were freed."""

    def export_state(self, cells: np.ndarray) -> dict[str, np.ndarray]:
        """The per-session state, with each cell named by its rank in `cells` (the cached cells
        in position order), so that it can be restored where the cells have other indices."""
        return {}

    def import_state(self, state: dict[str, np.ndarray], cells: np.ndarray) -> None:
        """Restore what export_state gave onto `cells` (the cached cells in position order);
        called after reset().  Raises ValueError (nothing changed) if state does not fit."""


@dataclass
class FullCache(KVPolicy):
    """No eviction: the cache is n_ctx cells and the stream fails with a clear error (a
    `ContextFullError`) once it would exceed them."""

    name: ClassVar[str] = "full"


@dataclass
class EvictingPolicy(KVPolicy):
    """The base of every evicting policy: keep `budget` cells; evict `chunk` at a time when the
    cache holds budget + chunk.  A policy defines its scores and its `KeepRule`; the shared
    `select` applies the one native rule to them."""

    budget: int
    chunk: int | None = None  # default: budget // 8 (at least 16)

    evicts: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("budget", self.budget, 1)
        if self.chunk is None:
            self.chunk = max(16, self.budget // 8)
        _check_int("chunk", self.chunk, 1)

    @property
    def capacity(self) -> int:
        """Cells the cache may hold before an eviction round."""
        return self.budget + self.chunk

    # --- what each policy defines: how cells rank, and the windows kept regardless
    def rule(self) -> KeepRule:
        raise NotImplementedError

    def scores(self, view: CellView) -> np.ndarray:
        """What the cells of view are ranked by (higher is kept)."""
        return view.scores

    # --- the shared selection
    def select(self, view: CellView, n_keep: int | None = None) -> np.ndarray:
        """Boolean keep-mask over view (stream order) keeping exactly n_keep cells (default: budget).

        The runtime asks for fewer than budget only to make room for an image larger than one
        chunk; the sinks and then the recent window shrink to fit.  Without re-positioning the
        newest cell is always kept: llama.cpp continues a sequence from its newest position."""
        n_keep = self.budget if n_keep is None else n_keep
        rule = self.rule()
        newest = 0 if self.reposition else min(1, n_keep)
        sinks = min(rule.sinks, n_keep - newest)
        recent = max(min(rule.recent, n_keep - sinks), newest)
        return select_keep(self.scores(view), n_keep, sinks, recent, rule.local_window, rule.bias)


@dataclass
class SlidingWindow(EvictingPolicy):
    """The newest `budget` tokens."""

    name: ClassVar[str] = "window"

    def rule(self) -> KeepRule:
        return KeepRule(sinks=0, recent=self.budget)


@dataclass
class StreamingLLM(EvictingPolicy):
    """Attention sinks (the first tokens) plus the newest tokens (Xiao et al., 2023)."""

    sinks: int = 4
    name: ClassVar[str] = "streamingllm"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("sinks", self.sinks, 0)
        if self.sinks > self.budget:
            raise ValueError(f"budget ({self.budget}) must be >= sinks ({self.sinks})")

    def rule(self) -> KeepRule:
        return KeepRule(sinks=self.sinks, recent=self.budget - self.sinks)


@dataclass
class _SaddlePolicy(EvictingPolicy):
    """Shared checks for policies that keep sinks + recent + top-scored cells."""

    sinks: int = 4
    recent: int | None = None  # default: default_recent_fraction of the budget

    default_recent_fraction: ClassVar[float] = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("sinks", self.sinks, 0)
        if self.recent is None:
            fraction = int(self.budget * self.default_recent_fraction)
            self.recent = max(0, min(fraction, self.budget - self.sinks))
        _check_int("recent", self.recent, 0)
        if self.sinks + self.recent > self.budget:
            raise ValueError(
                f"budget ({self.budget}) must be >= sinks + recent ({self.sinks} + {self.recent})"
            )


@dataclass
class _FreshWindowPolicy(_SaddlePolicy):
    """Scores from the newest `retrieval_window` query rows only, recomputed for each eviction."""

    retrieval_window: int = 8
    _window: deque = field(default_factory=deque, init=False, repr=False, compare=False)
    _n_cells_max: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("retrieval_window", self.retrieval_window, 1)

    @property
    def score_queries(self) -> int:
        return self.retrieval_window

    def needs_scores(self, n_cells_after: int) -> bool:
        # only the newest retrieval_window rows before an eviction are ever ranked on, so the
        # decodes before them skip scoring (and its cost) altogether
        return n_cells_after > self.capacity - self.retrieval_window

    @property
    def tolerated_scoring(self) -> int:
        return self.retrieval_window  # the raw scores are read through observe only

    def reset(self, n_cells_max: int) -> None:
        self._window.clear()
        self._n_cells_max = n_cells_max

    def observe(self, view: CellView, n_rows: int) -> None:
        # keep just enough recent decodes to cover retrieval_window query rows
        self._window.appendleft((n_rows, view.cells.copy(), view.scores.copy()))
        covered = 0
        for i, (rows, _, _) in enumerate(self._window):
            covered += rows
            if covered >= self.retrieval_window:
                while len(self._window) > i + 1:
                    self._window.pop()
                break

    def forget(self, freed_cells: np.ndarray) -> None:
        self._window.clear()  # freed cells will be reused: old rows no longer line up

    def export_state(self, cells: np.ndarray) -> dict[str, np.ndarray]:
        rank = np.full(self._n_cells_max, -1, np.int64)
        rank[cells] = np.arange(len(cells))
        entries = list(self._window)
        return {
            "window_rows": np.array([rows for rows, _, _ in entries], np.int64),
            "window_sizes": np.array([len(c) for _, c, _ in entries], np.int64),
            "window_ranks": np.concatenate([rank[c] for _, c, _ in entries] or [np.zeros(0, np.int64)]),
            "window_scores": np.concatenate([s for _, _, s in entries] or [np.zeros(0, np.float32)]),
        }

    def import_state(self, state: dict[str, np.ndarray], cells: np.ndarray) -> None:
        ranks, sizes = state["window_ranks"], state["window_sizes"]
        if (
            len(ranks) != sizes.sum()
            or len(state["window_scores"]) != len(ranks)
            or len(sizes) != len(state["window_rows"])
        ):
            raise ValueError("the policy's saved window is inconsistent")
        if len(ranks) and (ranks.min() < 0 or ranks.max() >= len(cells)):
            raise ValueError("the policy's saved window names cells that are not cached")
        bounds = np.cumsum(sizes)[:-1]
        self._window = deque(
            (int(rows), cells[r].astype(np.int32), s.astype(np.float32))
            for rows, r, s in zip(
                state["window_rows"], np.split(ranks, bounds), np.split(state["window_scores"], bounds)
            )
        )

    def window_scores(self, view: CellView) -> np.ndarray:
        """Attention mass of the newest retrieval_window queries, per cell of view."""
        by_cell = np.zeros(max(self._n_cells_max, int(view.cells.max(initial=0)) + 1), np.float64)
        rows_left = self.retrieval_window
        for rows, cells, scores in self._window:
            take = min(rows, rows_left)
            by_cell[cells] += scores * (take / rows)
            rows_left -= take
            if rows_left == 0:
                break
        return by_cell[view.cells]


@dataclass
class InfMLLM(_FreshWindowPolicy):
    """Inf-MLLM: sinks + recent + attention saddles by local-sum score with a recency bias.

    r_j = sum_{|i-j| <= local_window} a_i / sum(a) + bias * j / (n - 1), with a the fresh
    attention mass of the newest retrieval_window queries and j the cell's rank in stream
    order (0 = oldest).  Image cells are ranked like text, as in the paper;
    `protect_newest_image` keeps the newest image (a video's latest frame) among the saddles
    whatever its score.  Defaults: docs/results.md ("Choosing the defaults").
    """

    local_window: int = 0
    bias: float = 1e-3
    protect_newest_image: bool = False
    name: ClassVar[str] = "infmllm"
    # chosen by `python -m bench sweep-infmllm`: streaming perplexity favours a large recent window
    default_recent_fraction: ClassVar[float] = 0.875

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("local_window", self.local_window, 0)
        if not isinstance(self.protect_newest_image, bool):
            raise ValueError(f"protect_newest_image must be a bool, got {self.protect_newest_image!r}")
        if not isinstance(self.bias, (int, float)) or not math.isfinite(self.bias) or self.bias < 0:
            raise ValueError(f"bias must be a finite number >= 0, got {self.bias!r}")

    def rule(self) -> KeepRule:
        return KeepRule(self.sinks, self.recent, self.local_window, self.bias)

    def scores(self, view: CellView) -> np.ndarray:
        scores = self.window_scores(view)
        if self.protect_newest_image and view.media.max(initial=0) > 0:
            scores[view.media == view.media.max()] = np.inf  # ranked above every other saddle
        return scores


@dataclass
class SnapKV(_FreshWindowPolicy):
    """SnapKV-style: observation-window scores, no local sum, no bias."""

    retrieval_window: int = 16
    name: ClassVar[str] = "snapkv"

    def rule(self) -> KeepRule:
        return KeepRule(self.sinks, self.recent)

    def scores(self, view: CellView) -> np.ndarray:
        return self.window_scores(view)


@dataclass
class H2O(EvictingPolicy):
    """Heavy hitters: recent tokens + the highest attention *accumulated* over all queries seen."""

    recent: int | None = None  # default: budget // 2 (the H2O paper's split)
    name: ClassVar[str] = "h2o"
    _acc: np.ndarray = field(default_factory=lambda: np.zeros(0), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.recent is None:
            self.recent = self.budget // 2
        _check_int("recent", self.recent, 0)
        if self.recent > self.budget:
            raise ValueError(f"budget ({self.budget}) must be >= recent ({self.recent})")

    @property
    def score_queries(self) -> int:
        return -1  # every query row

    def reset(self, n_cells_max: int) -> None:
        self._acc = np.zeros(n_cells_max, np.float64)

    def observe(self, view: CellView, n_rows: int) -> None:
        self._acc[view.cells] += view.scores  # accumulated, never recomputed

    def forget(self, freed_cells: np.ndarray) -> None:
        self._acc[freed_cells] = 0.0

    def export_state(self, cells: np.ndarray) -> dict[str, np.ndarray]:
        return {"acc": self._acc[cells].copy()}

    def import_state(self, state: dict[str, np.ndarray], cells: np.ndarray) -> None:
        if state["acc"].shape != cells.shape:
            raise ValueError("the policy's saved scores do not match the cached cells")
        self._acc[cells] = state["acc"]

    def rule(self) -> KeepRule:
        return KeepRule(sinks=0, recent=self.recent)

    def scores(self, view: CellView) -> np.ndarray:
        return self._acc[view.cells]


POLICIES: dict[str, type[KVPolicy]] = {
    cls.name: cls for cls in (InfMLLM, StreamingLLM, H2O, SnapKV, SlidingWindow, FullCache)
}


def make_policy(spec: KVPolicy | str | None, budget: int | None = None, reposition: bool = True) -> KVPolicy:
    """A policy from an object or a name (defaults, optional budget and reposition)."""
    if isinstance(spec, KVPolicy):
        return spec
    if spec is None:
        spec = "full" if budget is None else "infmllm"
    if not isinstance(spec, str) or spec.lower() not in POLICIES:
        raise ValueError(f"unknown kv_policy {spec!r}; valid names: {', '.join(POLICIES)}")
    cls = POLICIES[spec.lower()]
    if not cls.evicts:
        return cls()
    return cls(budget=budget if budget is not None else 1024, reposition=reposition)
