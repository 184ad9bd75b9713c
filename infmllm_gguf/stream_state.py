"""`StreamState`: the half of `Stream` that treats a stream as one value.

Saving it (`export_state`) and becoming a saved one (`import_state`), transactions that make
a call one unit by restoring the state it started from, and the check that the native cache
and the stream's records agree.  A base class of `Stream` (stream.py), whose records it reads
and writes: it is the same object, split by concern.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import numpy as np

from infmllm_gguf.kv import NativeError


class InvariantError(RuntimeError):
    """The cache and the stream's bookkeeping disagree (raised by `check_invariants`)."""


@dataclasses.dataclass
class StreamStats:
    n_streamed: int = 0
    n_evicted: int = 0
    evictions: int = 0
    images: int = 0
    max_pos_seen: int = -1
    recalls: int = 0
    pages_recalled: int = 0  # summed over recalls: pages written back into the cache


@dataclasses.dataclass
class _Transaction:
    """What undoing a call needs: the stream's small facts at its start, and the whole state
    (`export_state`), taken lazily before the first change that a roll-back cannot undo."""

    n_history: int
    last_logits: np.ndarray | None
    clocks: tuple[int, int] | None  # the recall tier's
    query_shift: int
    stats: StreamStats
    saved: tuple[dict, dict[str, np.ndarray]] | None = None


class StreamState:
    """Saving, restoring, transactions and the invariants check of a `Stream`."""

    _transaction: _Transaction | None = None

    # --- saving and restoring ----------------------------------------------------------------
    def export_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """Everything the stream is, as (JSON-able facts, arrays): its cells as llama.cpp saves a
        sequence (positions, K and V) and the cells holding them, history, per-cell records, last
        logits, the policy's state, the recall store and the captured queries (a turn fed but
        not yet answered recalls with them after a restore)."""
        cells = self.kv.save_sequence(self.seq_id)
        facts = {
            "n_history": self._n_history,
            "next_pos": self.next_pos,
            "n_turn": 0,
            "n_chunk_recall": 0,
            "query_shift": self.query_shift,
            "stats": dataclasses.asdict(self.stats),
            "recall_error": None,
        }
        arrays = {
            "cells": cells,
            "history": self.history.copy(),
            "stream_index": self._stream_index.copy(),
            "recalled": self._recalled.copy(),
        }
        if self.last_logits is not None:
            arrays["last_logits"] = self.last_logits.copy()
        view = self.kv.cells(self.seq_id)
        arrays["layout"] = np.append(view.cells, self.kv.head(self.seq_id)).astype(np.int32)
        arrays.update({f"policy.{k}": v for k, v in self.policy.export_state(view.cells).items()})
        if self.tier is not None:
            self.tier.export(facts, arrays)
        return facts, arrays

    def import_state(self, facts: dict, arrays: dict[str, np.ndarray]) -> None:
        """Become what export_state gave.  The checks that need no change come first; a failure
        after them (llama.cpp refusing the cells) leaves the stream empty but consistent, and the
        caller restores what it had (Llama.load_state does)."""
        n_history = int(facts["n_history"])
        history, sidx, recalled = arrays["history"], arrays["stream_index"], arrays["recalled"]
        n = len(sidx)
        logits = arrays.get("last_logits")
        if (
            history.shape != (n_history,)
            or recalled.shape != (n,)
            or n > self.capacity
            or (logits is not None and logits.shape != (self.n_vocab,))
            or (n and (np.any(np.diff(sidx) <= 0) or sidx[-1] >= n_history or sidx[0] < 0))
        ):
            raise ValueError("the saved stream is inconsistent or larger than this cache")
        if (self.tier is None) != ("store.k" not in arrays):
            raise ValueError("the saved stream and this session differ in having a recall tier")
        if self.tier is not None:
            self.tier.check_state(facts, arrays)
        elif "queries" in arrays:
            raise ValueError("the saved captured queries do not fit this session's recall tier")
        stats = StreamStats(**facts["stats"])
        self.before_change()
        with self._guard.atomic():
            self.reset()
            loaded = self.kv.load_sequence(arrays["cells"], self.seq_id)
            view = self.kv.cells(self.seq_id)
            if not loaded or len(view.cells) != n:
                self.reset()
                raise ValueError("llama.cpp refused the saved cells (another model, n_ctx or K/V type?)")
            layout = arrays.get("layout")
            if not self.mrope and layout is not None and len(layout) == n + 1:
                # the cells they had: later batches then land, and round, as they would have
                try:
                    self.kv.place(layout[:n], int(layout[n]), self.seq_id)
                except NativeError:
                    pass  # another cache size: the cells stay where llama.cpp put them
                view = self.kv.cells(self.seq_id)
            self._history_buf = np.zeros(max(4096, 2 * n_history), np.int32)
            self._append_history(history.astype(np.int32))
            self._stream_index = sidx.astype(np.int64)
            self._recalled = recalled.astype(bool)
            self.next_pos = int(facts["next_pos"])
            self.query_shift = int(facts.get("query_shift", n_history - self.next_pos))
            self.last_logits = None if logits is None else logits.astype(np.float32)
            self.stats = stats
            policy_state = {k[7:]: v for k, v in arrays.items() if k.startswith("policy.")}
            self.policy.import_state(policy_state, view.cells)
            if self.tier is not None:
                self.tier.load(facts, arrays)
        if self.debug:
            self.check_invariants()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Make the block one unit: if it raises (an error, Ctrl-C, a client gone), the stream
        becomes exactly what it was before it.  Only appending costs nothing; before the block's
        first other change (an eviction, a recall, a roll-back, a scored decode, or any decode
        with a recall tier) the whole state is copied once (export_state).  Nested blocks are
        part of the outermost one."""
        if self._transaction is not None:
            yield
            return
        clocks = self.tier.clocks if self.tier is not None else None
        txn = _Transaction(
            self._n_history, self.last_logits, clocks, self.query_shift, dataclasses.replace(self.stats)
        )
        self._transaction = txn
        try:
            yield
        except BaseException:
            self._transaction = None
            self._undo(txn)
            raise
        finally:
            self._transaction = None

    def before_change(self) -> None:
        """Inside a transaction: copy the state before its first change beyond an append (every
        change but a decode calls this first)."""
        txn = self._transaction
        if txn is not None and txn.saved is None:
            txn.saved = self.export_state()

    def _undo(self, txn: _Transaction) -> None:
        """Back to the state at the start of txn: the copy, if one was taken (it holds what was
        appended before it, all cached), then the appended keys rolled back."""
        with self._guard.atomic():
            if txn.saved is not None:
                self.import_state(*txn.saved)
            if not self.rollback(txn.n_history):
                raise InvariantError(f"could not roll the stream back to {txn.n_history} keys")
            self.last_logits = txn.last_logits
            if self.tier is not None:
                self.tier.set_clocks(txn.clocks)
            self.query_shift, self.stats = txn.query_shift, txn.stats

    # --- checks -------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise InvariantError unless the native cache and the stream's records agree.

        The cache holds exactly the cached cells, at positions 0..n-1 (compacted), or at their
        stream indices (not re-positioned), or, for M-RoPE, non-decreasing below next_pos; within
        the capacity; they are distinct stream indices in stream order; every streamed key is
        either cached or counted as evicted."""
        view = self.kv.cells(self.seq_id)
        n = self.n_cached
        problems = []
        if len(view.cells) != n:
            problems.append(f"the cache holds {len(view.cells)} cells, the stream records {n}")
        elif self.mrope:
            if n and (np.any(np.diff(view.positions) < 0) or view.positions[-1] >= self.next_pos):
                problems.append(f"cached positions are not non-decreasing below {self.next_pos}")
        elif not self.repositions:
            if not np.array_equal(view.positions, self._stream_index) or self.next_pos != self._n_history:
                problems.append("cached positions are not the cells' stream indices")
        elif not np.array_equal(view.positions, np.arange(n)) or self.next_pos != n:
            problems.append(f"cached positions are not 0..n-1 = next_pos - 1 ({self.next_pos - 1})")
        if n > self.capacity:
            problems.append(f"{n} cells cached, capacity {self.capacity}")
        if n and (np.any(np.diff(self._stream_index) <= 0) or self._stream_index[-1] >= self._n_history):
            problems.append("cached stream indices are not increasing within the history")
        n_own = n - self.n_recalled  # recalled cells were counted as evicted
        if n_own + self.stats.n_evicted != self._n_history:
            problems.append(f"{n_own} cached + {self.stats.n_evicted} evicted != {self._n_history} streamed")
        if len(self._recalled) != n:
            problems.append(f"{len(self._recalled)} recalled flags for {n} cells")
        if problems:
            raise InvariantError("; ".join(problems))
