"""`RecallTier`: the recall tier's controller, one per stream that has a `Recall`.

It owns the store, the reserve, the clocks of turn and chunk recalls, and what a recall is
scored with (captured queries, control-token pages, text matches); the stream calls it through
a few hooks and keeps the native changes and its records to itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from threadpoolctl import ThreadpoolController

from infmllm_gguf._llama_cpp import llama_cpp as lc
from infmllm_gguf.recall import selection
from infmllm_gguf.recall.config import Recall, RecallError
from infmllm_gguf.recall.scorers import TEXT_GRAMS, make_scorer, text_matches
from infmllm_gguf.recall.store import PageStore

if TYPE_CHECKING:
    from infmllm_gguf.stream import Stream

_blas: ThreadpoolController | None = None


def one_blas_thread():
    """A context in which numpy's BLAS runs on the calling thread: its worker threads, left
    spinning after a multithreaded product, would slow the llama.cpp decode and K-shift that
    follow a recall on the same cores (docs/results.md, "Perplexity and cost in chunk mode")."""
    global _blas
    if _blas is None:
        _blas = ThreadpoolController()  # finds the BLAS libraries numpy has loaded, once
    return _blas.limit(limits=1, user_api="blas")


class RecallTier:
    """The controller of one stream's recall tier.

    Hooks the stream calls: `reset`, `close`, `export`/`check_state`/`load` (its part of a
    saved stream), `span`/`until_recall`/`before_decode` (chunk mode's clock while feeding),
    `recalls_after_eviction`/`own_to_keep`/`on_evict` (an eviction: whether a recall follows,
    how many of the policy's cells stay, copying out what goes), `recall_pages` (chunk mode's
    recall right after an eviction), `on_rollback`, `clocks`/`set_clocks` (a transaction),
    and `before_answer` (a turn's recall).

    What it uses of the stream, and nothing else: reading `history`, `n_streamed`,
    `stream_index`, `recalled`, `n_cached`, `n_recalled`, `capacity`, `repositions`,
    `policy.budget`, `query_shift`, `kv`, `seq_id`, `ctx`, `n_vocab`; acting through
    `before_change`, `rollback`, `feed`, `make_room`, `replace_recalled` and `decode_again`.
    """

    def __init__(self, stream: Stream, recall: Recall):
        self.stream = stream
        self.recall = recall
        self.reserve = recall.reserve_for(stream.policy.budget)
        self.store = PageStore(stream.kv.layers(), recall.page, recall.store_limit_mb, recall.spill_dir)
        self.rope = stream.kv.rope()
        self.error: str | None = None  # why the store was switched off; survives a reset
        self.needs = make_scorer(recall.score, recall.shortlist).needs
        stream.kv.set_query_capture(recall.query_window)
        self._control: np.ndarray | None = None  # made by the first `structural_pages`
        self.n_turn = 0  # n_streamed at the last turn's recall
        self.n_chunk_recall = 0  # n_streamed at chunk mode's last recall

    def close(self) -> None:
        self.store.close()

    def reset(self) -> None:
        self.n_turn = self.n_chunk_recall = 0
        self.store.clear()
        self.stream.kv.clear_queries(self.stream.seq_id)

    # --- clocks ---------------------------------------------------------------------------
    @property
    def clocks(self) -> tuple[int, int]:
        return self.n_turn, self.n_chunk_recall

    def set_clocks(self, clocks: tuple[int, int]) -> None:
        self.n_turn, self.n_chunk_recall = clocks

    def on_rollback(self, n_keep: int) -> None:
        self.n_turn = min(self.n_turn, n_keep)
        self.n_chunk_recall = min(self.n_chunk_recall, n_keep)

    def span(self) -> int:
        """Keys a chunk-mode recall is for: those up to the next eviction, or to the next recall
        (`Recall.every`) if that comes first."""
        s = self.stream
        return min(s.capacity - s.policy.budget, self.recall.every or s.capacity)

    def until_recall(self) -> int:
        """Keys to feed before chunk mode's next recall between evictions (`Recall.every`); the
        capacity (never the bound on a piece) without one."""
        every, s = self.recall.every, self.stream
        return s.capacity if every is None else every - (s.n_streamed - self.n_chunk_recall)

    def before_decode(self, upcoming: np.ndarray) -> bool:
        """Recall before decoding `upcoming` if chunk mode's clock says so; whether it did."""
        if self.until_recall() > 0:
            return False
        self.recall_pages(upcoming=upcoming)
        return True

    # --- eviction -------------------------------------------------------------------------
    @property
    def recalls_after_eviction(self) -> bool:
        return self.recall.when == "chunk"

    def own_to_keep(self, n_keep: int, hold_reserve: bool) -> int:
        """How many of the policy's own cells an eviction to n_keep cells keeps: the part of the
        reserve recalled cells do not hold is the policy's until a recall needs it
        (`hold_reserve`: one follows), so a stream between turns keeps as many cells as it would
        without recall.  Without re-positioning the newest cell (an own one) must stay."""
        held = self.reserve if hold_reserve else self.stream.n_recalled
        return max(0 if self.stream.repositions else 1, n_keep - held)

    def on_evict(self, stream_index: np.ndarray, positions: np.ndarray) -> None:
        """Copy the cells about to be evicted (at cache positions `positions`) to the store."""
        if self.error is not None:
            return
        s, store = self.stream, self.store
        k, v = s.kv.read_rows(positions, store.k_bytes, store.v_bytes, s.seq_id)
        try:  # adding cells to a spilled page reads it back
            store.add(stream_index, positions, k, v)
        except RecallError as exc:
            self._switch_off(exc)
            raise

    def _switch_off(self, exc: RecallError) -> None:
        """The store failed: empty it and go on without recall (kv_stats reports why)."""
        self.error = str(exc)
        self.store.clear()

    # --- saving ---------------------------------------------------------------------------
    def _query_shape(self) -> tuple[int, int, int, int]:
        store = self.store
        return (store.n_layer, store.n_head, self.recall.query_window, store.head_dim)

    def _query_floats(self) -> int:
        return int(np.prod(self._query_shape()))

    def export(self, facts: dict, arrays: dict[str, np.ndarray]) -> None:
        """Add the tier's part of a saved stream: clocks, error, store and captured queries."""
        facts.update(n_turn=self.n_turn, n_chunk_recall=self.n_chunk_recall, recall_error=self.error)
        arrays.update({f"store.{k}": v for k, v in self.store.export().items()})
        s = self.stream
        arrays["queries"], facts["queries_held"] = s.kv.queries(self._query_floats(), s.seq_id)

    def check_state(self, facts: dict, arrays: dict[str, np.ndarray]) -> None:
        """Raise ValueError unless the saved captured queries fit this tier."""
        queries = arrays.get("queries")
        if queries is not None and (
            queries.shape != (self._query_floats(),)
            or not 0 <= int(facts.get("queries_held", -1)) <= self.recall.query_window
        ):
            raise ValueError("the saved captured queries do not fit this session's recall tier")

    def load(self, facts: dict, arrays: dict[str, np.ndarray]) -> None:
        """Become the tier `export` saved (after `check_state`; the store checks its own part)."""
        self.n_turn = int(facts["n_turn"])
        self.n_chunk_recall = int(facts.get("n_chunk_recall", facts["n_history"]))
        self.error = facts["recall_error"]
        self.store.load({k[6:]: v for k, v in arrays.items() if k.startswith("store.")})
        queries = arrays.get("queries")
        if queries is not None:
            self.stream.kv.set_queries(queries, int(facts["queries_held"]), self.stream.seq_id)

    # --- what a recall is scored with -----------------------------------------------------
    def queries(self, rows: int) -> np.ndarray | None:
        """The newest captured query rows (at most `rows`) as [layer, head, rows, dim], or None."""
        shape = self._query_shape()
        flat, held = self.stream.kv.queries(self._query_floats(), self.stream.seq_id)
        held = min(held, rows)
        if held == 0:
            return None
        return flat.reshape(shape)[:, :, shape[2] - held :]

    def structural_pages(self) -> np.ndarray:
        """Ids of the pages whose tokens include a control token (a chat-template marker; image
        cells are not tokens)."""
        if self._control is None:
            vocab = lc.llama_model_get_vocab(lc.llama_get_model(self.stream.ctx))
            ids = range(self.stream.n_vocab)
            self._control = np.array([lc.llama_vocab_is_control(vocab, t) for t in ids], bool)
        history = self.stream.history
        text = np.flatnonzero(history >= 0)
        return np.unique(text[self._control[history[text]]] // self.recall.page)

    def text_matches(self, rows: int, upcoming: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """`text_matches` of the new text (`upcoming` after the last keys read, whose runs lead
        into it, or else the newest `rows` keys) in the stretch of history the store holds."""
        history = self.stream.history
        read = min(len(history), rows if upcoming is None else max(TEXT_GRAMS) - 1)  # of the text
        text = history[len(history) - read :]
        if upcoming is not None:
            text = np.concatenate([text, upcoming])
        pids = self.store.page_ids()
        first = int(pids.min()) * self.recall.page
        last = max(first, min(len(history) - read, (int(pids.max()) + 1) * self.recall.page))
        return text_matches(history[first:last], first, text)

    # --- recalling ------------------------------------------------------------------------
    def recall_pages(self, rows: int | None = None, upcoming: np.ndarray | None = None) -> bool:
        """Score the stored pages with the newest queries (at most `rows`; score="text": with
        the text `upcoming`, or without it the newest `rows` keys) and make the best ones the
        recalled cells (replacing the previous ones), in stream order among the cached cells;
        returns whether anything changed.  A store that fails (RecallError) is switched off:
        the error is raised once, with nothing changed, and the stream goes on without recall.
        Chunk mode's clock (`Recall.every`) starts again at any recall, a turn's included."""
        s = self.stream
        s.before_change()
        self.n_chunk_recall = s.n_streamed
        if self.error is not None or self.store.n_pages == 0:
            return False
        rows = rows or self.recall.query_window
        queries = text = None
        if "text" in self.needs:
            text = self.text_matches(rows, upcoming)
        else:
            queries = self.queries(rows)
            if queries is None:
                return False
        room = min(self.reserve, s.capacity - (s.n_cached - s.n_recalled))
        try:
            pids = self._select(queries, room, text)
            cells = self.store.rows(pids, exclude=s.stream_index)  # the cells not cached
        except RecallError as exc:
            self._switch_off(exc)
            raise
        # a recalled cell is a stored cell of its page: it stays while its page is chosen
        drop = s.recalled & ~np.isin(s.stream_index // self.recall.page, pids)
        if len(cells[0]) == 0 and not drop.any():
            return False
        s.replace_recalled(drop, *cells, n_pages=len(pids))
        return True

    def _select(self, queries: np.ndarray | None, room: int, text: tuple | None) -> list[int]:
        attention = structural = None
        with one_blas_thread():
            if "attention" in self.needs:
                # keys moved to their distance from the queries in the whole stream
                attention = (self.rope, self.stream.query_shift)
                structural = self.structural_pages()
            return selection.select(
                self.store,
                queries,
                room,
                self.recall.shortlist,
                adjacent=self.recall.adjacent,
                attention=attention,
                score=self.recall.score,
                structural=structural,
                text=text,
            )

    def before_answer(self) -> np.ndarray | None:
        """A turn's recall, before answering: recall with the queries of the turn's newest text
        (at most query_window rows, none from before the turn), making room in the reserve
        first, then decode those last tokens again with the recalled pages in place, so that
        the answer's first token sees them too.  Only text is decoded again, never part of an
        image.  Returns log p of the tokens decoded again but the first (whose logits came
        before them), or None where nothing was."""
        s = self.stream
        if s.n_streamed == self.n_turn:
            return None
        rows = min(self.recall.query_window, s.n_streamed - self.n_turn)
        tail = np.array(s.history[s.n_streamed - rows :])
        images = np.flatnonzero(tail < 0)
        if len(images):
            tail = tail[images[-1] + 1 :]  # the text after the last image
        redo = len(tail) > 0 and s.rollback(s.n_streamed - len(tail))
        logprobs = None
        try:
            if s.n_cached - s.n_recalled > s.policy.budget - self.reserve:
                s.make_room()
            # rolled back, the tail is the text about to be decoded (again)
            if self.recall_pages(rows, upcoming=tail if redo else None) and self.recall.reencode:
                recalled = s.recalled
                if recalled.any():
                    s.decode_again(int(np.argmax(recalled)))
        finally:
            if redo:
                logprobs = s.feed(tail, logprobs=True)[1:]
            self.n_turn = s.n_streamed
        return logprobs
