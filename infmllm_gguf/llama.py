"""`Llama`: llama-cpp-python's familiar surface over one endless stream in a bounded KV cache.

The session is a single stream of tokens (sequence 0).  Every token ever fed is in
`history`; the cache holds at most the policy's budget + chunk of them, at compacted
positions 0..n-1, so positions never reach n_ctx however long the stream runs.

What changes compared with llama-cpp-python:
  - prompts longer than the cache stream through it with eviction instead of failing;
  - prefix reuse: a prompt that extends the stream (e.g. a chat history with one more
    message) only feeds the new tokens, even after evictions; a prompt that diverges
    within the cached tail rolls the tail back; anything else restarts the stream;
  - generated tokens, end-of-turn included, become part of the stream.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import functools
import json
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from tqdm import tqdm

from infmllm_gguf import _native
from infmllm_gguf._llama_cpp import llama_chat_format
from infmllm_gguf._llama_cpp import llama_cpp as lc
from infmllm_gguf._llama_cpp._internals import LlamaModel
from infmllm_gguf._llama_cpp._logger import set_verbose
from infmllm_gguf._llama_cpp.llama_chat_format import (
    ChatFormatter,
    Jinja2ChatFormatter,
    _convert_text_completion_logprobs_to_chat,
)
from infmllm_gguf.embeddings import Embedder
from infmllm_gguf.interrupts import InterruptGuard
from infmllm_gguf.kv import KVCache, NativeError
from infmllm_gguf.models import default_model_path
from infmllm_gguf.params import ContextOptions, ModelOptions, check_int
from infmllm_gguf.policies import FullCache, KVPolicy, make_policy
from infmllm_gguf.recall import Recall
from infmllm_gguf.sampling import (
    LlamaGrammar,
    LogitsProcessor,
    Sampler,
    SamplingParams,
    grammar_for_response_format,
    log_softmax,
    top_logprobs,
)
from infmllm_gguf.state import LlamaState, StateError, pack, read_file, unpack, write_file
from infmllm_gguf.stops import StopMatcher
from infmllm_gguf.stream import ContextFullError, InvariantError, StopGeneration, Stream, inside_image
from infmllm_gguf.system import physical_cores
from infmllm_gguf.video import expected_frames, frames_of, time_marker
from infmllm_gguf.vision import ImageLike, ImagePart, Part, Projector, TextPart, flatten_messages

__all__ = ["ContextFullError", "HistoryDivergedError", "InvariantError", "Llama", "StopGeneration"]

# llama-cpp-python's named chat formats ("chatml", "llama-2", ...): each registered name whose
# formatter function (format_chatml, format_llama2, ...) the vendored module has
CHAT_FORMATS: dict[str, ChatFormatter] = {
    name: formatter
    for name in llama_chat_format.LlamaChatCompletionHandlerRegistry()._chat_handlers
    for fname, formatter in vars(llama_chat_format).items()
    if fname.startswith("format_") and fname[7:].replace("_", "") == name.replace("-", "").replace("_", "")
}

# (input_ids, logits) -> True to stop before the sampled token, as llama-cpp-python's StoppingCriteria
StoppingCriterion = Callable[[np.ndarray, np.ndarray], bool]


def _locked(method):
    """Serialise a public method on the session's lock: one stream, one caller at a time."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


@dataclass
class _TokenLogprob:
    """One generated token's log-probabilities: chars [start, end) of the generated text."""

    text: str
    start: int
    end: int
    logprob: float
    top: dict[str, float]


@dataclass
class _Step:
    """A piece of generated text, the finish reason once there is one, and the tokens
    (with log-probs, when asked for) whose text the pieces handed out so far complete."""

    text: str
    finish: str | None
    tokens: list[_TokenLogprob]


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


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (magic {magic!r})")


class Llama:
    """A GGUF model with one endless stream and a bounded, policy-managed KV cache.

    Every native state change (decode, evict, compact, roll back) and its Python bookkeeping
    happen as one unit: an exception or Ctrl-C leaves the cache holding exactly the tokens
    the stream records.  Public methods serialise on a lock, so sharing one `Llama` between
    threads queues the callers instead of interleaving their tokens.  `debug=True` checks
    the cache invariants after every such unit (`check_invariants`).
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        kv_policy: KVPolicy | str | None = None,
        recall: Recall | None = None,
        mmproj_path: str | os.PathLike | None = None,
        # model parameters, as llama-cpp-python names them
        n_gpu_layers: int | None = None,
        split_mode: int = lc.LLAMA_SPLIT_MODE_LAYER,
        main_gpu: int = 0,
        tensor_split: list[float] | None = None,
        use_mmap: bool = True,
        use_mlock: bool = False,
        # context parameters
        seed: int = lc.LLAMA_DEFAULT_SEED,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_ubatch: int = 512,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        rope_freq_base: float = 0.0,
        rope_freq_scale: float = 0.0,
        logits_all: bool = False,
        embedding: bool = False,
        pooling_type: int = lc.LLAMA_POOLING_TYPE_UNSPECIFIED,
        offload_kqv: bool = True,
        flash_attn: bool = False,
        swa_full: bool | None = None,
        last_n_tokens_size: int = 64,
        chat_format: str | None = None,
        type_k: int | str | None = None,
        type_v: int | str | None = None,
        n_slots: int = 1,
        verbose: bool = False,
        debug: bool = False,
    ):
        """Load a GGUF model (None: the embedded SmolLM2-135M) with one stream managed by
        `kv_policy` (a policy or its name; a name gets budget min(1024, n_ctx // 2)).

        The other arguments are llama-cpp-python's, with its meanings; n_ctx 0 takes the
        model's training context; `logits_all` is accepted but not needed (log-probs come from
        each step's logits); `chat_format` names one of llama-cpp-python's formats instead of
        the GGUF's own template; type_k/type_v also take ggml's names ("q8_0"); `embedding`
        gives `embed()` a context of its own beside the stream's; `n_slots` > 1 makes room for
        that many independent streams in one context (see `slot`)."""
        check_int("n_ctx", n_ctx, 0)
        if 0 < n_ctx < 16:
            raise ValueError(f"n_ctx must be 0 (the model's training context) or >= 16, got {n_ctx}")
        model_options = ModelOptions(n_gpu_layers, split_mode, main_gpu, tensor_split, use_mmap, use_mlock)
        context_options = ContextOptions(
            n_ctx, n_batch, n_ubatch, n_threads, n_threads_batch, flash_attn, type_k, type_v,
            rope_freq_base, rope_freq_scale, offload_kqv, n_slots, swa_full,
        )  # fmt: skip
        check_int("seed", seed)
        check_int("last_n_tokens_size", last_n_tokens_size, -1)  # -1: the whole generation
        check_int("pooling_type", pooling_type, lc.LLAMA_POOLING_TYPE_UNSPECIFIED)
        if chat_format is not None and chat_format not in CHAT_FORMATS:
            raise ValueError(f"unknown chat_format {chat_format!r}; known: {', '.join(sorted(CHAT_FORMATS))}")
        if n_ctx:
            policy = _stream_policy(kv_policy, context_options, recall)
        self.recall = recall
        self.logits_all = logits_all
        self.chat_format = chat_format
        self.verbose = verbose
        self.debug = debug
        # a prompt that departs from the stream where it can no longer be rolled back restarts
        # the stream (llama-cpp-python's behaviour); False raises HistoryDivergedError instead
        self.restart_on_divergence = True
        self._lock = threading.RLock()
        self._guard = InterruptGuard()
        self._parent: Llama | None = None  # the Llama whose context a slot shares
        self._slots: dict[int, Llama] = {}
        self.n_slots = n_slots
        self.model_path = Path(model_path) if model_path is not None else default_model_path()
        _check_gguf(self.model_path)

        set_verbose(verbose)
        lc.llama_backend_init()
        params, keep_alive = model_options.to_params()
        try:
            self._model = LlamaModel(path_model=str(self.model_path), params=params, verbose=verbose)
        except ValueError as exc:
            raise ValueError(f"could not load {self.model_path} (truncated or corrupt GGUF?): {exc}") from exc
        del keep_alive
        if not n_ctx:
            context_options.n_ctx = self._model.n_ctx_train()
            try:
                policy = _stream_policy(kv_policy, context_options, recall)
            except ValueError:
                self.close()
                raise
        self.policy = policy
        self._n_ctx = context_options.n_ctx
        self.vocab = self._model.vocab
        self._n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        try:
            self._check_architecture()
        except ValueError:
            self.close()
            raise

        cparams = context_options.to_params(physical_cores())
        self._ctx = lc.llama_init_from_model(self._model.model, cparams)
        if not self._ctx:
            self.close()
            raise RuntimeError(
                "llama_init_from_model failed (out of memory, or a K/V type this backend lacks?)"
            )
        # Ctrl-C stops a running decode between graph nodes (see interrupts.py)
        _native.llama_set_abort_callback(
            self._ctx, _native.infmllm_abort_on_fd_address(), ctypes.byref(self._guard.abort_fd)
        )
        if lc.llama_n_ctx_seq(self._ctx) < self._n_ctx:
            got = lc.llama_n_ctx_seq(self._ctx)
            self.close()
            raise RuntimeError(f"llama.cpp gave each sequence {got} cells, not n_ctx = {self._n_ctx}")
        self.n_batch = lc.llama_n_batch(self._ctx)
        self.n_ubatch = lc.llama_n_ubatch(self._ctx)
        self.kv = KVCache(self._ctx)
        if not isinstance(policy, FullCache):
            # checked once here, before any token: every evicting policy needs a cache whose keys
            # can be re-rotated (compaction), and scoring needs the same, so probe with scoring on;
            # then start off: _decode turns scoring on for the decodes the policy ranks by
            try:
                self.kv.set_scoring(1)
            except NativeError as exc:
                self.close()
                name = type(policy).__name__
                raise ValueError(f"{name} cannot evict in this model's cache: {exc}") from exc
            self.kv.set_scoring(0)
        n_embd = lc.llama_model_n_embd_inp(self._model.model)
        try:
            self._stream = self._make_stream(policy, seq_id=0)
        except ValueError:
            self.close()
            raise
        self._projector: Projector | None = None
        if mmproj_path is not None:
            try:
                # the tower offloads like the layers (as llama.cpp's mtmd tools: unless told not to)
                self._projector = Projector(
                    mmproj_path, self._model.model, n_embd, cparams.n_threads, use_gpu=n_gpu_layers != 0
                )
            except BaseException:
                self.close()
                raise
        self._embedder: Embedder | None = None
        if embedding:
            try:
                self._embedder = Embedder(self._model, cparams, pooling_type, verbose)
            except BaseException:
                self.close()
                raise
        self._seed = seed
        self.last_n_tokens_size = last_n_tokens_size
        self._chat_formatter = self._make_chat_formatter()

    # --- model facts, as llama-cpp-python's accessors -----------------------------------
    def n_ctx(self) -> int:
        """Cells of the KV cache (the stream itself has no length limit under an evicting policy)."""
        return self._n_ctx

    def n_vocab(self) -> int:
        return self._n_vocab

    def n_embd(self) -> int:
        return lc.llama_model_n_embd(self._model.model)

    def token_bos(self) -> int:
        return lc.llama_vocab_bos(self.vocab)

    def token_eos(self) -> int:
        return lc.llama_vocab_eos(self.vocab)

    def token_nl(self) -> int:
        return lc.llama_vocab_nl(self.vocab)

    @property
    def metadata(self) -> dict[str, str]:
        """The GGUF's key/value metadata."""
        return self._model.metadata()

    def _check_architecture(self) -> None:
        if isinstance(self.policy, FullCache):
            return
        model = self._model.model
        rope = lc.llama_model_rope_type(model)
        if rope in (lc.LLAMA_ROPE_TYPE_MROPE, lc.LLAMA_ROPE_TYPE_IMROPE, lc.LLAMA_ROPE_TYPE_VISION):
            if self.policy.reposition:
                raise ValueError(
                    "this model uses M-RoPE, whose keys cannot be re-rotated to new positions: "
                    f"evict without re-positioning ({type(self.policy).__name__}(..., "
                    "reposition=False)) or use kv_policy='full'"
                )
            if self.recall is not None:
                raise ValueError(
                    "the recall tier writes stored keys back by 1-D position; this model uses "
                    "M-RoPE: stream without recall"
                )
        if lc.llama_model_is_recurrent(model) or lc.llama_model_is_hybrid(model):
            raise ValueError(
                "recurrent/hybrid models have no per-token KV cache to evict; use kv_policy='full'"
            )
        if lc.llama_model_n_swa(model) > 0 and self.recall is not None:
            raise ValueError(
                "this model uses sliding-window attention (an iSWA cache, as Gemma 2/3 and gpt-oss "
                "have); evicting policies serve it, the recall tier does not (it copies rows of a "
                "plain KV cache): stream without recall"
            )

    def _make_chat_formatter(self) -> ChatFormatter | None:
        if self.chat_format is not None:
            return CHAT_FORMATS[self.chat_format]
        template = self._model.metadata().get("tokenizer.chat_template")
        if not template:
            return None

        def piece(token: int) -> str:
            return self._piece(token, special=True).decode("utf-8", "ignore") if token >= 0 else ""

        return Jinja2ChatFormatter(
            template=template,
            eos_token=piece(lc.llama_vocab_eos(self.vocab)),
            bos_token=piece(lc.llama_vocab_bos(self.vocab)),
        )

    # --- sequence slots -------------------------------------------------------------------
    def slot(self, seq_id: int) -> Llama:
        """The session on sequence slot seq_id (0 is the Llama created): a stream of its own,
        with its own policy state, recall store and seed, in the same context (same weights, one
        cache buffer with a KV stream per slot).  All slots share one lock, so their calls run
        one at a time; `close()` on a slot frees its cells only."""
        owner = self._parent or self
        check_int("seq_id", seq_id, 0)
        if seq_id >= owner.n_slots:
            raise ValueError(f"seq_id must be below n_slots ({owner.n_slots}), got {seq_id}")
        if seq_id == 0:
            return owner
        slot = owner._slots.get(seq_id)  # made once: finding it never waits for a running call
        if slot is not None:
            return slot
        with owner._lock:
            if seq_id not in owner._slots:
                owner._slots[seq_id] = owner._new_slot(seq_id)
            return owner._slots[seq_id]

    def _new_slot(self, seq_id: int) -> Llama:
        slot = object.__new__(Llama)
        slot.__dict__.update(self.__dict__)  # the model, context, projector, embedder and lock
        slot._parent, slot._slots = self, {}
        slot.policy = copy.deepcopy(self.policy)
        slot._stream = self._make_stream(slot.policy, seq_id)
        return slot

    def _make_stream(self, policy: KVPolicy, seq_id: int) -> Stream:
        """The stream of one sequence slot, under its own copy of the policy."""
        n_embd = lc.llama_model_n_embd_inp(self._model.model)
        return Stream(
            self._ctx, policy, self._n_ctx, self._n_vocab, n_embd, self._guard, self.debug,
            seq_id=seq_id, recall=self.recall,
        )  # fmt: skip

    @property
    def seq_id(self) -> int:
        """The sequence slot this session streams in."""
        return self._stream.seq_id

    def close(self) -> None:
        if getattr(self, "_parent", None) is not None:  # a slot: its own stream only
            with self._parent._lock:
                if self._stream is not None:
                    self._parent._slots.pop(self._stream.seq_id, None)
                    self._stream.reset()
                    self._stream.close()
                    self._stream = None
            return
        for slot in list(getattr(self, "_slots", {}).values()):
            slot.close()
        if getattr(self, "_embedder", None) is not None:
            self._embedder.close()
            self._embedder = None
        if getattr(self, "_projector", None) is not None:
            self._projector.close()
            self._projector = None
        if getattr(self, "_guard", None) is not None:
            self._guard.close()
        if getattr(self, "_stream", None) is not None:
            self._stream.close()
            self._stream = None
        if getattr(self, "_ctx", None):
            lc.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None) is not None:
            self._model.close()
            self._model = None

    def __del__(self) -> None:
        self.close()

    # --- tokens -------------------------------------------------------------------
    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return self._model.tokenize(data, add_bos, special)

    def detokenize(self, tokens: list[int], special: bool = False) -> bytes:
        return self._model.detokenize(list(tokens), special)

    def _piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(128)
        n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[: max(n, 0)]

    def _token_ids(self, tokens: Iterable[Any]) -> list[int]:
        """tokens as a list of ids, each an int in [0, n_vocab); ValueError otherwise."""
        ids = list(tokens)
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self._n_vocab:
                raise ValueError(f"token ids must be integers in [0, {self._n_vocab}), got {t!r}")
        return [int(t) for t in ids]

    def _is_eog(self, token: int) -> bool:
        return bool(lc.llama_vocab_is_eog(self.vocab, token))

    # --- the stream -----------------------------------------------------------------
    @_locked
    def reset(self) -> None:
        """Start a new, empty stream."""
        self._stream.reset()

    @property
    def history(self) -> np.ndarray:
        """Every token fed to the stream so far (read-only); each image cell appears as a negative
        key derived from the image's content."""
        return self._stream.history

    @property
    def n_cached(self) -> int:
        return self._stream.n_cached

    @property
    def n_streamed(self) -> int:
        """Keys fed to the stream so far (tokens and image cells, cached or evicted)."""
        return self._stream.n_streamed

    @_locked
    def rewind(self, n_streamed: int) -> bool:
        """Take back everything fed after the stream's first n_streamed keys, e.g. a question
        asked aside that should not stay in the stream (a model copies earlier answers).

        Possible only while all of it is still cached: returns False and changes nothing once
        an eviction has taken part of it.  Feed something before generating again."""
        if not isinstance(n_streamed, int) or not 0 <= n_streamed <= self._stream.n_streamed:
            raise ValueError(
                f"n_streamed must be an int in [0, {self._stream.n_streamed}], got {n_streamed!r}"
            )
        if inside_image(self._stream.history, n_streamed):
            raise ValueError(
                f"n_streamed={n_streamed} falls inside an image: an image goes whole or not at all"
            )
        return self._stream.rollback(n_streamed)

    @contextlib.contextmanager
    def turn(self, poll: Callable[[], None] | None = None) -> Iterator[Llama]:
        """Make the block one atomic step of the session, e.g. a chat turn: if it raises (an error,
        Ctrl-C, a cancelled request), the session becomes exactly what it was before the block,
        evictions and recalls undone, its seed too.  The block holds the session's lock.

        `poll()` is called between the prompt's pieces (n_batch keys) and before each generated
        token: it may raise to abort the block, or raise StopGeneration to end the generation
        there (finish_reason "length").  A streamed completion must be consumed inside the block.
        Appending costs nothing; the first eviction, recall or roll-back in the block copies the
        session's state once (as save_state does, in memory)."""
        with self._lock:
            seed, previous = self._seed, self._stream.poll
            self._stream.poll = poll
            try:
                with self._stream.transaction():
                    yield self
            except BaseException:
                self._seed = seed
                raise
            finally:
                self._stream.poll = previous

    @_locked
    def eval(self, tokens: list[int] | np.ndarray) -> None:
        """Append tokens to the stream, evicting as the policy says."""
        self._stream.feed(np.asarray(tokens, np.int32))

    @_locked
    def feed(self, text: str, add_bos: bool | None = None) -> int:
        """Tokenise text (BOS only at the start of a stream) and append it; returns its token count."""
        tokens = self.tokenize(
            text, add_bos=self._stream.n_streamed == 0 if add_bos is None else add_bos, special=True
        )
        if not tokens:
            raise ValueError(f"text {text[:40]!r} tokenises to no tokens")
        self.eval(tokens)
        return len(tokens)

    @_locked
    def stream_logprobs(self, tokens: list[int] | np.ndarray) -> np.ndarray:
        """log p of each token given the stream before it (NaN for a stream's first token)."""
        return self._stream.feed(np.asarray(tokens, np.int32), logprobs=True)

    @_locked
    def feed_image(self, image: ImageLike, prompt: str | None = None) -> int:
        """Append prompt (if any) and then an image at the current position; returns the cells added.

        image: a path, encoded bytes, an H x W x 3 uint8 array or a PIL image.  The image is
        decoded whole, the cache evicting first to make room; an image larger than the budget,
        or one that cannot be read, raises before anything is fed."""
        projector = self._require_projector()
        parts = projector.tokenize((prompt or "") + projector.marker, [image], self._stream.n_streamed == 0)
        encoded = {id(p): projector.encode(p) for p in parts if isinstance(p, ImagePart)}
        return self._feed_parts(parts, encoded)

    @_locked
    def feed_video(
        self,
        source: str | os.PathLike | Iterable[Any],
        fps: float = 1.0,
        timestamps: bool = True,
        on_frame: Callable[[dict[str, Any]], None] | None = None,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Stream a video file (decoded frame by frame with PyAV) or an iterable of frames.

        Frames are sampled at `fps`; with `timestamps` each is preceded by its time marker
        (`[00:01:05]`).  on_frame(stats) runs after each frame.  Returns the run's stats."""
        self._require_projector()
        frames = frames_of(source, fps)  # an unreadable or empty video fails here
        st = self._stream.stats
        evictions_before, t0 = st.evictions, time.perf_counter()
        n_frames = n_cells = 0
        t = 0.0
        with tqdm(
            total=expected_frames(source, fps), unit="frame", desc="video", disable=not progress
        ) as bar:
            for t, frame in frames:
                n_cells += self.feed_image(frame, prompt=f"\n{time_marker(t)} " if timestamps else None)
                n_frames += 1
                info = {
                    "frame": n_frames,
                    "time": t,
                    "n_cached": self._stream.n_cached,
                    "evictions": st.evictions - evictions_before,
                    "seconds_per_frame": (time.perf_counter() - t0) / n_frames,
                }
                bar.update()
                bar.set_postfix(t=time_marker(t), cached=info["n_cached"], evictions=info["evictions"])
                if on_frame is not None:
                    on_frame(info)
        seconds = time.perf_counter() - t0
        return {
            "frames": n_frames,
            "video_seconds": t,
            "cells": n_cells,
            "seconds": seconds,
            "seconds_per_frame": seconds / n_frames,
            "evictions": st.evictions - evictions_before,
            "n_cached": self._stream.n_cached,
        }

    def _require_projector(self) -> Projector:
        if self._projector is None:
            raise ValueError("images need a projector: create the Llama with mmproj_path=...")
        return self._projector

    def _feed_parts(self, parts: list[Part], encoded: dict[int, np.ndarray] | None = None) -> int:
        """Feed text and image parts in order (images encoded now unless given); returns cells fed.
        What cannot fit is refused before anything is fed."""
        n_positions = 0
        for part in parts:
            if isinstance(part, ImagePart):
                self._stream.check_image_fits(part.n_tokens, part.non_causal)
            n_positions += part.n_pos if isinstance(part, ImagePart) else len(part)
        self._stream.check_room(sum(len(p) for p in parts), n_positions)
        encoded = encoded or {}
        for part in parts:
            if isinstance(part, ImagePart):
                embd = encoded.get(id(part))
                if embd is None:
                    embd = self._require_projector().encode(part)
                mrope = None
                if self._stream.mrope:
                    mrope = (self._projector.mrope_positions(part, self._stream.next_pos), part.n_pos)
                self._stream.feed_embeddings(embd, part.key, part.non_causal, mrope)
            else:
                self._stream.feed(part.tokens)
        return sum(len(p) for p in parts)

    def _continue_with(self, parts: list[Part]) -> int:
        """Make the stream equal the prompt's parts with as little work as possible: what the stream
        already holds (images included, matched by content) is not fed again; returns cells fed."""
        keys = np.concatenate([p.keys() for p in parts])
        common = self._stream.common_prefix(keys)
        if not self._stream.rollback(common):
            if not self.restart_on_divergence:
                raise HistoryDivergedError(common, self._stream.n_streamed, self._stream.n_cached)
            self._stream.reset()
            common = 0
        todo, offset = [], 0
        for part in parts:
            if offset + len(part) > common:
                skip = max(0, common - offset)  # never inside an image (common_prefix)
                todo.append(TextPart(part.tokens[skip:]) if skip else part)
            offset += len(part)
        return self._feed_parts(todo)

    # --- generation -------------------------------------------------------------------
    def set_seed(self, seed: int) -> None:
        """Seed the next generation's sampler.  A call without its own seed derives the next
        seed from this one, as llama-cpp-python does, so a session's samples are reproducible."""
        check_int("seed", seed)
        self._seed = seed

    @_locked
    def _sampler(self, params: SamplingParams) -> Sampler:
        """The sampler chain of one generation; built before the prompt is fed, so that a bad
        parameter (a grammar that does not parse, an unknown token in logit_bias) changes nothing."""
        seed = params.seed if params.seed is not None else random.Random(self._seed).randint(0, 2**32)
        sampler = Sampler(params, self.vocab, self._n_vocab, seed, self.last_n_tokens_size)
        self._seed = seed
        return sampler

    def _generate(
        self,
        sampler: Sampler,
        max_tokens: int,
        stops: list[str],
        n_logprobs: int | None = None,
        criteria: Sequence[StoppingCriterion] = (),
    ) -> Iterator[_Step]:
        """Continue the stream, one step per piece of text; the sampler is closed at the end.

        Text that could still become a stop string is held back until it cannot, so the
        pieces joined are exactly the generated text cut at the first stop string; a token's
        log-probs come with the step whose text completes it, and tokens past a stop string
        are not reported."""
        try:
            if self._stream.last_logits is None:
                raise ValueError("nothing to continue from: feed text first")
            self._stream.recall_turn()
            matcher = StopMatcher(stops)
            records: list[_TokenLogprob] = []
            released = 0

            def step(text: str, finish: str | None) -> _Step:
                nonlocal released
                start = released
                while released < len(records) and records[released].end <= matcher.emitted:
                    released += 1
                return _Step(text, finish, records[start:released])

            pending, n_chars = b"", 0
            for _ in range(max_tokens):
                if self._stream.poll is not None:
                    try:
                        self._stream.poll()
                    except StopGeneration:
                        break  # ends as "length", like max_tokens
                logits = self._stream.last_logits
                token = sampler.sample(logits, self._stream.history)
                if any(criterion(self._stream.history, logits) for criterion in criteria):
                    yield step(matcher.flush(), "stop")
                    return
                self._stream.feed(np.array([token], np.int32))
                if self._is_eog(token):
                    yield step(matcher.flush(), "stop")
                    return
                raw = self._piece(token)
                pending += raw
                try:
                    piece = pending.decode("utf-8")
                    pending = b""
                except UnicodeDecodeError:
                    piece = ""  # the rest of a multi-byte character is still to come
                start, n_chars = n_chars, n_chars + len(piece)
                if n_logprobs is not None:
                    records.append(self._token_logprob(token, raw, logits, n_logprobs, start, n_chars))
                if not piece:
                    continue
                safe, hit = matcher.push(piece)
                if hit:
                    yield step(safe, "stop")
                    return
                if safe:
                    yield step(safe, None)
            yield step(matcher.flush(), "length")
        finally:
            sampler.close()

    def _token_logprob(
        self, token: int, raw: bytes, logits: np.ndarray, n: int, start: int, end: int
    ) -> _TokenLogprob:
        """log p of the sampled token and of the n likeliest, from the raw logits (before any
        penalty, bias or grammar), as llama-cpp-python reports them."""
        logprobs = log_softmax(logits)
        text = raw.decode("utf-8", "ignore")
        top = {
            self._piece(t).decode("utf-8", "ignore"): float(logprobs[t]) for t in top_logprobs(logprobs, n)
        }
        top[text] = float(logprobs[token])
        return _TokenLogprob(text, start, end, float(logprobs[token]), top)

    @_locked
    def generate_text(
        self,
        max_tokens: int | None = 128,
        temperature: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        **sampling: Any,
    ) -> str:
        """Continue the stream and return the generated text; `sampling` takes the other
        `SamplingParams` fields (penalties, grammar, logit_bias, logits_processor, ...)."""
        params = SamplingParams(temperature, top_k, top_p, min_p, seed=seed, **sampling)
        limit = self._n_ctx if max_tokens is None else max_tokens
        if not isinstance(limit, int) or limit < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        return "".join(s.text for s in self._generate(self._sampler(params), limit, _stops(stop)))

    @_locked
    def ask(self, question: str, max_tokens: int = 64, temperature: float = 0.0) -> str:
        """Append a user turn (the model's chat template) to the stream and answer it.

        The answer, end-of-turn included, stays in the stream, which goes on afterwards."""
        if self._chat_formatter is None:
            self.feed(f"\nQuestion: {question}\nAnswer:", add_bos=False)
            return self.generate_text(max_tokens, temperature=temperature, stop="\n").strip()
        rendered = self._chat_formatter(messages=[{"role": "user", "content": question}])
        self.feed(rendered.prompt, add_bos=False)
        return self.generate_text(max_tokens, temperature=temperature).strip()

    # --- llama-cpp-python surface -------------------------------------------------------
    def create_completion(
        self,
        prompt: str | list[int],
        suffix: str | None = None,
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        logprobs: int | None = None,
        echo: bool = False,
        stop: str | list[str] | None = None,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: int | None = None,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: str | None = None,
        stopping_criteria: StoppingCriterion | Iterable[StoppingCriterion] | None = None,
        logits_processor: list[LogitsProcessor] | None = None,
        grammar: LlamaGrammar | str | None = None,
        logit_bias: dict[int, float] | None = None,
    ) -> dict | Iterator[dict]:
        """llama-cpp-python's completion.  The prompt continues the stream where it extends it
        (see the module's docstring); max_tokens None or <= 0 means up to n_ctx tokens; `logprobs`
        (the number of alternatives per token) needs no logits_all; `tfs_z` is accepted and
        ignored, as llama.cpp no longer has tail-free sampling."""
        if suffix is not None:
            raise ValueError("suffix (fill-in-the-middle) is not supported: a stream only grows at its end")
        if echo and logprobs is not None:
            raise ValueError(
                "echo with logprobs is not supported: the prompt's earlier tokens may be evicted; "
                "stream_logprobs() gives log p of fed tokens"
            )
        if isinstance(prompt, str):
            tokens = self.tokenize(prompt, add_bos=True, special=True)
        else:
            tokens = self._token_ids(prompt)
        if not tokens:
            raise ValueError("the prompt tokenises to no tokens")
        params = SamplingParams(
            temperature, top_k, top_p, min_p, typical_p, repeat_penalty, frequency_penalty, presence_penalty,
            mirostat_mode, mirostat_tau, mirostat_eta, logit_bias, grammar, logits_processor, seed,
        )  # fmt: skip
        return self._completion(
            [TextPart(np.asarray(tokens, np.int32))],
            max_tokens,
            params,
            _stops(stop),
            stream,
            prefix=prompt if (echo and isinstance(prompt, str)) else "",
            n_logprobs=logprobs,
            text_offset=len(prompt) if isinstance(prompt, str) else 0,
            stopping_criteria=stopping_criteria,
            model=model,
        )

    __call__ = create_completion

    def _completion(
        self,
        parts: list[Part],
        max_tokens: int | None,
        params: SamplingParams,
        stops: list[str],
        stream: bool,
        *,
        prefix: str = "",
        n_logprobs: int | None = None,
        text_offset: int = 0,
        stopping_criteria: StoppingCriterion | Iterable[StoppingCriterion] | None = None,
        model: str | None = None,
    ) -> dict | Iterator[dict]:
        # everything is checked before the prompt is fed
        if max_tokens is None or (isinstance(max_tokens, int) and max_tokens <= 0):
            max_tokens = self._n_ctx  # llama-cpp-python's "until the context is full"
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise ValueError(f"max_tokens must be an integer or None, got {max_tokens!r}")
        if n_logprobs is not None and (
            isinstance(n_logprobs, bool)
            or not isinstance(n_logprobs, int)
            or not 0 <= n_logprobs <= self._n_vocab
        ):
            raise ValueError(f"logprobs must be an integer in [0, {self._n_vocab}], got {n_logprobs!r}")
        criteria = _criteria(stopping_criteria)
        seed = self._seed
        sampler = self._sampler(params)
        head = {
            "id": f"cmpl-{uuid.uuid4()}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model or str(self.model_path),
        }

        def logprobs_of(tokens: list[_TokenLogprob]) -> dict | None:
            return None if n_logprobs is None else _completion_logprobs(tokens, text_offset)

        if stream:
            return self._stream_chunks(
                sampler, seed, parts, max_tokens, stops, head, prefix, n_logprobs, logprobs_of, criteria
            )
        n_prompt = sum(len(p) for p in parts)
        with self._lock:
            self._begin(parts, sampler, seed)
            n_before = self._stream.n_streamed
            pieces, tokens, finish = [], [], "length"
            for step in self._generate(sampler, max_tokens, stops, n_logprobs, criteria):
                pieces.append(step.text)
                tokens += step.tokens
                finish = step.finish or finish
            n_gen = self._stream.n_streamed - n_before
        text = prefix + "".join(pieces)
        return {
            **head,
            "choices": [{"text": text, "index": 0, "logprobs": logprobs_of(tokens), "finish_reason": finish}],
            "usage": {
                "prompt_tokens": n_prompt,
                "completion_tokens": n_gen,
                "total_tokens": n_prompt + n_gen,
            },
        }

    def _begin(self, parts: list[Part], sampler: Sampler, seed: int) -> None:
        """Feed the prompt a generation continues from; if that fails, the sampler is closed and
        the session's seed is `seed` again (what it was before the sampler was made)."""
        try:
            self._continue_with(parts)
        except BaseException:
            sampler.close()
            self._seed = seed
            raise

    def _stream_chunks(
        self,
        sampler: Sampler,
        seed: int,
        parts: list[Part],
        max_tokens: int,
        stops: list[str],
        head: dict,
        prefix: str,
        n_logprobs: int | None,
        logprobs_of: Callable[[list[_TokenLogprob]], dict | None],
        criteria: list[StoppingCriterion],
    ) -> Iterator[dict]:
        """A streamed completion; it holds the session's lock from the prompt to the last chunk."""
        with self._lock:
            self._begin(parts, sampler, seed)
            if prefix:
                yield {
                    **head,
                    "choices": [{"text": prefix, "index": 0, "logprobs": None, "finish_reason": None}],
                }
            for step in self._generate(sampler, max_tokens, stops, n_logprobs, criteria):
                if step.text or step.finish:
                    choice = {"text": step.text, "index": 0, "finish_reason": step.finish}
                    yield {**head, "choices": [{**choice, "logprobs": logprobs_of(step.tokens)}]}

    def create_chat_completion(
        self,
        messages: list[dict],
        functions: list[dict] | None = None,
        function_call: Any = None,
        tools: list[dict] | None = None,
        tool_choice: Any = None,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        stream: bool = False,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        response_format: dict | None = None,
        max_tokens: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: str | None = None,
        logits_processor: list[LogitsProcessor] | None = None,
        grammar: LlamaGrammar | str | None = None,
        logit_bias: dict[int, float] | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
    ) -> dict | Iterator[dict]:
        """OpenAI-style chat, rendered with the model's chat template; a message's content may be a
        list of parts, `{"type": "text", ...}` and `{"type": "image_url", "image_url": {"url": path
        or data: URL}}` (needs mmproj_path).  `response_format` {"type": "json_object"} (with an
        optional "schema") or {"type": "json_schema", ...} constrains the reply by a grammar."""
        if functions or function_call or tools or tool_choice:
            raise ValueError("tool and function calling is not supported; describe the tools in a message")
        if self._chat_formatter is None:
            raise ValueError(f"{self.model_path.name} has no chat template")
        if not messages:
            raise ValueError("messages is empty")
        if top_logprobs is not None and not logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        format_grammar = grammar_for_response_format(response_format)
        if format_grammar is not None and grammar is not None:
            raise ValueError("give grammar or a JSON response_format, not both")
        params = SamplingParams(
            temperature, top_k, top_p, min_p, typical_p, repeat_penalty, frequency_penalty, presence_penalty,
            mirostat_mode, mirostat_tau, mirostat_eta, logit_bias, grammar or format_grammar,
            logits_processor, seed,
        )  # fmt: skip
        rendered, images = self._render_chat(messages)
        add_bos = not rendered.added_special
        if images:
            parts = self._require_projector().tokenize(rendered.prompt, images, add_bos)
        else:
            tokens = self.tokenize(rendered.prompt, add_bos=add_bos, special=True)
            parts = [TextPart(np.asarray(tokens, np.int32))]
        n_logprobs = (top_logprobs or 0) if logprobs else None
        stops = _stops(stop) + _stops(rendered.stop)  # a named chat format's end-of-turn text
        result = self._completion(
            parts, max_tokens, params, stops, stream, n_logprobs=n_logprobs, model=model
        )
        if stream:
            return _chat_chunks(result)
        choice = result["choices"][0]
        return {
            "id": "chat" + result["id"],
            "object": "chat.completion",
            "created": result["created"],
            "model": result["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": choice["text"]},
                    "logprobs": _convert_text_completion_logprobs_to_chat(choice["logprobs"]),
                    "finish_reason": choice["finish_reason"],
                }
            ],
            "usage": result["usage"],
        }

    # --- saved sessions --------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        """What a saved state must match to be loaded here (as JSON gives it back)."""
        model = self._model.model
        desc = ctypes.create_string_buffer(256)
        lc.llama_model_desc(model, desc, len(desc))
        recall = None if self.recall is None else repr(dataclasses.replace(self.recall, spill_dir=None))
        return json.loads(
            json.dumps(
                {
                    "model": {
                        "desc": desc.value.decode("utf-8", "replace"),
                        "n_params": lc.llama_model_n_params(model),
                        "n_vocab": self._n_vocab,
                        "n_embd": self.n_embd(),
                        "n_layer": lc.llama_model_n_layer(model),
                    },
                    "policy": repr(self.policy),
                    "recall": recall,
                    "n_ctx": self._n_ctx,
                }
            )
        )

    @_locked
    def save_state(self) -> LlamaState:
        """The whole session in memory: the cache's cells after eviction, the stream's history and
        records, the policy's state, the recall store and the sampler's seed."""
        facts, arrays = self._stream.export_state()
        data = pack({"session": self._fingerprint(), "stream": facts, "seed": self._seed}, arrays)
        return LlamaState(data, self._stream.n_streamed, self._stream.n_cached, self._seed)

    @_locked
    def load_state(self, state: LlamaState | bytes) -> None:
        """Become the saved session: the next logits, samples and evictions are the ones it would
        have had.  A damaged state, or one saved with another model, policy, recall tier or n_ctx,
        raises StateError and leaves this session as it was."""
        data = state.data if isinstance(state, LlamaState) else state
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise StateError(f"load_state takes a LlamaState or its bytes, got {type(state).__name__}")
        facts, arrays = unpack(bytes(data))
        mine, saved = self._fingerprint(), facts.get("session")
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
        backup = self._stream.export_state()
        try:
            self._stream.import_state(facts["stream"], arrays)
        except BaseException as exc:
            self._stream.import_state(*backup)
            if isinstance(exc, (ValueError, KeyError, TypeError)):
                raise StateError(f"the saved session does not load here: {exc}") from exc
            raise
        self._seed = seed

    def save_session(self, path: str | os.PathLike) -> int:
        """save_state() written to path (atomically: the old file or the whole new one); returns
        the bytes written."""
        state = self.save_state()
        write_file(path, state.data)
        return state.nbytes

    def load_session(self, path: str | os.PathLike) -> None:
        """load_state() of a file save_session wrote, in this or a later process."""
        self.load_state(read_file(path))

    # --- embeddings ---------------------------------------------------------------------
    @_locked
    def embed(
        self,
        input: str | list[str],
        normalize: bool = False,
        truncate: bool = True,
        return_count: bool = False,
    ) -> Any:
        """llama-cpp-python's `embed`: one vector per text (pooled), or one per token where the
        model's pooling is NONE (most causal LMs); texts longer than n_batch tokens are cut with
        `truncate`, refused without.  Needs `embedding=True`; the stream is not touched."""
        if self._embedder is None:
            raise RuntimeError("embeddings need a Llama created with embedding=True")
        texts = [input] if isinstance(input, str) else list(input)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("input must be a string or a non-empty list of strings")
        tokens = [self.tokenize(t) for t in texts]
        if truncate:
            tokens = [t[: self.n_batch] for t in tokens]
        elif max(map(len, tokens)) > self.n_batch:
            raise ValueError(f"an input of {max(map(len, tokens))} tokens exceeds n_batch ({self.n_batch})")
        vectors = self._embedder.embed(tokens, normalize)
        output = vectors[0] if isinstance(input, str) else vectors
        return (output, sum(len(t) for t in tokens)) if return_count else output

    def create_embedding(self, input: str | list[str], model: str | None = None) -> dict[str, Any]:
        """OpenAI's embeddings response, as llama-cpp-python's `create_embedding` gives it."""
        texts = input if isinstance(input, list) else [input]
        vectors, n_tokens = self.embed(texts, return_count=True)
        return {
            "object": "list",
            "data": [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)],
            "model": model if model is not None else str(self.model_path),
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }

    def pooling_type(self) -> int:
        """The embedding context's pooling (LLAMA_POOLING_TYPE_*); UNSPECIFIED without `embedding`."""
        return (
            self._embedder.pooling_type if self._embedder is not None else lc.LLAMA_POOLING_TYPE_UNSPECIFIED
        )

    def _render_chat(self, messages: list[dict]) -> tuple[Any, list[ImageLike]]:
        marker = self._projector.marker if self._projector is not None else None
        flat, images = flatten_messages(messages, marker)
        try:
            return self._chat_formatter(messages=flat), images
        except (jinja2.TemplateError, TypeError, KeyError, AttributeError) as exc:
            # a message the template does not expect (a missing content, an odd role): the caller's
            raise ValueError(f"the chat template cannot render these messages: {exc}") from exc

    def chat_prompt_tokens(self, messages: list[dict]) -> np.ndarray:
        """The token ids a chat request's text renders to (each image as its marker's tokens):
        what a conversation's stream would begin with, for finding the stream that holds it."""
        if self._chat_formatter is None:
            raise ValueError(f"{self.model_path.name} has no chat template")
        rendered, _ = self._render_chat(messages)
        tokens = self.tokenize(rendered.prompt, add_bos=not rendered.added_special, special=True)
        return np.asarray(tokens, np.int32)

    # --- introspection -----------------------------------------------------------------
    @_locked
    def kv_stats(self) -> dict[str, Any]:
        st = self._stream
        return {
            "policy": self.policy.name,
            "budget": self.policy.budget if not isinstance(self.policy, FullCache) else self._n_ctx,
            "capacity": st.capacity,
            "n_ctx": self._n_ctx,
            "n_cached": st.n_cached,
            "n_streamed": st.n_streamed,
            "n_evicted": st.stats.n_evicted,
            "evictions": st.stats.evictions,
            "max_pos": st.next_pos - 1,
            "max_pos_seen": st.stats.max_pos_seen,
            "images": st.stats.images,
            "n_image_cells": st.n_image_cells,
            **self._recall_stats(),
        }

    def _recall_stats(self) -> dict[str, Any]:
        st = self._stream
        if st.store is None:
            return {}
        return {
            "recall_reserve": st.reserve,
            "n_recalled": st.n_recalled,
            "pages_stored": st.store.n_pages,
            "store_mb": st.store.nbytes / 2**20,
            "spilled_mb": st.store.spilled_bytes / 2**20,
            "pages_dropped": st.store.stats.pages_dropped,
            "pages_spilled": st.store.stats.pages_spilled,
            "recalls": st.stats.recalls,
            "pages_recalled": st.stats.pages_recalled,
            "recall_error": st.recall_error,
        }

    @_locked
    def recalled(self) -> list[tuple[int, int]]:
        """Stream-index ranges [start, end) of the pages the recall tier has brought back into
        the cache now (empty without a recall tier)."""
        return self._stream.recalled_ranges()

    def saddle_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions, raw attention mass per cell) from the latest decode, before local sum and bias.

        Zeros unless that decode was scored: a fresh-window policy scores only the decodes whose
        queries the next eviction ranks by (the last retrieval_window rows before it).
        """
        view = self.kv.cells(self._stream.seq_id)
        return view.positions, view.scores

    def cached_stream_indices(self) -> np.ndarray:
        """Stream index (0 = first token ever fed) of each cached token, in position order."""
        return self._stream.stream_index

    @_locked
    def check_invariants(self) -> None:
        """Raise InvariantError unless the native cache and the stream's records agree
        (see `Stream.check_invariants`)."""
        self._stream.check_invariants()


def _stream_policy(
    kv_policy: KVPolicy | str | None, context: ContextOptions, recall: Recall | None
) -> KVPolicy:
    """The stream's own copy of the policy, checked against the context and the recall tier."""
    n_ctx, n_ubatch = context.n_ctx, context.ubatch
    # a policy given by name gets budget min(1024, n_ctx // 2)
    policy = copy.deepcopy(make_policy(kv_policy or "infmllm", budget=min(1024, n_ctx // 2)))
    if not isinstance(policy, FullCache) and policy.capacity > n_ctx:
        raise ValueError(
            f"budget + chunk ({policy.budget} + {policy.chunk} = {policy.capacity}) exceeds "
            f"n_ctx ({n_ctx}); raise n_ctx or lower the budget"
        )
    if policy.score_queries > n_ubatch:
        raise ValueError(
            f"retrieval_window ({policy.score_queries}) exceeds n_ubatch ({n_ubatch}, the scored "
            "query rows of one ubatch); lower retrieval_window or raise n_batch and n_ubatch"
        )
    if recall is None:
        return policy
    if not isinstance(recall, Recall):
        raise ValueError(f"recall must be a Recall(...), got {recall!r}")
    if isinstance(policy, FullCache):
        raise ValueError("recall brings back evicted pages: it needs an evicting kv_policy, not 'full'")
    if recall.reserve_for(policy.budget) >= policy.budget:
        raise ValueError(
            f"recall's reserve ({recall.reserve_for(policy.budget)}) must be below the budget "
            f"({policy.budget}): the policy keeps the rest"
        )
    if recall.query_window > n_ubatch:
        raise ValueError(f"recall's query_window ({recall.query_window}) exceeds n_ubatch ({n_ubatch})")
    return policy


def _criteria(
    stopping_criteria: StoppingCriterion | Iterable[StoppingCriterion] | None,
) -> list[StoppingCriterion]:
    """One criterion (llama-cpp-python's StoppingCriteriaList is one) or several, as a list."""
    if stopping_criteria is None:
        return []
    criteria = [stopping_criteria] if callable(stopping_criteria) else list(stopping_criteria)
    if not all(callable(c) for c in criteria):
        raise ValueError("stopping_criteria must be callables (input_ids, logits) -> bool")
    return criteria


def _completion_logprobs(tokens: list[_TokenLogprob], text_offset: int) -> dict:
    """llama-cpp-python's (and OpenAI's legacy completions') logprobs object."""
    return {
        "tokens": [t.text for t in tokens],
        "text_offset": [text_offset + t.start for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [t.top for t in tokens],
    }


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _chat_chunks(chunks: Iterator[dict]) -> Iterator[dict]:
    first = True
    for chunk in chunks:
        choice = chunk["choices"][0]
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        first = False
        if choice["text"]:
            delta["content"] = choice["text"]
        yield {
            "id": "chat" + chunk["id"],
            "object": "chat.completion.chunk",
            "created": chunk["created"],
            "model": chunk["model"],
            "choices": [
                {
                    "index": 0,
                    "delta": delta,
                    "logprobs": _convert_text_completion_logprobs_to_chat(choice["logprobs"]),
                    "finish_reason": choice["finish_reason"],
                }
            ],
        }
