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
import functools
import os
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from infmllm_gguf import _native
from infmllm_gguf._llama_cpp import llama_cpp as lc
from infmllm_gguf._llama_cpp._internals import LlamaModel
from infmllm_gguf._llama_cpp._logger import set_verbose
from infmllm_gguf._llama_cpp.llama_chat_format import Jinja2ChatFormatter
from infmllm_gguf.interrupts import InterruptGuard
from infmllm_gguf.kv import Batch, KVCache, NativeError
from infmllm_gguf.models import default_model_path
from infmllm_gguf.policies import FullCache, KVPolicy, make_policy
from infmllm_gguf.stops import StopMatcher
from infmllm_gguf.system import physical_cores


class ContextFullError(ValueError):
    """The stream would exceed n_ctx under FullCache; nothing was fed."""


class InvariantError(RuntimeError):
    """The cache and the stream's bookkeeping disagree (raised by `check_invariants`)."""


def _locked(method):
    """Serialise a public method on the session's lock: one stream, one caller at a time."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


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
        n_ctx: int = 2048,
        kv_policy: KVPolicy | str | None = None,
        n_threads: int | None = None,
        flash_attn: bool = False,
        n_batch: int = 512,
        seed: int | None = None,
        verbose: bool = False,
        debug: bool = False,
    ):
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 16:
            raise ValueError(f"n_ctx must be an integer >= 16, got {n_ctx!r}")
        # a policy given by name gets budget min(1024, n_ctx // 2)
        policy = copy.deepcopy(make_policy(kv_policy or "infmllm", budget=min(1024, n_ctx // 2)))
        if not isinstance(policy, FullCache) and policy.capacity > n_ctx:
            raise ValueError(
                f"budget + chunk ({policy.budget} + {policy.chunk} = {policy.capacity}) exceeds "
                f"n_ctx ({n_ctx}); raise n_ctx or lower the budget"
            )
        if isinstance(n_batch, bool) or not isinstance(n_batch, int) or n_batch < 1:
            raise ValueError(f"n_batch must be an integer >= 1, got {n_batch!r}")
        n_ubatch = min(n_batch, n_ctx)
        if policy.score_queries > n_ubatch:
            raise ValueError(
                f"retrieval_window ({policy.score_queries}) exceeds n_ubatch ({n_ubatch}, the scored "
                "query rows of one ubatch); lower retrieval_window or raise n_batch"
            )
        self.policy = policy
        self.n_ctx = n_ctx
        self.verbose = verbose
        self.debug = debug
        self._lock = threading.RLock()
        self._guard = InterruptGuard()
        self.model_path = Path(model_path) if model_path is not None else default_model_path()
        _check_gguf(self.model_path)

        set_verbose(verbose)
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        try:
            self._model = LlamaModel(path_model=str(self.model_path), params=params, verbose=verbose)
        except ValueError as exc:
            raise ValueError(f"could not load {self.model_path} (truncated or corrupt GGUF?): {exc}") from exc
        self.vocab = self._model.vocab
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self._check_architecture()

        n_threads = n_threads or physical_cores()
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_ubatch
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.flash_attn_type = (
            lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cparams.no_perf = True
        self._ctx = lc.llama_init_from_model(self._model.model, cparams)
        if not self._ctx:
            raise RuntimeError("llama_init_from_model failed (out of memory?)")
        # Ctrl-C stops a running decode between graph nodes (see interrupts.py)
        _native.llama_set_abort_callback(
            self._ctx, _native.infmllm_abort_on_fd_address(), ctypes.byref(self._guard.abort_fd)
        )
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
        self._scoring = 0
        self._batch = Batch(self.n_batch)
        self._rng = np.random.default_rng(seed)
        self._chat_formatter = self._make_chat_formatter()
        self.reset()

    # --- model facts --------------------------------------------------------------
    def _check_architecture(self) -> None:
        if isinstance(self.policy, FullCache):
            return
        model = self._model.model
        rope = lc.llama_model_rope_type(model)
        if rope in (lc.LLAMA_ROPE_TYPE_MROPE, lc.LLAMA_ROPE_TYPE_IMROPE, lc.LLAMA_ROPE_TYPE_VISION):
            raise ValueError(
                "eviction needs 1-D RoPE positions to re-position kept tokens; this model uses "
                "M-RoPE. Use kv_policy='full'."
            )
        if lc.llama_model_is_recurrent(model) or lc.llama_model_is_hybrid(model):
            raise ValueError(
                "recurrent/hybrid models have no per-token KV cache to evict; use kv_policy='full'"
            )
        if lc.llama_model_n_swa(model) > 0:
            raise ValueError(
                "this model uses sliding-window attention (an iSWA cache, as Gemma 2/3 and gpt-oss "
                "have); evicting policies support a plain KV cache only. Use kv_policy='full'."
            )

    def _make_chat_formatter(self) -> Jinja2ChatFormatter | None:
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

    def close(self) -> None:
        if getattr(self, "_guard", None) is not None:
            self._guard.close()
        if getattr(self, "_batch", None) is not None:
            self._batch.close()
            self._batch = None
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

    def _is_eog(self, token: int) -> bool:
        return bool(lc.llama_vocab_is_eog(self.vocab, token))

    # --- the stream -----------------------------------------------------------------
    @_locked
    def reset(self) -> None:
        """Start a new, empty stream."""
        with self._guard.atomic():
            lc.llama_memory_clear(lc.llama_get_memory(self._ctx), True)
            self._history_buf = np.zeros(4096, np.int32)  # grows by doubling: appends are amortised O(1)
            self._n_history = 0
            self._stream_index = np.zeros(0, np.int64)  # stream index of each cached position
            self._last_logits: np.ndarray | None = None
            self._n_evicted = 0
            self._evictions = 0
            self._max_pos_seen = -1
            # per-cell policy state is indexed by cell, and llama.cpp pads the cache past n_ctx;
            # FullCache keeps none (and runs caches that have no plain cells: iSWA, recurrent)
            self.policy.reset(self.n_ctx if isinstance(self.policy, FullCache) else self.kv.size)

    @property
    def history(self) -> np.ndarray:
        """Every token fed to the stream so far (a read-only view)."""
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
    def n_cached(self) -> int:
        return len(self._stream_index)

    @property
    def _capacity(self) -> int:
        return self.n_ctx if isinstance(self.policy, FullCache) else self.policy.capacity

    @_locked
    def eval(self, tokens: list[int] | np.ndarray) -> None:
        """Append tokens to the stream, evicting as the policy says."""
        self._feed(np.asarray(tokens, np.int32))

    @_locked
    def feed(self, text: str, add_bos: bool | None = None) -> int:
        """Tokenise text (BOS only at the start of a stream) and append it; returns its token count."""
        tokens = self.tokenize(
            text, add_bos=self._n_history == 0 if add_bos is None else add_bos, special=True
        )
        if not tokens:
            raise ValueError(f"text {text[:40]!r} tokenises to no tokens")
        self.eval(tokens)
        return len(tokens)

    @_locked
    def stream_logprobs(self, tokens: list[int] | np.ndarray) -> np.ndarray:
        """log p of each token given the stream before it (NaN for a stream's first token)."""
        return self._feed(np.asarray(tokens, np.int32), logprobs=True)

    def _feed(self, tokens: np.ndarray, logprobs: bool = False) -> np.ndarray | None:
        if tokens.ndim != 1 or len(tokens) == 0:
            raise ValueError("no tokens to feed")
        if tokens.min() < 0 or tokens.max() >= self.n_vocab:
            raise ValueError(f"token ids must be in [0, {self.n_vocab})")
        if isinstance(self.policy, FullCache) and self.n_cached + len(tokens) > self.n_ctx:
            raise ContextFullError(
                f"the stream would hold {self.n_cached + len(tokens)} tokens but n_ctx is {self.n_ctx} "
                "and kv_policy is 'full'; use an evicting policy (e.g. 'infmllm') for endless streams"
            )
        out = np.empty(len(tokens), np.float64) if logprobs else None
        i = 0
        while i < len(tokens):
            if self.n_cached >= self._capacity:
                self._evict()
            take = min(self._capacity - self.n_cached, self.n_batch, len(tokens) - i)
            self._decode(tokens[i : i + take], out[i : i + take] if out is not None else None)
            i += take
        return out

    def _decode(self, piece: np.ndarray, logprobs_out: np.ndarray | None) -> None:
        n = len(piece)
        start = self.n_cached
        scored = self.policy.needs_scores(start + n)
        self._set_scoring(self.policy.score_queries if scored else 0)
        flags = np.zeros(n, np.int8)
        flags[-1] = 1
        if logprobs_out is not None:
            flags[:] = 1
        with self._unit():
            try:
                rc = self._batch.decode(self._ctx, piece, np.arange(start, start + n), 0, flags)
                if rc == 2:
                    raise KeyboardInterrupt  # the abort callback saw Ctrl-C mid-decode
                if rc != 0:
                    raise RuntimeError(f"llama_decode failed with status {rc}")
            except BaseException:
                # a failed or aborted ubatch is removed by llama.cpp, the ubatches before it are not
                lc.llama_memory_seq_rm(lc.llama_get_memory(self._ctx), 0, start, -1)
                raise
            self._record(piece, start, scored, flags, logprobs_out)

    @contextlib.contextmanager
    def _unit(self) -> Iterator[None]:
        """A native state change and its bookkeeping: SIGINT deferred over it, invariants checked
        after it in debug mode."""
        with self._guard.atomic():
            yield
        if self.debug:
            self.check_invariants()

    def _record(
        self, piece: np.ndarray, start: int, scored: bool, flags: np.ndarray, logprobs_out: np.ndarray | None
    ) -> None:
        """Python's side of a decode the cache has taken: history, logits, policy scores."""
        n = len(piece)
        n_out = int(flags.sum())
        ptr = lc.llama_get_logits(self._ctx)
        rows = np.ctypeslib.as_array(
            ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_out, self.n_vocab)
        )
        if logprobs_out is not None:
            lsm = _log_softmax(rows.astype(np.float64))
            logprobs_out[0] = (
                _log_softmax(self._last_logits[None, :].astype(np.float64))[0, piece[0]]
                if self._last_logits is not None
                else np.nan
            )
            logprobs_out[1:] = lsm[np.arange(n - 1), piece[1:]]
        last_logits = rows[-1].copy()

        # computed above, committed below: nothing here can fail halfway
        self._append_history(piece)
        first = self._n_history - n
        self._stream_index = np.concatenate([self._stream_index, np.arange(first, first + n)])
        self._max_pos_seen = max(self._max_pos_seen, start + n - 1)
        self._last_logits = last_logits
        if scored:
            queries = self.policy.score_queries
            last_ubatch = n % self.n_ubatch or self.n_ubatch
            n_rows = last_ubatch if queries < 0 else min(queries, last_ubatch)
            self.policy.observe(self.kv.cells(), n_rows)

    def _set_scoring(self, n_score_queries: int) -> None:
        # switching rebuilds the graph once, so it only happens at the edges of a scored stretch
        if n_score_queries != self._scoring:
            self.kv.set_scoring(n_score_queries)
            self._scoring = n_score_queries

    def _evict(self) -> None:
        """The one eviction path: policy picks, native evicts and compacts."""
        view = self.kv.cells()
        keep = self.policy.select(view)
        if keep.sum() != self.policy.budget:
            raise RuntimeError(f"{self.policy.name} kept {keep.sum()} cells, budget is {self.policy.budget}")
        with self._unit():
            self.kv.evict(view.positions[~keep])  # validates everything before it changes anything
            self.kv.compact()  # cannot fail after a successful evict on the same sequence
            self.kv.update()  # the K-shift now, where Ctrl-C cannot stop it halfway
            self.policy.forget(view.cells[~keep])
            self._stream_index = self._stream_index[keep]
            self._n_evicted += int((~keep).sum())
            self._evictions += 1

    def _rollback(self, n_keep: int) -> bool:
        """Drop the stream's tokens from index n_keep on, if all of them are still cached."""
        n_drop = self._n_history - n_keep
        if n_drop <= 0:
            return n_drop == 0
        if n_drop > self.n_cached or self._stream_index[self.n_cached - n_drop] != n_keep:
            return False
        first_pos = self.n_cached - n_drop
        freed = self.kv.cells().cells[first_pos:]
        with self._unit():
            if not lc.llama_memory_seq_rm(lc.llama_get_memory(self._ctx), 0, first_pos, -1):
                return False
            self.policy.forget(freed)
            self._n_history = n_keep
            self._stream_index = self._stream_index[:first_pos]
            self._last_logits = None
        return True

    def _continue_with(self, tokens: list[int]) -> int:
        """Make the stream equal tokens with as little work as possible; returns tokens fed."""
        tokens_np = np.asarray(tokens, np.int32)
        hist = self.history
        m = min(len(hist), len(tokens_np))
        diverge = np.flatnonzero(hist[:m] != tokens_np[:m])
        common = int(diverge[0]) if len(diverge) else m
        if common == len(tokens_np):  # the prompt is already in the stream: re-feed its last token
            common -= 1
        if not self._rollback(common):
            self.reset()
            common = 0
        self._feed(tokens_np[common:])
        return len(tokens_np) - common

    # --- generation -------------------------------------------------------------------
    def _sample(self, p: SamplingParams) -> int:
        logits = self._last_logits.astype(np.float64)
        if p.temperature <= 0:
            return int(np.argmax(logits))
        logits = logits / p.temperature
        order = np.argsort(-logits)
        if p.top_k > 0:
            order = order[: p.top_k]
        probs = np.exp(logits[order] - logits[order[0]])
        probs /= probs.sum()
        keep = np.ones(len(order), bool)
        if p.top_p < 1.0:
            keep &= np.concatenate([[True], np.cumsum(probs)[:-1] < p.top_p])
        if p.min_p > 0:
            keep &= probs >= p.min_p * probs[0]
        probs = np.where(keep, probs, 0.0)
        rng = self._rng if p.seed is None else np.random.default_rng(p.seed + self._n_history)
        return int(order[rng.choice(len(order), p=probs / probs.sum())])

    def _generate(
        self, max_tokens: int, params: SamplingParams, stop: list[str]
    ) -> Iterator[tuple[str, str | None]]:
        """Yield (text piece, finish_reason or None) while continuing the stream.

        Text that could still become a stop string is held back until it cannot, so the
        pieces joined are exactly the generated text cut at the first stop string."""
        if self._last_logits is None:
            raise ValueError("nothing to continue from: feed text first")
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        matcher = StopMatcher(stop)
        pending = b""
        for _ in range(max_tokens):
            token = self._sample(params)
            self._feed(np.array([token], np.int32))
            if self._is_eog(token):
                yield matcher.flush(), "stop"
                return
            pending += self._piece(token)
            try:
                piece = pending.decode("utf-8")
            except UnicodeDecodeError:
                continue  # wait for the rest of a multi-byte character
            pending = b""
            safe, hit = matcher.push(piece)
            if hit:
                yield safe, "stop"
                return
            if safe:
                yield safe, None
        yield matcher.flush(), "length"

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
    ) -> str:
        """Continue the stream and return the generated text."""
        params = SamplingParams(temperature, top_k, top_p, min_p, seed)
        limit = self.n_ctx if max_tokens is None else max_tokens
        return "".join(piece for piece, _ in self._generate(limit, params, _stops(stop)))

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
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        stop: str | list[str] | None = None,
        stream: bool = False,
        seed: int | None = None,
        echo: bool = False,
        **_ignored: Any,
    ) -> dict | Iterator[dict]:
        _warn_ignored(_ignored)
        params = SamplingParams(temperature, top_k, top_p, min_p, seed)
        if max_tokens is None:
            max_tokens = self.n_ctx  # llama-cpp-python's "until the context is full"
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")  # before the prompt is fed
        tokens = (
            list(prompt) if not isinstance(prompt, str) else self.tokenize(prompt, add_bos=True, special=True)
        )
        if not tokens:
            raise ValueError("the prompt tokenises to no tokens")
        head = {
            "id": f"cmpl-{uuid.uuid4()}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": str(self.model_path),
        }
        prefix = prompt if (echo and isinstance(prompt, str)) else ""
        if stream:
            return self._stream_chunks(tokens, max_tokens, params, _stops(stop), head, prefix)
        with self._lock:
            self._continue_with(tokens)
            n_before = self._n_history
            pieces, finish = [], "length"
            for piece, reason in self._generate(max_tokens, params, _stops(stop)):
                pieces.append(piece)
                finish = reason or finish
            n_gen = self._n_history - n_before
        return {
            **head,
            "choices": [
                {"text": prefix + "".join(pieces), "index": 0, "logprobs": None, "finish_reason": finish}
            ],
            "usage": {
                "prompt_tokens": len(tokens),
                "completion_tokens": n_gen,
                "total_tokens": len(tokens) + n_gen,
            },
        }

    def _stream_chunks(
        self,
        tokens: list[int],
        max_tokens: int,
        params: SamplingParams,
        stops: list[str],
        head: dict,
        prefix: str,
    ) -> Iterator[dict]:
        """A streamed completion; it holds the session's lock from the prompt to the last chunk."""
        with self._lock:
            self._continue_with(tokens)
            if prefix:
                yield {
                    **head,
                    "choices": [{"text": prefix, "index": 0, "logprobs": None, "finish_reason": None}],
                }
            for piece, reason in self._generate(max_tokens, params, stops):
                if piece or reason:
                    yield {
                        **head,
                        "choices": [{"text": piece, "index": 0, "logprobs": None, "finish_reason": reason}],
                    }

    __call__ = create_completion

    def create_chat_completion(
        self,
        messages: list[dict],
        max_tokens: int | None = None,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        stop: str | list[str] | None = None,
        stream: bool = False,
        seed: int | None = None,
        **_ignored: Any,
    ) -> dict | Iterator[dict]:
        _warn_ignored(_ignored)
        if self._chat_formatter is None:
            raise ValueError(f"{self.model_path.name} has no chat template")
        if not messages:
            raise ValueError("messages is empty")
        rendered = self._chat_formatter(messages=messages)
        tokens = self.tokenize(rendered.prompt, add_bos=not rendered.added_special, special=True)
        result = self.create_completion(
            tokens,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            stop=_stops(stop),
            stream=stream,
            seed=seed,
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
                    "finish_reason": choice["finish_reason"],
                }
            ],
            "usage": result["usage"],
        }

    # --- introspection -----------------------------------------------------------------
    @_locked
    def kv_stats(self) -> dict[str, Any]:
        return {
            "policy": self.policy.name,
            "budget": self.policy.budget if not isinstance(self.policy, FullCache) else self.n_ctx,
            "capacity": self._capacity,
            "n_ctx": self.n_ctx,
            "n_cached": self.n_cached,
            "n_streamed": self._n_history,
            "n_evicted": self._n_evicted,
            "evictions": self._evictions,
            "max_pos": self.n_cached - 1,
            "max_pos_seen": self._max_pos_seen,
        }

    def saddle_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions, raw attention mass per cell) from the latest decode, before local sum and bias.

        Zeros unless that decode was scored: a fresh-window policy scores only the decodes whose
        queries the next eviction ranks by (the last retrieval_window rows before it).
        """
        view = self.kv.cells()
        return view.positions, view.scores

    def cached_stream_indices(self) -> np.ndarray:
        """Stream index (0 = first token ever fed) of each cached token, in position order."""
        return self._stream_index.copy()

    @_locked
    def check_invariants(self) -> None:
        """Raise InvariantError unless the native cache and the stream's records agree.

        The cache holds exactly the cached tokens, at positions 0..n-1 (compacted), within
        the capacity; they are distinct stream indices in stream order; every streamed token
        is either cached or counted as evicted."""
        view = self.kv.cells()
        n = self.n_cached
        problems = []
        if len(view.cells) != n:
            problems.append(f"the cache holds {len(view.cells)} cells, the stream records {n}")
        elif not np.array_equal(view.positions, np.arange(n)):
            problems.append("cached positions are not 0..n-1")
        if n > self._capacity:
            problems.append(f"{n} cells cached, capacity {self._capacity}")
        if n and (np.any(np.diff(self._stream_index) <= 0) or self._stream_index[-1] >= self._n_history):
            problems.append("cached stream indices are not increasing within the history")
        if n + self._n_evicted != self._n_history:
            problems.append(f"{n} cached + {self._n_evicted} evicted != {self._n_history} streamed")
        if problems:
            raise InvariantError("; ".join(problems))


def _warn_ignored(kwargs: dict[str, Any]) -> None:
    if kwargs:
        warnings.warn(f"infmllm-gguf ignores these llama-cpp-python options: {sorted(kwargs)}", stacklevel=3)


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
            "choices": [{"index": 0, "delta": delta, "finish_reason": choice["finish_reason"]}],
        }
