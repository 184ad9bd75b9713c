"""`Engine`: what the sessions of one llama context share.

The engine owns the model, the context, its one `KVCache` and the `StepLoop` that batches the
sessions' decodes, the vision projector, the embedding context, the lock that serialises every
call on them and the interrupt guard; a `Session` (session.py) is one sequence of its context.
Resources are released in one place, in the reverse order of their making (an `ExitStack`),
whether the engine closes normally or a later step of its construction fails.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import threading
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from infmllm_gguf import _native
from infmllm_gguf._llama_cpp import llama_cpp as lc
from infmllm_gguf._llama_cpp._internals import LlamaModel
from infmllm_gguf._llama_cpp._logger import set_verbose
from infmllm_gguf._llama_cpp.llama_chat_format import ChatFormatter, Jinja2ChatFormatter
from infmllm_gguf.embeddings import Embedder
from infmllm_gguf.interrupts import InterruptGuard
from infmllm_gguf.kv import KVCache, NativeError
from infmllm_gguf.params import ContextOptions, ModelOptions
from infmllm_gguf.policies import KVPolicy
from infmllm_gguf.recall import Recall
from infmllm_gguf.responses import CHAT_FORMATS, stop_list
from infmllm_gguf.session import Session
from infmllm_gguf.steps import StepLoop
from infmllm_gguf.system import physical_cores
from infmllm_gguf.vision import Part, Projector, TextPart, flatten_messages

__all__ = ["Engine"]

PREFILL_CHUNK = 128


def check_gguf(path: Path) -> None:
    """FileNotFoundError or ValueError unless path is a GGUF file, before llama.cpp reads it."""
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (magic {magic!r})")


class Engine:
    """A loaded model and (after `open`) its context, shared by the sessions on its sequences.

    Construction loads the weights only, so the caller can settle what depends on the model
    (n_ctx 0 means its training context; the policy's checks) before the context is made."""

    def __init__(self, model_path: Path, model: ModelOptions, *, verbose: bool = False, debug: bool = False):
        check_gguf(model_path)
        self.model_path, self.verbose, self.debug = model_path, verbose, debug
        self.lock = threading.RLock()  # one caller at a time on the context, whatever its session
        self.sessions: dict[int, Session] = {}
        self._stack = contextlib.ExitStack()
        self.guard = InterruptGuard()
        self._stack.callback(self.guard.close)
        set_verbose(verbose)
        lc.llama_backend_init()
        params, keep_alive = model.to_params()
        try:
            self.model = LlamaModel(path_model=str(model_path), params=params, verbose=verbose)
        except ValueError as exc:
            self.close()
            raise ValueError(f"could not load {model_path} (truncated or corrupt GGUF?): {exc}") from exc
        del keep_alive
        self._stack.callback(self.model.close)
        self.vocab = self.model.vocab
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = self.model.n_ctx_train()
        self.n_embd_inp = lc.llama_model_n_embd_inp(self.model.model)
        self.ctx = 0
        self.kv: KVCache | None = None
        self.steps: StepLoop | None = None
        self.projector: Projector | None = None
        self.embedder: Embedder | None = None
        self.chat_formatter: ChatFormatter | None = None
        self.n_ctx = self.n_batch = self.n_ubatch = 0

    def open(
        self,
        context: ContextOptions,
        policy: KVPolicy,
        *,
        chat_format: str | None = None,
        mmproj_path: Any = None,
        gpu_tower: bool = True,
        embedding: bool = False,
        pooling_type: int = lc.LLAMA_POOLING_TYPE_UNSPECIFIED,
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> None:
        """Make the context (n_ctx cells per sequence), and the projector and the embedding
        context where asked.  prefill_chunk: the most prompt tokens a session decodes in one
        step while other sessions generate (see StepLoop.piece_limit).  An evicting policy needs
        a cache whose keys can be scored and re-rotated: checked here, before any token
        (ValueError naming the policy)."""
        cparams = context.to_params(physical_cores())
        self.ctx = lc.llama_init_from_model(self.model.model, cparams)
        if not self.ctx:
            raise RuntimeError(
                "llama_init_from_model failed (out of memory, or a K/V type this backend lacks?)"
            )
        self._stack.callback(self._free_context)
        # Ctrl-C stops a running decode between graph nodes (see interrupts.py)
        _native.llama_set_abort_callback(
            self.ctx, _native.infmllm_abort_on_fd_address(), ctypes.byref(self.guard.abort_fd)
        )
        self.n_ctx = context.n_ctx
        if lc.llama_n_ctx_seq(self.ctx) < self.n_ctx:
            got = lc.llama_n_ctx_seq(self.ctx)
            raise RuntimeError(f"llama.cpp gave each sequence {got} cells, not n_ctx = {self.n_ctx}")
        self.n_batch, self.n_ubatch = lc.llama_n_batch(self.ctx), lc.llama_n_ubatch(self.ctx)
        self.kv = KVCache(self.ctx)
        if policy.evicts:  # scoring needs the same cache support as re-rotation: probe with it on
            try:
                self.kv.set_scoring(1)
            except NativeError as exc:
                raise ValueError(
                    f"{type(policy).__name__} cannot evict in this model's cache: {exc}"
                ) from exc
            self.kv.set_scoring(0)
        self.steps = StepLoop(self.ctx, self.kv, self.lock, self.n_batch, self.n_vocab, prefill_chunk)
        self._stack.callback(self.steps.close)
        if mmproj_path is not None:
            # the tower offloads like the layers (as llama.cpp's mtmd tools: unless told not to)
            self.projector = Projector(
                mmproj_path, self.model.model, self.n_embd_inp, cparams.n_threads, gpu_tower
            )
            self._stack.callback(self.projector.close)
        if embedding:
            self.embedder = Embedder(self.model, cparams, pooling_type, self.verbose)
            self._stack.callback(self.embedder.close)
        self.chat_formatter = self._chat_formatter(chat_format)
        self._stack.callback(self._close_sessions)

    def _free_context(self) -> None:
        lc.llama_free(self.ctx)
        self.ctx = 0

    def _close_sessions(self) -> None:
        for session in list(self.sessions.values()):
            session.close(free_cells=False)  # the context is freed next: nothing to undo in it
        self.sessions.clear()

    def close(self) -> None:
        """Release everything, sessions first, the model last; closing twice does nothing."""
        self._stack.close()

    # --- sessions -------------------------------------------------------------------------
    def hold(self) -> contextlib.AbstractContextManager:
        """Hold the engine's lock through the steps, so that a step gathering pieces lets this
        caller in first (sessions exist only once the context is open)."""
        return self.steps.hold()

    def session(self, seq_id: int, policy: KVPolicy, recall: Recall | None, seed: int) -> Session:
        """The session on sequence seq_id, made on first use with its own copy of policy."""
        with self.hold():
            if seq_id not in self.sessions:
                self.sessions[seq_id] = Session(self, seq_id, copy.deepcopy(policy), recall, seed)
            return self.sessions[seq_id]

    def drop_session(self, seq_id: int) -> None:
        """Free the session's cells and forget it."""
        with self.hold():
            session = self.sessions.pop(seq_id, None)
            if session is not None:
                session.close()

    def check_architecture(self, policy: KVPolicy, recall: Recall | None) -> None:
        """ValueError where this model's cache cannot do what the policy and recall tier need."""
        if not policy.evicts:
            return
        model = self.model.model
        rope = lc.llama_model_rope_type(model)
        if rope in (lc.LLAMA_ROPE_TYPE_MROPE, lc.LLAMA_ROPE_TYPE_IMROPE, lc.LLAMA_ROPE_TYPE_VISION):
            if policy.reposition:
                raise ValueError(
                    "this model uses M-RoPE, whose keys cannot be re-rotated to new positions: "
                    f"evict without re-positioning ({type(policy).__name__}(..., "
                    "reposition=False)) or use kv_policy='full'"
                )
            if recall is not None:
                raise ValueError(
                    "the recall tier writes stored keys back by 1-D position; this model uses "
                    "M-RoPE: stream without recall"
                )
        if lc.llama_model_is_recurrent(model) or lc.llama_model_is_hybrid(model):
            raise ValueError(
                "recurrent/hybrid models have no per-token KV cache to evict; use kv_policy='full'"
            )
        if lc.llama_model_n_swa(model) > 0 and recall is not None:
            raise ValueError(
                "this model uses sliding-window attention (an iSWA cache, as Gemma 2/3 and gpt-oss "
                "have); evicting policies serve it, the recall tier does not (it copies rows of a "
                "plain KV cache): stream without recall"
            )

    # --- tokens ---------------------------------------------------------------------------
    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return self.model.tokenize(data, add_bos, special)

    def detokenize(self, tokens: list[int], special: bool = False) -> bytes:
        return self.model.detokenize(list(tokens), special)

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (part of a character where a token splits one)."""
        buf = ctypes.create_string_buffer(128)
        n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[: max(n, 0)]

    def token_ids(self, tokens: Any) -> list[int]:
        """tokens as a list of ids, each an int in [0, n_vocab); ValueError otherwise."""
        ids = list(tokens)
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self.n_vocab:
                raise ValueError(f"token ids must be integers in [0, {self.n_vocab}), got {t!r}")
        return [int(t) for t in ids]

    def is_eog(self, token: int) -> bool:
        return bool(lc.llama_vocab_is_eog(self.vocab, token))

    def _chat_formatter(self, chat_format: str | None) -> ChatFormatter | None:
        """A named llama-cpp-python format, else the GGUF's own template (None without one)."""
        if chat_format is not None:
            return CHAT_FORMATS[chat_format]
        template = self.model.metadata().get("tokenizer.chat_template")
        if not template:
            return None

        def text(token: int) -> str:
            return self.piece(token, special=True).decode("utf-8", "ignore") if token >= 0 else ""

        return Jinja2ChatFormatter(
            template=template,
            eos_token=text(lc.llama_vocab_eos(self.vocab)),
            bos_token=text(lc.llama_vocab_bos(self.vocab)),
        )

    def render_chat(self, messages: list[dict]) -> tuple[Any, list[Any]]:
        """The chat template's rendering of messages (each image as the projector's marker), and
        the images in order; ValueError for messages the template cannot render."""
        if self.chat_formatter is None:
            raise ValueError(f"{self.model_path.name} has no chat template")
        marker = self.projector.marker if self.projector is not None else None
        flat, images = flatten_messages(messages, marker)
        try:
            return self.chat_formatter(messages=flat), images
        except (jinja2.TemplateError, TypeError, KeyError, AttributeError) as exc:
            # a message the template does not expect (a missing content, an odd role): the caller's
            raise ValueError(f"the chat template cannot render these messages: {exc}") from exc

    def require_projector(self) -> Projector:
        if self.projector is None:
            raise ValueError("images need a projector: create the Llama with mmproj_path=...")
        return self.projector

    def prompt_parts(self, prompt: str | list[int]) -> list[Part]:
        """A completion's prompt (text, or token ids) as the one text part to feed."""
        if isinstance(prompt, str):
            tokens = self.tokenize(prompt, add_bos=True, special=True)
        else:
            tokens = self.token_ids(prompt)
        if not tokens:
            raise ValueError("the prompt tokenises to no tokens")
        return [TextPart(np.asarray(tokens, np.int32))]

    def chat_parts(self, messages: list[dict]) -> tuple[list[Part], list[str]]:
        """A chat request's prompt as parts to feed (text, and images where the messages have
        any), and the stop strings its chat format adds (a named format's end-of-turn text)."""
        rendered, images = self.render_chat(messages)
        if images:
            parts = self.require_projector().tokenize(rendered.prompt, images, not rendered.added_special)
        else:
            parts = [TextPart(self.chat_tokens(rendered))]
        return parts, stop_list(rendered.stop)

    def chat_tokens(self, rendered: Any) -> np.ndarray:
        """The token ids of a rendered chat prompt (BOS unless the template put it there)."""
        return np.asarray(self.tokenize(rendered.prompt, not rendered.added_special, special=True), np.int32)

    def describe(self) -> dict[str, Any]:
        """The model's identity, as a saved session records it."""
        model = self.model.model
        desc = ctypes.create_string_buffer(256)
        lc.llama_model_desc(model, desc, len(desc))
        return {
            "desc": desc.value.decode("utf-8", "replace"),
            "n_params": lc.llama_model_n_params(model),
            "n_vocab": self.n_vocab,
            "n_embd": lc.llama_model_n_embd(model),
            "n_layer": lc.llama_model_n_layer(model),
        }

    # --- embeddings -----------------------------------------------------------------------
    def embed(self, texts: list[str], normalize: bool, truncate: bool) -> tuple[list[Any], int]:
        """One vector (or one per token) per text from the embedding context, and the tokens used."""
        if self.embedder is None:
            raise RuntimeError("embeddings need a Llama created with embedding=True")
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("input must be a string or a non-empty list of strings")
        tokens = [self.tokenize(t) for t in texts]
        if truncate:
            tokens = [t[: self.n_batch] for t in tokens]
        elif max(map(len, tokens)) > self.n_batch:
            raise ValueError(f"an input of {max(map(len, tokens))} tokens exceeds n_batch ({self.n_batch})")
        return self.embedder.embed(tokens, normalize), sum(len(t) for t in tokens)
