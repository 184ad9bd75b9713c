"""`Session`: one sequence of an engine's context.

A session is one endless stream (its history, its cells, its policy's state, its recall tier)
and the seed its next generation derives from.  It feeds prompts with as little work as
possible, makes a block of work atomic (`turn`), and saves and loads itself whole.  Callers
hold the engine's lock; `Llama` is the friendly face of a session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from infmllm_gguf.policies import KVPolicy
from infmllm_gguf.recall import Recall
from infmllm_gguf.sampling import Sampler, SamplingParams
from infmllm_gguf.state import LlamaState, StateError, pack, unpack
from infmllm_gguf.stream import Stream, inside_image
from infmllm_gguf.vision import ImagePart, Part, TextPart

if TYPE_CHECKING:
    from infmllm_gguf.engine import Engine

__all__ = ["HistoryDivergedError", "Session"]


class HistoryDivergedError(ValueError):
    """A prompt departs from the stream before the part of it that can still be taken back
    (with `restart_on_divergence=False`); nothing was changed."""

    def __init__(self, at: int, n_streamed: int, n_cached: int):
        self.at, self.n_streamed = at, n_streamed
        super().__init__(
            f"the prompt departs from this session's stream at key {at} of {n_streamed}, but the "
            f"stream's earlier part has been evicted (it caches {n_cached} keys), so it cannot be "
            "taken back: send the history as it was (extended), or start a new session"
        )


class Session:
    """Sequence seq_id of engine's context under its own policy (and recall tier)."""

    def __init__(self, engine: Engine, seq_id: int, policy: KVPolicy, recall: Recall | None, seed: int):
        self.engine, self.seq_id, self.policy, self.recall = engine, seq_id, policy, recall
        self.seed = seed
        # one caller at a time on this session, taken before the engine's lock: a caller
        # waiting for a step releases the engine's lock, never its session's
        self.lock = threading.RLock()
        # a prompt that departs from the stream where it can no longer be rolled back restarts
        # the stream (llama-cpp-python's behaviour); False raises HistoryDivergedError instead
        self.restart_on_divergence = True
        self.stream = Stream(
            engine.kv, engine.steps, policy, engine.n_ctx, engine.n_vocab, engine.n_embd_inp,
            engine.guard, engine.debug, seq_id=seq_id, recall=recall,
        )  # fmt: skip

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold this session's lock, then the engine's."""
        with self.lock, self.engine.hold():
            yield

    @contextlib.contextmanager
    def generating(self) -> Iterator[None]:
        """Hold the locks and be a member of the engine's steps: until the block ends, each step
        waits for this session's next piece, so that sessions generating at once share steps."""
        with self.locked(), self.engine.steps.member(self.seq_id):
            yield

    def close(self, free_cells: bool = True) -> None:
        """Free the session's buffers, and its cells unless the whole context goes with it."""
        if self.stream is not None:
            if free_cells:
                self.stream.reset()
            self.stream.close()
            self.stream = None

    # --- feeding ----------------------------------------------------------------------
    def feed_parts(self, parts: list[Part], encoded: dict[int, np.ndarray] | None = None) -> int:
        """Feed text and image parts in order (images encoded now unless given); returns cells fed.
        What cannot fit is refused before anything is fed."""
        stream, projector = self.stream, self.engine.projector
        n_positions = 0
        for part in parts:
            if isinstance(part, ImagePart):
                stream.check_image_fits(part.n_tokens, part.non_causal)
            n_positions += part.n_pos if isinstance(part, ImagePart) else len(part)
        stream.check_room(sum(len(p) for p in parts), n_positions)
        encoded = encoded or {}
        for part in parts:
            if isinstance(part, ImagePart):
                embd = encoded.get(id(part))
                if embd is None:
                    embd = projector.encode(part)
                mrope = (
                    (projector.mrope_positions(part, stream.next_pos), part.n_pos) if stream.mrope else None
                )
                stream.feed_embeddings(embd, part.key, part.non_causal, mrope)
            else:
                stream.feed(part.tokens)
        return sum(len(p) for p in parts)

    def continue_with(self, parts: list[Part]) -> int:
        """Make the stream equal the prompt's parts with as little work as possible: what the stream
        already holds (images included, matched by content) is not fed again; returns cells fed."""
        stream = self.stream
        keys = np.concatenate([p.keys() for p in parts])
        common = stream.common_prefix(keys)
        if not stream.rollback(common):
            if not self.restart_on_divergence:
                raise HistoryDivergedError(common, stream.n_streamed, stream.n_cached)
            stream.reset()
            common = 0
        todo, offset = [], 0
        for part in parts:
            if offset + len(part) > common:
                skip = max(0, common - offset)  # never inside an image (common_prefix)
                todo.append(TextPart(part.tokens[skip:]) if skip else part)
            offset += len(part)
        return self.feed_parts(todo)

    def rewind(self, n_streamed: int) -> bool:
        """Take back everything fed after the first n_streamed keys, while all of it is cached."""
        stream = self.stream
        if not isinstance(n_streamed, int) or not 0 <= n_streamed <= stream.n_streamed:
            raise ValueError(f"n_streamed must be an int in [0, {stream.n_streamed}], got {n_streamed!r}")
        if inside_image(stream.history, n_streamed):
            raise ValueError(
                f"n_streamed={n_streamed} falls inside an image: an image goes whole or not at all"
            )
        return stream.rollback(n_streamed)

    # --- generating ---------------------------------------------------------------------
    def sampler(self, params: SamplingParams, last_n_tokens: int) -> Sampler:
        """The sampler chain of one generation; made before the prompt is fed, so that a bad
        parameter changes nothing.  A call without its own seed derives it from the session's."""
        seed = params.seed if params.seed is not None else random.Random(self.seed).randint(0, 2**32)
        sampler = Sampler(params, self.engine.vocab, self.engine.n_vocab, seed, last_n_tokens)
        self.seed = seed
        return sampler

    def begin(self, parts: list[Part], sampler: Sampler, seed: int) -> None:
        """Feed the prompt a generation continues from; if that fails, the sampler is closed and
        the seed is `seed` again (what it was before the sampler was made)."""
        try:
            self.continue_with(parts)
        except BaseException:
            sampler.close()
            self.seed = seed
            raise

    @contextlib.contextmanager
    def turn(self, poll: Callable[[], None] | None = None) -> Iterator[None]:
        """One atomic step: if the block raises, the session becomes exactly what it was (its
        seed too); poll() runs between prompt pieces and before each token (see Llama.turn)."""
        stream = self.stream
        seed, previous = self.seed, stream.poll
        stream.poll = poll
        try:
            with stream.transaction():
                yield
        except BaseException:
            self.seed = seed
            raise
        finally:
            stream.poll = previous

    # --- saving and loading ---------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What a saved state must match to be loaded here (as JSON gives it back)."""
        recall = None if self.recall is None else repr(dataclasses.replace(self.recall, spill_dir=None))
        facts = {
            "model": self.engine.describe(),
            "policy": repr(self.policy),
            "recall": recall,
            "n_ctx": self.engine.n_ctx,
        }
        return json.loads(json.dumps(facts))

    def save_state(self) -> LlamaState:
        """The session as bytes: read under the engine's lock, packed under the session's only,
        so that the other sessions decode meanwhile."""
        with self.lock:
            with self.engine.hold():
                facts, arrays = self.stream.export_state()
                head = {"session": self.fingerprint(), "stream": facts, "seed": self.seed}
                counts = self.stream.n_streamed, self.stream.n_cached, self.seed
            return LlamaState(pack(head, arrays), *counts)

    def load_state(self, state: LlamaState | bytes) -> None:
        """Become the saved session; StateError (and no change) where it does not fit here.
        The bytes are unpacked before the locks are taken."""
        data = state.data if isinstance(state, LlamaState) else state
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise StateError(f"load_state takes a LlamaState or its bytes, got {type(state).__name__}")
        facts, arrays = unpack(bytes(data))
        with self.locked():
            self._load(facts, arrays)

    def _load(self, facts: dict, arrays: dict[str, np.ndarray]) -> None:
        mine, saved = self.fingerprint(), facts.get("session")
        if not isinstance(saved, dict) or not isinstance(facts.get("stream"), dict):
            raise StateError("the saved session lacks its description")
        differ = [
            f"{key}: saved {saved.get(key)!r}, here {mine[key]!r}"
            for key in mine
            if saved.get(key) != mine[key]
        ]
        if differ:
            raise StateError("the session was saved for another setup; " + "; ".join(differ))
        seed = facts.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise StateError("the saved session's seed is not an integer")
        backup = self.stream.export_state()
        try:
            self.stream.import_state(facts["stream"], arrays)
        except BaseException as exc:
            self.stream.import_state(*backup)
            if isinstance(exc, (ValueError, KeyError, TypeError)):
                raise StateError(f"the saved session does not load here: {exc}") from exc
            raise
        self.seed = seed

    # --- introspection ---------------------------------------------------------------------
    def kv_stats(self) -> dict[str, Any]:
        st = self.stream
        stats = {
            "policy": self.policy.name,
            "budget": self.policy.budget if self.policy.evicts else self.engine.n_ctx,
            "capacity": st.capacity,
            "n_ctx": self.engine.n_ctx,
            "n_cached": st.n_cached,
            "n_streamed": st.n_streamed,
            "n_evicted": st.stats.n_evicted,
            "evictions": st.stats.evictions,
            "max_pos": st.next_pos - 1,
            "max_pos_seen": st.stats.max_pos_seen,
            "images": st.stats.images,
            "n_image_cells": st.n_image_cells,
        }
        tier = st.tier
        if tier is not None:
            stats.update(
                recall_reserve=tier.reserve,
                n_recalled=st.n_recalled,
                pages_stored=tier.store.n_pages,
                store_mb=tier.store.nbytes / 2**20,
                spilled_mb=tier.store.spilled_bytes / 2**20,
                pages_dropped=tier.store.stats.pages_dropped,
                pages_spilled=tier.store.stats.pages_spilled,
                recalls=st.stats.recalls,
                pages_recalled=st.stats.pages_recalled,
                recall_error=tier.error,
            )
        return stats
