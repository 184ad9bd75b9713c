"""`Stream`: one sequence of a llama context — its cells, its history, its policy's state.

Every token ever fed is in the history; the cache holds at most the policy's budget + chunk
of them, at compacted positions 0..n-1 — or, under a policy with `reposition=False`, at the
positions they were decoded at (then positions grow with the stream, up to the model's
trained context).  Image cells are cells like any other: they enter
through the same decode path (as embeddings instead of token ids), are scored, evicted and
compacted like text.  In the history an image cell is recorded as a negative key derived
from the image's content, so a prompt that repeats an image matches it like a repeated token.
(An M-RoPE model's image takes fewer positions than cells, so there positions run ahead of
the cell count; such a stream evicts only without re-positioning, as its keys cannot be
re-rotated.)

In an iSWA cache (Gemma 2/3) the cells are those of its full-attention half; the native calls
make the sliding-window half follow every eviction and compaction.

With a recall tier (the recall package; its controller `RecallTier` is called through a few
hooks), what the policy evicts is copied to a host-memory store first, and recalled pages sit
in a reserve of the budget beside the policy's cells, in stream order: the policy ranks and
evicts only its own cells, and holds the part of the reserve that recalled cells do not until
a recall needs it; recalled ones leave when the next recall replaces them.

Every native state change (decode, evict + compact + K-shift, roll back, recall) and its
Python bookkeeping happen as one unit: an exception or Ctrl-C leaves the cache holding exactly the
cells the stream records (see interrupts.py).  `transaction()` (stream_state.py, with saving
and restoring) makes a whole call one unit too: if it raises, the stream becomes what it was
before the call.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from infmllm_gguf._llama_cpp import llama_cpp as lc
from infmllm_gguf.interrupts import InterruptGuard
from infmllm_gguf.kv import Batch, CellView, KVCache
from infmllm_gguf.policies import KVPolicy
from infmllm_gguf.recall import PageStore, Recall, RecallTier
from infmllm_gguf.steps import Piece, StepLoop
from infmllm_gguf.stream_state import InvariantError as InvariantError  # raised by its checks
from infmllm_gguf.stream_state import StreamState, StreamStats


class ContextFullError(ValueError):
    """The stream would exceed what its cache can take — n_ctx cells under FullCache, or the
    model's trained positions where kept cells are not re-positioned; nothing was fed."""


class StopGeneration(Exception):  # noqa: N818 - a signal, like StopIteration, not an error
    """Raised by a stream's `poll` hook to end a generation where it is, as if max_tokens were
    reached; raised while a prompt is fed, it aborts the call like any other exception."""


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def media_ids(keys: np.ndarray, stream_index: np.ndarray) -> np.ndarray:
    """Per cell: 0 for text, else the number (1, 2, ... in stream order) of the image it is part of.

    An image is a run of cells with the same negative key at consecutive stream indices; two
    copies of one picture fed back to back, with nothing between them, count as one image.
    """
    img = keys < 0
    same_as_previous = np.zeros(len(keys), bool)
    same_as_previous[1:] = img[:-1] & (keys[1:] == keys[:-1]) & (np.diff(stream_index) == 1)
    return np.where(img, np.cumsum(img & ~same_as_previous), 0).astype(np.int32)


def inside_image(keys: np.ndarray, i: int) -> bool:
    """Whether a cut before keys[i] falls inside an image (between two of its cells)."""
    return 0 < i < len(keys) and keys[i] < 0 and keys[i - 1] == keys[i]


def _subview(view: CellView, mask: np.ndarray) -> CellView:
    return CellView(view.cells[mask], view.positions[mask], view.scores[mask], view.media[mask])


class Stream(StreamState):
    """One sequence of a context (reached through its `kv`) under `policy`; owned by a `Session`,
    whose engine serialises calls to it.  Its decodes go through the engine's `steps`, which
    batches them with other sequences' (steps.py)."""

    def __init__(
        self,
        kv: KVCache,
        steps: StepLoop,
        policy: KVPolicy,
        n_ctx: int,
        n_vocab: int,
        n_embd: int,
        guard: InterruptGuard,
        debug: bool = False,
        seq_id: int = 0,
        recall: Recall | None = None,
    ):
        ctx = self.ctx = kv.ctx
        self.policy = policy
        self.n_ctx = n_ctx
        self.n_vocab = n_vocab
        self.n_embd = n_embd
        self.seq_id = seq_id
        self.debug = debug
        self._guard = guard
        self.kv = kv
        self.steps = steps
        self.n_batch = lc.llama_n_batch(ctx)
        self.n_ubatch = lc.llama_n_ubatch(ctx)
        self._embd_batch: Batch | None = None  # made on the first image
        model = lc.llama_get_model(ctx)
        rope = lc.llama_model_rope_type(model)
        self.mrope = rope in (lc.LLAMA_ROPE_TYPE_MROPE, lc.LLAMA_ROPE_TYPE_IMROPE)
        # without re-positioning, positions grow with the stream: as far as the model was
        # trained for, or as the cache was asked to be (a user's choice to extrapolate)
        self.max_positions = max(lc.llama_model_n_ctx_train(model), n_ctx)
        self._transaction = None  # the open transaction (StreamState.transaction)
        # called between prompt pieces and before each generated token (Llama.turn sets it):
        # it may raise to abort the call, or StopGeneration to end a generation there
        self.poll: Callable[[], None] | None = None
        self.recall = recall
        self.tier = RecallTier(self, recall) if recall is not None else None
        self.reset()

    def close(self) -> None:
        if self.tier is not None:
            self.tier.close()
        if self._embd_batch is not None:
            self._embd_batch.close()
        self._embd_batch = None

    # --- state --------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new, empty stream."""
        self.before_change()
        with self._guard.atomic():
            self.kv.remove(self.seq_id, -1, -1)
            self._history_buf = np.zeros(4096, np.int32)  # grows by doubling: appends are amortised O(1)
            self._n_history = 0
            self._stream_index = np.zeros(0, np.int64)  # stream index of each cached position
            self._recalled = np.zeros(0, bool)  # per cached position: a recalled cell
            self.next_pos = 0  # the position of the next key: n_cached unless M-RoPE images came
            self.query_shift = 0  # stream index - position of the newest decoded key, as decoded
            self.last_logits: np.ndarray | None = None
            self.stats = StreamStats()
            # per-cell policy state is indexed by cell, and llama.cpp pads the cache past n_ctx;
            # a policy that keeps everything keeps none (and runs caches without plain cells: iSWA,
            # recurrent)
            self.policy.reset(self.n_ctx if not self.policy.evicts else self.kv.size)
            if self.tier is not None:
                self.tier.reset()

    @property
    def history(self) -> np.ndarray:
        """Every key fed so far: token ids, and a negative key per image cell (read-only view)."""
        view = self._history_buf[: self._n_history]
        view.flags.writeable = False
        return view

    def _append_history(self, piece: np.ndarray) -> None:
        n = self._n_history + len(piece)
        if n > len(self._history_buf):
            self._history_buf = np.resize(self._history_buf, max(n, 2 * len(self._history_buf)))
        self._history_buf[self._n_history : n] = piece
        self._n_history = n

    @property
    def n_streamed(self) -> int:
        return self._n_history

    @property
    def n_cached(self) -> int:
        return len(self._stream_index)

    @property
    def capacity(self) -> int:
        return self.n_ctx if not self.policy.evicts else self.policy.capacity

    @property
    def repositions(self) -> bool:
        """Whether kept cells are compacted to positions 0..n-1 after each eviction."""
        return self.policy.reposition and self.policy.evicts

    @property
    def store(self) -> PageStore | None:
        """The recall tier's store, or None without a tier."""
        return self.tier.store if self.tier is not None else None

    @property
    def recalled(self) -> np.ndarray:
        """Per cached cell, in position order: whether it is a recalled one."""
        return self._recalled.copy()

    @property
    def n_recalled(self) -> int:
        return int(self._recalled.sum())

    def recalled_ranges(self) -> list[tuple[int, int]]:
        """Stream-index ranges [start, end) of the pages now recalled (a page's cells that are
        cached anyway, e.g. as saddles, are inside its range too)."""
        if self.recall is None or not self._recalled.any():
            return []
        page = self.recall.page
        pages = np.unique(self._stream_index[self._recalled] // page)
        return [(int(p) * page, (int(p) + 1) * page) for p in pages]

    @property
    def n_image_cells(self) -> int:
        return int((self._history_buf[self._stream_index] < 0).sum())

    @property
    def stream_index(self) -> np.ndarray:
        """Stream index (0 = first key ever fed) of each cached cell, in position order."""
        return self._stream_index.copy()

    def view(self) -> CellView:
        """The cached cells in stream order, with which of them are image cells (`media`)."""
        view = self.kv.cells(self.seq_id)
        keys = self._history_buf[self._stream_index]
        return dataclasses.replace(view, media=media_ids(keys, self._stream_index))

    # --- feeding --------------------------------------------------------------------------
    def feed(self, tokens: np.ndarray, logprobs: bool = False) -> np.ndarray | None:
        """Append token ids, evicting as the policy says; with logprobs, log p of each token."""
        if tokens.ndim != 1 or len(tokens) == 0:
            raise ValueError("no tokens to feed")
        if tokens.min() < 0 or tokens.max() >= self.n_vocab:
            raise ValueError(f"token ids must be in [0, {self.n_vocab})")
        self.check_room(len(tokens), len(tokens))
        out = np.empty(len(tokens), np.float64) if logprobs else None
        tier = self.tier
        i = 0
        while i < len(tokens):
            # a text-scored chunk recall matches the piece decoded next
            upcoming = tokens[i : i + tier.span()] if tier is not None else None
            if self.n_cached >= self.capacity:
                self._evict(self.policy.budget, upcoming=upcoming)
            elif tier is not None and tier.before_decode(upcoming):
                continue  # the recalled pages may have filled the cache
            until_recall = tier.until_recall() if tier is not None else self.capacity
            limit = self.steps.piece_limit()  # smaller while others generate: no long stalls
            take = min(self.capacity - self.n_cached, limit, len(tokens) - i, until_recall)
            if self.poll is not None and i > 0:
                self.poll()  # between pieces (a generated token is one piece: polled by its caller)
            piece = tokens[i : i + take]
            pos = np.arange(self.next_pos, self.next_pos + take)
            self._decode(piece, piece, pos, out[i : i + take] if out is not None else None)
            i += take
        return out

    def feed_embeddings(
        self,
        embd: np.ndarray,
        key: int,
        non_causal: bool = False,
        mrope: tuple[np.ndarray, int] | None = None,
    ) -> None:
        """Append one image's embeddings (n x n_embd) as n cells recorded under `key` (< 0).

        `mrope` = (positions, n_pos) for an M-RoPE model: the image's 4 x n positions, which
        start at `next_pos`, and the positions it takes (mtmd's count, less than n).  The image
        is decoded whole: the cache evicts first to make room for all of it, and a failure
        part-way removes the part already decoded."""
        n = len(embd)
        if embd.ndim != 2 or embd.shape[1] != self.n_embd or n == 0:
            raise ValueError(f"image embeddings must be n x {self.n_embd}, got {embd.shape}")
        if key >= 0:
            raise ValueError("an image's key must be negative")
        if (mrope is not None) != self.mrope:
            raise ValueError("M-RoPE positions are needed for an M-RoPE model's images, and only there")
        if mrope is not None and (mrope[0].shape != (4, n) or mrope[0][:3].min() != self.next_pos):
            raise ValueError(f"M-RoPE positions must be 4 x {n}, from next_pos {self.next_pos}")
        self.check_image_fits(n, non_causal)
        self.check_room(n, n if mrope is None else mrope[1])
        if self.n_cached + n > self.capacity:
            self._evict(min(self.policy.budget, self.capacity - n))
        n_before, logits_before = self._n_history, self.last_logits
        keys = np.full(n, key, np.int32)
        pos, n_pos = mrope if mrope is not None else (np.arange(self.next_pos, self.next_pos + n), n)
        try:
            pos_0 = self.next_pos
            for i in range(0, n, self.n_batch):
                piece = slice(i, i + self.n_batch)
                last = i + self.n_batch >= n
                end = pos_0 + n_pos if last else None
                self._decode(keys[piece], embd[piece], pos[..., piece], None, end, non_causal)
        except BaseException:
            if self.rollback(n_before):  # all of the image is still cached: nothing was evicted since
                self.last_logits = logits_before
            raise
        self.stats.images += 1

    def check_image_fits(self, n: int, non_causal: bool = False) -> None:
        """Raise ValueError unless an image of n cells can be decoded whole into this stream now."""
        if self.policy.evicts and n > self.policy.budget:
            raise ValueError(
                f"an image of {n} tokens cannot fit in the budget of {self.policy.budget} cells; "
                "raise the budget or use a smaller image"
            )
        if non_causal and n > self.n_ubatch:
            raise ValueError(f"this projector's images attend non-causally and need n_batch >= {n}")
        if self.mrope and n > self.n_batch:
            # its cells share one position, so a part decoded before a failure could not be told apart
            raise ValueError(f"an M-RoPE image is decoded in one batch: it needs n_batch >= {n}")

    def check_room(self, n_cells: int, n_positions: int) -> None:
        """Raise ContextFullError unless n_cells more cells taking n_positions positions fit."""
        if not self.policy.evicts and self.n_cached + n_cells > self.n_ctx:
            raise ContextFullError(
                f"the stream would hold {self.n_cached + n_cells} cells but n_ctx is {self.n_ctx} "
                "and kv_policy is 'full'; use an evicting policy (e.g. 'infmllm') for endless streams"
            )
        if not self.repositions and self.next_pos + n_positions > self.max_positions:
            raise ContextFullError(
                f"the stream would reach position {self.next_pos + n_positions} but the model "
                f"was trained for {self.max_positions} and kv_policy has reposition=False; "
                "reset() the stream, or use reposition=True (1-D RoPE models) to stream on"
            )

    def _decode(
        self,
        keys: np.ndarray,
        inputs: np.ndarray,
        positions: np.ndarray,
        logprobs_out: np.ndarray | None,
        next_pos: int | None = None,
        non_causal: bool = False,
    ) -> None:
        """Decode token ids or embeddings (`inputs`) at `positions` as cells recorded under `keys`;
        the stream's next position becomes `next_pos` (default: one past the largest position)."""
        n = len(keys)
        start = self.n_cached
        scored = self.policy.needs_scores(start + n)
        if scored or self.tier is not None:
            self.before_change()  # scores observed, queries captured: more than an append
        flags = np.zeros(n, np.int8)
        flags[-1] = 1
        if logprobs_out is not None:
            flags[:] = 1
        piece = self._piece(inputs, positions, flags, self.policy.score_queries if scored else 0, non_causal)
        with self._unit():
            try:
                self._batch_decode(piece)
            except BaseException:
                # a failed or aborted ubatch is removed by llama.cpp, the ubatches before it are not
                # an M-RoPE image's cells all sit at its first (t) position
                first = int(positions.min() if positions.ndim == 1 else positions[0].min())
                self.kv.remove(self.seq_id, first, -1)
                raise
            max_pos = int(positions.max() if positions.ndim == 1 else positions[:3].max())  # t, y, x
            next_pos = max_pos + 1 if next_pos is None else next_pos
            self._record(keys, max_pos, next_pos, piece, logprobs_out, scored)

    def _piece(
        self,
        inputs: np.ndarray,
        positions: np.ndarray,
        flags: np.ndarray,
        scoring: int,
        non_causal: bool = False,
    ) -> Piece:
        """This sequence's part of a step: token ids share the step's batch, embeddings go alone."""
        embd = inputs.ndim == 2
        if embd and self._embd_batch is None:
            self._embd_batch = Batch(self.n_batch, self.n_embd, 4 if self.mrope else 1)
        return Piece(
            self.seq_id, inputs, positions, flags, scoring, self.policy.tolerated_scoring,
            self._embd_batch if embd else None, non_causal,
        )  # fmt: skip

    def _batch_decode(self, piece: Piece) -> None:
        """Decode piece (with whatever other sequences decode in the same step), raising where
        it did not succeed."""
        self.steps.decode(piece)
        if piece.status == 2:
            raise KeyboardInterrupt  # the abort callback saw Ctrl-C mid-decode
        if piece.status != 0:
            raise RuntimeError(f"llama_decode failed with status {piece.status}")

    @contextlib.contextmanager
    def _unit(self) -> Iterator[None]:
        """A native state change and its bookkeeping: SIGINT deferred over it, invariants checked
        after it in debug mode."""
        with self._guard.atomic():
            yield
        if self.debug:
            self.check_invariants()

    def _record(
        self,
        keys: np.ndarray,
        max_pos: int,
        next_pos: int,
        piece: Piece,
        logprobs_out: np.ndarray | None,
        scored: bool,
    ) -> None:
        """Python's side of a decode the cache has taken: history, logits, policy scores."""
        n = len(keys)
        rows = piece.logits
        if logprobs_out is not None:
            lsm = _log_softmax(rows.astype(np.float64))
            logprobs_out[0] = (
                _log_softmax(self.last_logits[None, :].astype(np.float64))[0, keys[0]]
                if self.last_logits is not None
                else np.nan
            )
            logprobs_out[1:] = lsm[np.arange(n - 1), keys[1:]]
        last_logits = rows[-1].copy()

        # computed above, committed below: nothing here can fail halfway
        self._append_history(keys)
        first = self._n_history - n
        self._stream_index = np.concatenate([self._stream_index, np.arange(first, first + n)])
        self._recalled = np.concatenate([self._recalled, np.zeros(n, bool)])
        self.stats.max_pos_seen = max(self.stats.max_pos_seen, max_pos)
        self.next_pos = next_pos
        self.query_shift = self._n_history - next_pos  # where the captured queries were rotated
        self.last_logits = last_logits
        if scored:
            self.policy.observe(piece.view, piece.scored_rows)

    # --- eviction and roll-back -------------------------------------------------------------
    def _evict(
        self,
        n_keep: int,
        then_recall: bool = True,
        make_room: bool = False,
        upcoming: np.ndarray | None = None,
    ) -> None:
        """The one eviction path: the policy picks n_keep cells, native evicts and compacts.

        With a recall tier the policy ranks only its own cells (`RecallTier.own_to_keep` says
        how many stay: fewer where a recall follows, chunk mode's right after or `make_room`
        for a turn's); the recalled cells stay (all of them, or none where n_keep cannot hold
        them), and whatever the policy evicts is copied to the store first.  `upcoming`: the
        keys to be decoded after the eviction, where the caller knows them (the new text a
        chunk recall with score="text" matches)."""
        self.before_change()
        view = self.view()
        own = ~self._recalled
        tier = self.tier
        # chunk mode recalls right after: its arrangement re-positions the cells again, so both
        # moves share one K-shift, applied before the block ends (a decode never sees it pending)
        recall_next = then_recall and tier is not None and tier.recalls_after_eviction
        n_own_keep = n_keep if tier is None else tier.own_to_keep(n_keep, recall_next or make_room)
        if n_own_keep + self.n_recalled > n_keep:
            own[:] = True  # too little room (a large image): recalled cells go too
        keep = ~own
        keep[own] = self.policy.select(_subview(view, own), n_own_keep)
        if keep[own].sum() != n_own_keep:
            raise RuntimeError(f"{self.policy.name} kept {keep[own].sum()} cells, asked for {n_own_keep}")
        out = own & ~keep & ~self._recalled  # recalled cells are in the store already
        if tier is not None and out.any():
            tier.on_evict(self._stream_index[out], view.positions[out])
        with self._guard.atomic():
            with self._unit():
                # evict validates everything before it changes anything
                self.kv.evict_cells(view.cells[~keep], self.seq_id)
                if self.repositions:
                    self.kv.compact(self.seq_id)  # cannot fail after a successful evict on the same sequence
                    if not recall_next:
                        self.kv.update()  # the K-shift now, where Ctrl-C cannot stop it halfway
                    self.next_pos = int(keep.sum())
                self.policy.forget(view.cells[~keep])
                self._stream_index = self._stream_index[keep]
                self._recalled = self._recalled[keep]
                self.stats.n_evicted += int(out.sum())
                self.stats.evictions += 1
            if recall_next:
                try:
                    tier.recall_pages(upcoming=upcoming)
                finally:
                    self.kv.update()  # nothing to do if the recall re-positioned (and shifted) already

    # --- the recall tier's changes (its hooks are in RecallTier) -----------------------------
    def make_room(self) -> None:
        """Before a turn's recall: evict down to the budget less the reserve, its room."""
        self._evict(self.policy.budget, then_recall=False, make_room=True)

    def recall_turn(self) -> np.ndarray | None:
        """A turn's recall before answering (`RecallTier.before_answer`); None without a tier."""
        return self.tier.before_answer() if self.tier is not None else None

    def replace_recalled(
        self, drop: np.ndarray, sidx: np.ndarray, pos: np.ndarray, k: np.ndarray, v: np.ndarray, n_pages: int
    ) -> None:
        """Make new cells the recalled ones: evict the recalled cells `drop` marks, write the
        rows k, v (`KVCache.write_rows`' layout) of the cells at stream indices sidx at the
        positions they were stored at, and put every cell in stream order."""
        view = self.kv.cells(self.seq_id)
        with self._unit():
            self.kv.evict_cells(view.cells[drop], self.seq_id)
            # rows go back at the positions they were stored at: their own, without re-positioning
            cells = self.kv.write_rows(pos, k, v, self.seq_id)
            all_cells = np.concatenate([view.cells[~drop], cells])
            all_index = np.concatenate([self._stream_index[~drop], sidx])
            all_recalled = np.concatenate([self._recalled[~drop], np.ones(len(cells), bool)])
            order = np.argsort(all_index, kind="stable")
            if self.repositions:
                self.kv.arrange(all_cells[order], self.seq_id)
                self.kv.update()
                self.next_pos = len(order)
            self.policy.forget(view.cells[drop])
            self._stream_index = all_index[order]
            self._recalled = all_recalled[order]
            self.stats.recalls += 1
            self.stats.pages_recalled += n_pages

    def decode_again(self, first: int) -> None:
        """Decode the cached text from cached cell `first` on again at the same positions, the
        policy's state carried over by rank (recalled cells then sit in the context they are
        in).  Where a cell is part of an image, or positions are not compacted (a batch's must
        be consecutive), nothing is done.  A failed decode leaves the cells before it cached and
        counts the rest as evicted (the recalled ones stay in the store)."""
        keys = self._history_buf[self._stream_index[first:]]
        if not self.repositions or len(keys) == 0 or keys.min() < 0:
            return
        view = self.kv.cells(self.seq_id)
        state = self.policy.export_state(view.cells)
        no_logits = np.zeros(self.n_batch, np.int8)
        done = first
        with self._unit():
            try:
                if not self.kv.remove(self.seq_id, first, -1):
                    raise RuntimeError("the cache refused to remove the cells to decode again")
                for i in range(0, len(keys), self.n_batch):
                    piece = keys[i : i + self.n_batch]
                    pos = np.arange(done, done + len(piece))
                    self._batch_decode(self._piece(piece, pos, no_logits[: len(piece)], 0))
                    done += len(piece)
            except BaseException:
                self.kv.remove(self.seq_id, done, -1)
                self.policy.forget(view.cells[first:])  # cells decoded again start without scores
                self.stats.n_evicted += int((~self._recalled[done:]).sum())
                self._stream_index = self._stream_index[:done]
                self._recalled = self._recalled[:done]
                self.next_pos = done
                raise
            self.policy.forget(view.cells[first:])
            self.policy.import_state(state, self.kv.cells(self.seq_id).cells)

    def rollback(self, n_keep: int) -> bool:
        """Drop the stream's keys from index n_keep on, if all of them are still cached."""
        n_drop = self._n_history - n_keep
        if n_drop <= 0:
            return n_drop == 0
        if n_drop > self.n_cached or self._stream_index[self.n_cached - n_drop] != n_keep:
            return False
        self.before_change()
        first = self.n_cached - n_drop
        view = self.kv.cells(self.seq_id)
        first_pos = int(view.positions[first])  # == first, unless M-RoPE images came before
        with self._unit():
            if not self.kv.remove(self.seq_id, first_pos, -1):
                return False
            self.policy.forget(view.cells[first:])
            self._n_history = n_keep
            self._stream_index = self._stream_index[:first]
            self._recalled = self._recalled[:first]
            if self.tier is not None:
                self.tier.on_rollback(n_keep)
            self.next_pos = first_pos
            self.last_logits = None
        return True

    def common_prefix(self, keys: np.ndarray) -> int:
        """How many leading keys the stream already holds, never ending inside an image or at
        the very end (the last key is re-fed so that its logits exist)."""
        hist = self.history
        m = min(len(hist), len(keys))
        diverge = np.flatnonzero(hist[:m] != keys[:m])
        common = int(diverge[0]) if len(diverge) else m
        if common == len(keys):
            common -= 1
        while inside_image(keys, common):
            common -= 1  # an image is fed whole or not at all
        return common
