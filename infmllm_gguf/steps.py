"""`StepLoop`: every decode of an engine's sessions, batched across the sessions decoding at once.

A session's stream hands each decode to the loop as a `Piece` (one sequence's tokens or image
embeddings, their positions, the rows whose logits it needs, the scoring it needs) and gets it
back decoded, with its logits rows and, where scored, its cells' scores.  Pieces of several
sessions waiting at the same time are decoded together, one `llama_decode` holding a piece of
each sequence, as llama-server's continuous batching does; a session decoding alone (the
library) has its piece decoded at once, a step of one.

Threads: every caller holds the engine's lock, taken through `hold`.  While a piece waits for
the others, the lock is released (a Condition on it), so the other sessions can sample, evict
and hand in theirs.  A step starts when every *member* (a session inside a generation, which
will come back with its next token) has a piece in, except members on the caller's own thread
(they cannot come back before it returns), and no thread is waiting in `hold` (a request about
to join: it gets the lock first, and its piece makes the next step); whoever completes the set
decodes the step for all.

A step decodes the sessions' generated tokens in one call, and each longer piece (a prompt's
chunk, an image) in a call of its own, as it would be decoded alone: llama.cpp splits a call's
sequences into ubatches of equal rows per sequence, and a prompt split otherwise would be
computed with other rounding.  Tokens that need different scoring modes go in separate calls,
since scoring is a setting of the whole context; a token that needs no scores now, but whose
policy reads scores only through `observe`, rides along with the scored ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from infmllm_gguf._llama_cpp import llama_cpp as lc
from infmllm_gguf.kv import Batch, CellView, KVCache

__all__ = ["Piece", "StepLoop", "StepStats"]

# a step never waits longer than this for a member that has not come back (a safety net: a
# member holds the engine's lock while it works, so it is back before the lock is free)
GATHER_TIMEOUT_S = 0.5


@dataclass(eq=False)
class Piece:
    """One sequence's part of a step: what to decode, then what the decode gave back."""

    seq_id: int
    inputs: np.ndarray  # token ids (n,) or embeddings (n, n_embd)
    positions: np.ndarray  # (n,), or (n_pos, n) for M-RoPE embeddings
    flags: np.ndarray  # int8 (n,): 1 where the row's logits are wanted
    scoring: int = 0  # the scoring mode this decode needs (0: none)
    tolerates: int = 0  # a mode this sequence may be decoded under when it needs none
    batch: Batch | None = None  # embeddings: the sequence's own batch, decoded alone
    non_causal: bool = False  # embeddings attending non-causally (an image)
    # what the decode gave back
    status: int = 0  # llama_decode's status (0: decoded)
    logits: np.ndarray | None = None  # (rows flagged, n_vocab)
    view: CellView | None = None  # the sequence's cells right after a scored decode
    scored_rows: int = 0  # the query rows behind view's scores
    error: BaseException | None = None  # the step failed before decoding this piece
    done: bool = False
    thread: int = 0
    submitted: float = 0.0

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class StepStats:
    """Counters of the loop, as /metrics reports them."""

    steps: int = 0
    decodes: int = 0  # llama_decode calls (a step makes more than one where it cannot merge)
    pieces: int = 0  # sequences decoded, summed over steps (pieces / steps: the batch size)
    tokens: int = 0
    wait_seconds: float = 0.0  # time pieces waited for their step, summed
    decode_seconds: float = 0.0  # time in llama_decode
    timeouts: int = 0  # steps started without a member that did not come back in time
    sizes: dict[int, int] = field(default_factory=dict)  # steps by the number of sequences


class StepLoop:
    """The decodes of one context's sequences; see the module's docstring."""

    def __init__(
        self, ctx: int, kv: KVCache, lock: threading.RLock, n_batch: int, n_vocab: int, prefill_chunk: int
    ):
        self.ctx, self.kv, self.n_batch, self.n_vocab = ctx, kv, n_batch, n_vocab
        self.prefill_chunk = min(prefill_chunk, n_batch)
        self._lock = lock
        self._cond = threading.Condition(lock)
        self._wanting = 0  # threads waiting in hold()
        self._want_mutex = threading.Lock()
        self._pending: list[Piece] = []
        self._members: dict[int, int] = {}  # seq_id -> the thread generating in it
        self._batch = Batch(n_batch)
        self._scoring = kv.scoring
        self.stats = StepStats()

    def close(self) -> None:
        self._batch.close()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the engine's lock; a step that is gathering pieces lets this thread in first."""
        with self._want_mutex:
            self._wanting += 1
        try:
            self._lock.acquire()
        finally:
            with self._want_mutex:
                self._wanting -= 1
        try:
            yield
        finally:
            self._cond.notify_all()  # a step may have waited for this thread
            self._lock.release()

    @contextlib.contextmanager
    def member(self, seq_id: int) -> Iterator[None]:
        """Mark seq_id as generating: until the block ends, steps wait for its pieces."""
        with self._cond:
            self._members[seq_id] = threading.get_ident()
        try:
            yield
        finally:
            with self._cond:
                self._members.pop(seq_id, None)
                self._cond.notify_all()

    def piece_limit(self) -> int:
        """The most prompt tokens a sequence hands to one step: n_batch alone, `prefill_chunk`
        while other sequences generate (their next tokens wait for the step)."""
        return self.n_batch if len(self._members) <= 1 else self.prefill_chunk

    def decode(self, piece: Piece) -> Piece:
        """Decode piece in the next step, with whatever else is handed in by then; the caller
        holds the engine's lock.  Raises what failed the step before the piece was decoded;
        a decode that failed is reported in `status`."""
        with self._cond:
            piece.thread, piece.submitted = threading.get_ident(), time.perf_counter()
            self._pending.append(piece)
            deadline = piece.submitted + GATHER_TIMEOUT_S
            while not piece.done:
                now = time.perf_counter()
                if self._ready():
                    self._step()
                elif now >= deadline:
                    self.stats.timeouts += 1
                    self._step()
                else:
                    self._cond.wait(deadline - now)
        if piece.error is not None:
            raise piece.error
        return piece

    def _ready(self) -> bool:
        if self._wanting:
            return False
        me = threading.get_ident()
        waiting = {p.seq_id for p in self._pending}
        return all(seq in waiting or thread == me for seq, thread in self._members.items())

    def _step(self) -> None:
        pieces = sorted(self._pending, key=lambda p: p.seq_id)  # runs of sequences share ubatches
        self._pending = []
        started = time.perf_counter()
        stats = self.stats
        stats.steps += 1
        stats.pieces += len(pieces)
        stats.sizes[len(pieces)] = stats.sizes.get(len(pieces), 0) + 1
        try:
            calls = self._calls(pieces)
            for i, (call, mode) in enumerate(calls):
                self._decode_call(call, mode, last=i == len(calls) - 1)
        except BaseException as exc:  # noqa: BLE001 - handed to every piece's owner
            for p in pieces:
                if not p.done:
                    p.error = exc
        finally:
            for p in pieces:
                stats.wait_seconds += started - p.submitted
                stats.tokens += len(p)
                p.done = True
            self._cond.notify_all()

    def _calls(self, pieces: list[Piece]) -> list[tuple[list[Piece], int]]:
        """The llama_decode calls of a step, (pieces, scoring mode) each: the one-token pieces
        (generated tokens) together, one call per scoring mode; every longer piece (a prompt's,
        an image's) in a call of its own, so that llama.cpp splits it into the ubatches it
        would alone, and its numbers are those of the same piece decoded alone."""
        single = [p for p in pieces if p.batch is None and len(p) == 1]
        modes = {p.scoring for p in single if p.scoring}
        for p in single:
            if not p.scoring and p.tolerates in modes:
                p.scoring = p.tolerates  # its scores are read only where it asks for them
        calls = []
        for mode in sorted({p.scoring for p in single}):
            group = [p for p in single if p.scoring == mode]
            calls += [(group[i : i + self.n_batch], mode) for i in range(0, len(group), self.n_batch)]
        return calls + [([p], p.scoring) for p in pieces if p.batch is not None or len(p) > 1]

    def _decode_call(self, pieces: list[Piece], mode: int, last: bool) -> None:
        if mode != self._scoring:
            self.kv.set_scoring(mode)
            self._scoring = mode
        self.stats.decodes += 1
        started = time.perf_counter()
        if len(pieces) == 1:
            p = pieces[0]
            batch = p.batch or self._batch
            if p.non_causal:
                lc.llama_set_causal_attn(self.ctx, False)
            try:
                rc = batch.decode(self.ctx, p.inputs, p.positions, p.seq_id, p.flags)
            finally:
                if p.non_causal:
                    lc.llama_set_causal_attn(self.ctx, True)
        else:
            rc = self._batch.decode(
                self.ctx,
                np.concatenate([p.inputs for p in pieces]),
                np.concatenate([p.positions for p in pieces]),
                np.repeat([p.seq_id for p in pieces], [len(p) for p in pieces]),
                np.concatenate([p.flags for p in pieces]),
            )
        self.stats.decode_seconds += time.perf_counter() - started
        me = threading.get_ident()
        outputs = [int(p.flags.sum()) for p in pieces]  # rows of logits each piece asked for
        n_out = sum(outputs)
        rows = None
        if rc == 0 and n_out:
            ptr = lc.llama_get_logits(self.ctx)
            rows = np.ctypeslib.as_array(
                ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_out, self.n_vocab)
            )
        first = 0
        for p, k in zip(pieces, outputs):
            p.status = rc
            if rc != 0:
                p.done = True
                continue
            if rows is not None and k:
                # the caller reads its own piece before anything decodes after the step's last
                # call; every other piece's rows are copied out of llama.cpp's buffer
                own = last and p.thread == me
                p.logits = rows[first : first + k] if own else rows[first : first + k].copy()
            first += k
            if p.scoring:
                p.view = self.kv.cells(p.seq_id)
                p.scored_rows = self.kv.scored_rows(p.seq_id)
            p.done = True
