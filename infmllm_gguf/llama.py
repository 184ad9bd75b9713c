"""`Llama`: llama-cpp-python's familiar surface over one endless stream in a bounded KV cache.

A `Llama` is the face of one session (one sequence of an `Engine`'s context); `slot(i)` gives
the face of another session in the same context.  Every token ever fed is in `history`; the
cache holds at most the policy's budget + chunk of them, at compacted positions 0..n-1, so
positions never reach n_ctx however long the stream runs.

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
import functools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from infmllm_gguf._llama_cpp import llama_cpp as lc
from infmllm_gguf.engine import Engine
from infmllm_gguf.generation import Completion, Generation, chat_grammar, check_completion_args
from infmllm_gguf.kv import KVCache
from infmllm_gguf.models import default_model_path
from infmllm_gguf.params import ContextOptions, ModelOptions, check_int
from infmllm_gguf.policies import KVPolicy, make_policy
from infmllm_gguf.recall import Recall
from infmllm_gguf.responses import (
    CHAT_FORMATS,
    StoppingCriterion,
    chat_chunks,
    chat_response,
    embedding_response,
    stop_list,
)
from infmllm_gguf.sampling import (
    LlamaGrammar,
    LogitsProcessor,
    SamplingParams,
)
from infmllm_gguf.session import HistoryDivergedError, Session
from infmllm_gguf.state import LlamaState, read_file, write_file
from infmllm_gguf.stream import ContextFullError, InvariantError, StopGeneration
from infmllm_gguf.video import feed_video
from infmllm_gguf.vision import ImageLike, ImagePart

__all__ = ["ContextFullError", "HistoryDivergedError", "InvariantError", "Llama", "StopGeneration"]


def _locked(method):
    """Serialise a public method on the session's lock, then the engine's: one caller at a time
    on the session, and on the context but while a decode waits to share a step."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._session.locked():
            return method(self, *args, **kwargs)

    return wrapper


class _Shared:
    """A read-only attribute of a Llama that reads the one of the same name of its `_engine` or
    `_settings` (what the faces of one engine's slots share)."""

    def __init__(self, owner: str):
        self.owner = owner

    def __set_name__(self, cls: type, name: str) -> None:
        self.name = name

    def __get__(self, face: Llama | None, cls: type) -> Any:
        return self if face is None else getattr(getattr(face, self.owner), self.name)


@dataclass(frozen=True)
class _Settings:
    """What a Llama was made with, shared by the faces of its slots."""

    model_path: Path
    recall: Recall | None
    chat_format: str | None
    logits_all: bool
    last_n_tokens_size: int
    n_slots: int
    verbose: bool
    debug: bool

    def __post_init__(self) -> None:
        check_int("last_n_tokens_size", self.last_n_tokens_size, -1)  # -1: the whole generation
        if self.chat_format is not None and self.chat_format not in CHAT_FORMATS:
            known = ", ".join(sorted(CHAT_FORMATS))
            raise ValueError(f"unknown chat_format {self.chat_format!r}; known: {known}")


class Llama:
    """A GGUF model with one endless stream and a bounded, policy-managed KV cache.

    Every native state change (decode, evict, compact, roll back) and its Python bookkeeping
    happen as one unit: an exception or Ctrl-C leaves the cache holding exactly the tokens
    the stream records.  Public methods serialise on the engine's lock, so sharing one `Llama`
    between threads queues the callers instead of interleaving their tokens.  `debug=True`
    checks the cache invariants after every such unit (`check_invariants`).
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
        model_options = ModelOptions(n_gpu_layers, split_mode, main_gpu, tensor_split, use_mmap, use_mlock)
        context_options = ContextOptions(
            n_ctx, n_batch, n_ubatch, n_threads, n_threads_batch, flash_attn, type_k, type_v,
            rope_freq_base, rope_freq_scale, offload_kqv, n_slots, swa_full,
        )  # fmt: skip
        check_int("seed", seed)
        check_int("pooling_type", pooling_type, lc.LLAMA_POOLING_TYPE_UNSPECIFIED)
        self._settings = _Settings(
            Path(model_path) if model_path is not None else default_model_path(),
            recall, chat_format, logits_all, last_n_tokens_size, n_slots, verbose, debug,
        )  # fmt: skip
        if n_ctx:
            _stream_policy(kv_policy, context_options, recall)  # a bad policy costs no model load
        self._root: Llama | None = None  # the Llama whose engine a slot shares
        self._slots: dict[int, Llama] = {}
        self._engine = engine = Engine(self.model_path, model_options, verbose=verbose, debug=debug)
        try:
            context_options.n_ctx = context_options.n_ctx or engine.n_ctx_train
            policy = _stream_policy(kv_policy, context_options, recall)
            engine.check_architecture(policy, recall)
            engine.open(
                context_options, policy, chat_format=chat_format, mmproj_path=mmproj_path,
                gpu_tower=n_gpu_layers != 0, embedding=embedding, pooling_type=pooling_type,
            )  # fmt: skip
            self._session = engine.session(0, policy, recall, seed)
        except BaseException:
            engine.close()
            raise

    # --- model facts, as llama-cpp-python's accessors -----------------------------------
    def n_ctx(self) -> int:
        """Cells of the KV cache (the stream itself has no length limit under an evicting policy)."""
        return self._engine.n_ctx

    def n_vocab(self) -> int:
        return self._engine.n_vocab

    def n_embd(self) -> int:
        return lc.llama_model_n_embd(self._engine.model.model)

    def token_bos(self) -> int:
        return lc.llama_vocab_bos(self._engine.vocab)

    def token_eos(self) -> int:
        return lc.llama_vocab_eos(self._engine.vocab)

    def token_nl(self) -> int:
        return lc.llama_vocab_nl(self._engine.vocab)

    @property
    def metadata(self) -> dict[str, str]:
        """The GGUF's key/value metadata."""
        return self._engine.model.metadata()

    @property
    def engine(self) -> Engine:
        """The model, context, projector and lock this session shares with its slots."""
        return self._engine

    @property
    def session(self) -> Session:
        """The session (one sequence: stream, policy state, recall tier, seed) this faces."""
        return self._session

    # the engine's, shared with the slots
    kv: KVCache = _Shared("_engine")
    vocab: Any = _Shared("_engine")
    n_batch: int = _Shared("_engine")
    n_ubatch: int = _Shared("_engine")
    # what it was made with (shared with its slots' faces), as llama-cpp-python's attributes
    model_path: Path = _Shared("_settings")
    recall: Recall | None = _Shared("_settings")  # the recall tier each session gets a copy of
    chat_format: str | None = _Shared("_settings")
    logits_all: bool = _Shared("_settings")
    last_n_tokens_size: int = _Shared("_settings")
    n_slots: int = _Shared("_settings")
    verbose: bool = _Shared("_settings")
    debug: bool = _Shared("_settings")

    @property
    def policy(self) -> KVPolicy:
        return self._session.policy

    @property
    def restart_on_divergence(self) -> bool:
        """A prompt that departs from the stream where it can no longer be rolled back restarts
        the stream (llama-cpp-python's behaviour); False raises HistoryDivergedError instead."""
        return self._session.restart_on_divergence

    @restart_on_divergence.setter
    def restart_on_divergence(self, value: bool) -> None:
        self._session.restart_on_divergence = value

    # --- sequence slots -------------------------------------------------------------------
    def slot(self, seq_id: int) -> Llama:
        """The session on sequence slot seq_id (0 is the Llama created): a stream of its own,
        with its own policy state, recall store and seed, in the same context (same weights, one
        cache buffer with a KV stream per slot).  All slots share one lock, so their calls run
        one at a time; `close()` on a slot frees its cells only."""
        root = self._root or self
        check_int("seq_id", seq_id, 0)
        if seq_id >= root.n_slots:
            raise ValueError(f"seq_id must be below n_slots ({root.n_slots}), got {seq_id}")
        if seq_id == 0:
            return root
        face = root._slots.get(seq_id)  # made once: finding it never waits for a running call
        if face is not None:
            return face
        with self._engine.hold():
            if seq_id not in root._slots:
                session = self._engine.session(seq_id, root.policy, root.recall, root._session.seed)
                root._slots[seq_id] = root._face(session)
            return root._slots[seq_id]

    def _face(self, session: Session) -> Llama:
        """A Llama facing another session of this engine, with this one's settings."""
        face = object.__new__(Llama)
        face._settings, face._engine, face._session = self._settings, self._engine, session
        face._root, face._slots = self, {}
        return face

    @property
    def seq_id(self) -> int:
        """The sequence slot this session streams in."""
        return self._session.seq_id

    def close(self) -> None:
        """Free this slot's cells; on the Llama created, everything (model, context, slots)."""
        engine = getattr(self, "_engine", None)
        if engine is None:
            return
        if self._root is not None:
            with self._session.locked():
                self._root._slots.pop(self.seq_id, None)
                engine.drop_session(self.seq_id)
        else:
            self._slots.clear()
            engine.close()

    def __del__(self) -> None:
        if getattr(self, "_root", None) is None:
            self.close()

    # --- tokens -------------------------------------------------------------------
    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self._engine.tokenize(text, add_bos, special)

    def detokenize(self, tokens: list[int], special: bool = False) -> bytes:
        return self._engine.detokenize(tokens, special)

    # --- the stream -----------------------------------------------------------------
    @_locked
    def reset(self) -> None:
        """Start a new, empty stream."""
        self._session.stream.reset()

    @property
    def history(self) -> np.ndarray:
        """Every token fed to the stream so far (read-only); each image cell appears as a negative
        key derived from the image's content."""
        return self._session.stream.history

    @property
    def n_cached(self) -> int:
        return self._session.stream.n_cached

    @property
    def n_streamed(self) -> int:
        """Keys fed to the stream so far (tokens and image cells, cached or evicted)."""
        return self._session.stream.n_streamed

    @_locked
    def rewind(self, n_streamed: int) -> bool:
        """Take back everything fed after the stream's first n_streamed keys, e.g. a question
        asked aside that should not stay in the stream (a model copies earlier answers).

        Possible only while all of it is still cached: returns False and changes nothing once
        an eviction has taken part of it.  Feed something before generating again."""
        return self._session.rewind(n_streamed)

    @contextlib.contextmanager
    def turn(self, poll: Callable[[], None] | None = None) -> Iterator[Llama]:
        """Make the block one atomic step of the session, e.g. a chat turn: if it raises (an error,
        Ctrl-C, a cancelled request), the session becomes exactly what it was before the block,
        evictions and recalls undone, its seed too.  The block holds the session's lock, and the
        engine's but while a decode waits for other sessions' pieces to share a step.

        `poll()` is called between the prompt's pieces (n_batch keys) and before each generated
        token: it may raise to abort the block, or raise StopGeneration to end the generation
        there (finish_reason "length").  A streamed completion must be consumed inside the block.
        Appending costs nothing; the first eviction, recall or roll-back in the block copies the
        session's state once (as save_state does, in memory)."""
        with self._session.locked(), self._session.turn(poll):
            yield self

    @_locked
    def eval(self, tokens: list[int] | np.ndarray) -> None:
        """Append tokens to the stream, evicting as the policy says."""
        self._session.stream.feed(np.asarray(tokens, np.int32))

    @_locked
    def feed(self, text: str, add_bos: bool | None = None) -> int:
        """Tokenise text (BOS only at the start of a stream) and append it; returns its token count."""
        tokens = self.tokenize(
            text, add_bos=self._session.stream.n_streamed == 0 if add_bos is None else add_bos, special=True
        )
        if not tokens:
            raise ValueError(f"text {text[:40]!r} tokenises to no tokens")
        self.eval(tokens)
        return len(tokens)

    @_locked
    def stream_logprobs(self, tokens: list[int] | np.ndarray) -> np.ndarray:
        """log p of each token given the stream before it (NaN for a stream's first token)."""
        return self._session.stream.feed(np.asarray(tokens, np.int32), logprobs=True)

    @_locked
    def feed_image(self, image: ImageLike, prompt: str | None = None) -> int:
        """Append prompt (if any) and then an image at the current position; returns the cells added.

        image: a path, encoded bytes, an H x W x 3 uint8 array or a PIL image.  The image is
        decoded whole, the cache evicting first to make room; an image larger than the budget,
        or one that cannot be read, raises before anything is fed."""
        projector = self._engine.require_projector()
        at_start = self._session.stream.n_streamed == 0
        parts = projector.tokenize((prompt or "") + projector.marker, [image], at_start)
        encoded = {id(p): projector.encode(p) for p in parts if isinstance(p, ImagePart)}
        return self._session.feed_parts(parts, encoded)

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
        self._engine.require_projector()
        return feed_video(self.feed_image, self._session.stream, source, fps, timestamps, on_frame, progress)

    # --- generation -------------------------------------------------------------------
    def set_seed(self, seed: int) -> None:
        """Seed the next generation's sampler.  A call without its own seed derives the next
        seed from this one, as llama-cpp-python does, so a session's samples are reproducible."""
        check_int("seed", seed)
        self._session.seed = seed

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
        limit = self._engine.n_ctx if max_tokens is None else max_tokens
        if not isinstance(limit, int) or limit < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        with self._session.generating():
            sampler = self._session.sampler(params, self.last_n_tokens_size)
            generation = Generation(self._session, sampler, limit, stop_list(stop))
            return "".join(step.text for step in generation)

    @_locked
    def ask(self, question: str, max_tokens: int = 64, temperature: float = 0.0) -> str:
        """Append a user turn (the model's chat template) to the stream and answer it.

        The answer, end-of-turn included, stays in the stream, which goes on afterwards."""
        if self._engine.chat_formatter is None:
            self.feed(f"\nQuestion: {question}\nAnswer:", add_bos=False)
            return self.generate_text(max_tokens, temperature=temperature, stop="\n").strip()
        rendered = self._engine.chat_formatter(messages=[{"role": "user", "content": question}])
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
        check_completion_args(suffix, echo, logprobs)
        parts = self._engine.prompt_parts(prompt)
        params = SamplingParams(
            temperature, top_k, top_p, min_p, typical_p, repeat_penalty, frequency_penalty, presence_penalty,
            mirostat_mode, mirostat_tau, mirostat_eta, logit_bias, grammar, logits_processor, seed,
        )  # fmt: skip
        completion = Completion.create(
            self._session, parts, max_tokens, params, stop_list(stop),
            last_n_tokens=self.last_n_tokens_size, model=model or str(self.model_path),
            prefix=prompt if (echo and isinstance(prompt, str)) else "", n_logprobs=logprobs,
            text_offset=len(prompt) if isinstance(prompt, str) else 0, stopping_criteria=stopping_criteria,
        )  # fmt: skip
        return completion.chunks() if stream else completion.result()

    __call__ = create_completion

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
        if not messages:
            raise ValueError("messages is empty")
        tool_calling = bool(functions or function_call or tools or tool_choice)
        grammar = chat_grammar(tool_calling, logprobs, top_logprobs, grammar, response_format)
        params = SamplingParams(
            temperature, top_k, top_p, min_p, typical_p, repeat_penalty, frequency_penalty, presence_penalty,
            mirostat_mode, mirostat_tau, mirostat_eta, logit_bias, grammar, logits_processor, seed,
        )  # fmt: skip
        parts, format_stops = self._engine.chat_parts(messages)
        completion = Completion.create(
            self._session, parts, max_tokens, params, stop_list(stop) + format_stops,
            last_n_tokens=self.last_n_tokens_size, model=model or str(self.model_path),
            n_logprobs=(top_logprobs or 0) if logprobs else None,
        )  # fmt: skip
        return chat_chunks(completion.chunks()) if stream else chat_response(completion.result())

    # --- saved sessions --------------------------------------------------------------------
    def save_state(self) -> LlamaState:
        """The whole session in memory: the cache's cells after eviction, the stream's history and
        records, the policy's state, the recall store and the sampler's seed."""
        return self._session.save_state()

    def load_state(self, state: LlamaState | bytes) -> None:
        """Become the saved session: the next logits, samples and evictions are the ones it would
        have had.  A damaged state, or one saved with another model, policy, recall tier or n_ctx,
        raises StateError and leaves this session as it was."""
        self._session.load_state(state)

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
        texts = [input] if isinstance(input, str) else list(input)
        vectors, n_tokens = self._engine.embed(texts, normalize, truncate)
        output = vectors[0] if isinstance(input, str) else vectors
        return (output, n_tokens) if return_count else output

    def create_embedding(self, input: str | list[str], model: str | None = None) -> dict[str, Any]:
        """OpenAI's embeddings response, as llama-cpp-python's `create_embedding` gives it."""
        vectors, n_tokens = self.embed(input if isinstance(input, list) else [input], return_count=True)
        return embedding_response(vectors, n_tokens, model if model is not None else str(self.model_path))

    def pooling_type(self) -> int:
        """The embedding context's pooling (LLAMA_POOLING_TYPE_*); UNSPECIFIED without `embedding`."""
        embedder = self._engine.embedder
        return embedder.pooling_type if embedder is not None else lc.LLAMA_POOLING_TYPE_UNSPECIFIED

    def chat_prompt_tokens(self, messages: list[dict]) -> np.ndarray:
        """The token ids a chat request's text renders to (each image as its marker's tokens):
        what a conversation's stream would begin with, for finding the stream that holds it."""
        rendered, _ = self._engine.render_chat(messages)
        return self._engine.chat_tokens(rendered)

    # --- introspection -----------------------------------------------------------------
    @_locked
    def kv_stats(self) -> dict[str, Any]:
        return self._session.kv_stats()

    @_locked
    def recalled(self) -> list[tuple[int, int]]:
        """Stream-index ranges [start, end) of the pages the recall tier has brought back into
        the cache now (empty without a recall tier)."""
        return self._session.stream.recalled_ranges()

    def saddle_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions, raw attention mass per cell) from the latest decode, before local sum and bias.

        Zeros unless that decode was scored: a fresh-window policy scores only the decodes whose
        queries the next eviction ranks by (the last retrieval_window rows before it).
        """
        view = self._engine.kv.cells(self._session.seq_id)
        return view.positions, view.scores

    def cached_stream_indices(self) -> np.ndarray:
        """Stream index (0 = first token ever fed) of each cached token, in position order."""
        return self._session.stream.stream_index

    @_locked
    def check_invariants(self) -> None:
        """Raise InvariantError unless the native cache and the stream's records agree
        (see `Stream.check_invariants`)."""
        self._session.stream.check_invariants()


def _stream_policy(
    kv_policy: KVPolicy | str | None, context: ContextOptions, recall: Recall | None
) -> KVPolicy:
    """The stream's own copy of the policy, checked against the context and the recall tier."""
    n_ctx, n_ubatch = context.n_ctx, context.ubatch
    # a policy given by name gets budget min(1024, n_ctx // 2)
    policy = copy.deepcopy(make_policy(kv_policy or "infmllm", budget=min(1024, n_ctx // 2)))
    if policy.evicts and policy.capacity > n_ctx:
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
    if not policy.evicts:
        raise ValueError("recall brings back evicted pages: it needs an evicting kv_policy, not 'full'")
    if recall.reserve_for(policy.budget) >= policy.budget:
        raise ValueError(
            f"recall's reserve ({recall.reserve_for(policy.budget)}) must be below the budget "
            f"({policy.budget}): the policy keeps the rest"
        )
    if recall.query_window > n_ubatch:
        raise ValueError(f"recall's query_window ({recall.query_window}) exceeds n_ubatch ({n_ubatch})")
    return policy
