"""A completion request as one atomic turn of its conversation's session.

A request is checked and prepared off the event loop (`TurnRunner.prepare`), then runs in a
worker thread inside `Llama.turn`: the turn is undone (the session becomes what it was before
the request) when it fails, when its client goes away (checked between prompt pieces and before
each token; a stream counts as in flight until it ends) or when its deadline passes before the
first token; a deadline passed while generating ends the reply there, finish_reason "length".
A streamed request answers with an HTTP error until its first chunk exists, and with an SSE
error event after that.  `error_of` maps every failure to its HTTP status and OpenAI error body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from infmllm_gguf.llama import HistoryDivergedError, Llama, StopGeneration
from infmllm_gguf.server.config import ServerConfig
from infmllm_gguf.server.guard import error_body
from infmllm_gguf.server.media import MediaPolicy
from infmllm_gguf.server.requests import RequestChecks, RequestError
from infmllm_gguf.server.schemas import ChatRequest, CompletionRequest
from infmllm_gguf.server.sessions import Busy, QuotaFull, SaveFailed, SlotPool

__all__ = ["Cancelled", "EventStream", "Turn", "TurnRunner", "error_of"]

log = logging.getLogger("infmllm_gguf.server")
POLL_S = 0.1  # how often a waiting request checks whether its client is still there


class Cancelled(Exception):
    """The client went away: the turn is undone."""


@dataclass
class Turn:
    """A checked request, ready to run in its conversation's session."""

    chat: bool
    stream: bool
    session_id: str | None
    prompt: np.ndarray  # the prompt's tokens, to find the conversation by
    payload: Any  # messages, or the completion prompt
    kwargs: dict[str, Any]
    deadline: float

    def call(self, session: Llama) -> Any:
        if self.chat:
            return session.create_chat_completion(self.payload, stream=self.stream, **self.kwargs)
        return session.create_completion(self.payload, stream=self.stream, **self.kwargs)


class TurnRunner:
    """Completion requests of one server, from their body to their response."""

    def __init__(self, llm: Llama, pool: SlotPool, checks: RequestChecks, config: ServerConfig):
        limits, media_path = config.limits, config.access.media_path
        root = media_path.resolve() if media_path is not None else None
        self.llm, self.pool, self.checks, self.timeout = llm, pool, checks, limits.timeout
        self.media = MediaPolicy(limits.max_images, limits.max_image_bytes, limits.max_image_pixels, root)

    async def completion(self, request: Request, raw: bytes, chat: bool) -> Response:
        """The response to a chat or text completion request whose body is raw."""
        sid = request.headers.get("x-session-id")
        turn = await run_in_threadpool(self.prepare, raw, chat, sid, time.monotonic())
        return await (self.streamed(request, turn) if turn.stream else self.plain(request, turn))

    def prepare(self, raw: bytes, chat: bool, header_sid: str | None, started: float) -> Turn:
        """The request checked, its images checked and its prompt tokenised (in a worker thread:
        parsing, images and tokens take time)."""
        request = self.checks.parse(raw, ChatRequest if chat else CompletionRequest)
        kwargs = self.checks.sampling(request, chat)
        payload, tokens = self._prompt(request) if chat else self._text_prompt(request)
        prompt = self.checks.check_prompt(tokens)
        sid = header_sid or request.user
        return Turn(chat, request.stream, sid or None, prompt, payload, kwargs, started + self.timeout)

    def _prompt(self, request: ChatRequest) -> tuple[list[dict[str, Any]], np.ndarray]:
        """The messages, their images checked, and the prompt they render to."""
        messages = self.media.prepare([m.model_dump(exclude_none=True) for m in request.messages])
        return messages, self.llm.chat_prompt_tokens(messages)

    def _text_prompt(self, request: CompletionRequest) -> tuple[str | list[int], np.ndarray]:
        """The completion prompt as create_completion takes it, and its tokens."""
        if isinstance(request.prompt, str):
            return request.prompt, np.asarray(self.llm.tokenize(request.prompt, special=True), np.int32)
        ids = self.llm.engine.token_ids(request.prompt)  # the library's own check, before a slot is taken
        return ids, np.asarray(ids, np.int32)

    def run(self, turn: Turn, cancel: threading.Event, work: Callable[[Llama], Any]) -> Any:
        """work(session) as one atomic turn of the request's conversation (in a worker thread).
        An anonymous request that departs from the conversation its prefix found starts a new
        one instead."""
        pool, fresh = self.pool, False
        while True:
            session, conv = pool.acquire(turn.session_id, turn.prompt, turn.deadline, cancel.is_set, fresh)
            stats, n_before = None, session.n_streamed
            try:
                with session.turn(poll=_poller(cancel, turn.deadline)):
                    result = work(session)
                    stats = session.kv_stats()
                pool.metrics.tokens_decoded += max(0, session.n_streamed - n_before)
                return result
            except HistoryDivergedError:
                if turn.session_id is not None or fresh:
                    raise
                fresh = True
            except BaseException:
                pool.metrics.cancelled += 1
                raise
            finally:
                pool.release(conv, stats)

    async def plain(self, request: Request, turn: Turn) -> Response:
        cancel = threading.Event()
        future = asyncio.ensure_future(run_in_threadpool(self.run, turn, cancel, turn.call))
        await _watch(request, future, cancel)
        return JSONResponse(future.result())

    async def streamed(self, request: Request, turn: Turn) -> Response:
        """An SSE response once the turn's first chunk exists (its failure before that raises)."""
        feed = _Feed(self, turn)
        first = await feed.first(request)
        events = feed.events(first, request.scope["state"]["request_id"])
        return EventStream(events, on_close=feed.stop.set, ping=15)


class _Feed:
    """A streamed turn's chunks, made in a thread of its own and queued for the event loop as
    ("chunk", chunk), then ("error", exception) if it fails, then ("end", None).  Setting
    `stop` undoes the turn (the client went away) or, once it is done, changes nothing."""

    def __init__(self, runner: TurnRunner, turn: Turn):
        self.runner, self.turn = runner, turn
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stop = threading.Event()
        threading.Thread(target=self._produce, daemon=True, name="infmllm-stream").start()

    def _push(self, kind: str, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, item))

    def _work(self, session: Llama) -> None:
        for chunk in self.turn.call(session):
            self._push("chunk", chunk)

    def _produce(self) -> None:
        try:
            self.runner.run(self.turn, self.stop, self._work)
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop
            self._push("error", exc)
        finally:
            self._push("end", None)

    async def first(self, request: Request) -> Any:
        """The first chunk, waited for while watching the client; a failure before it raises."""
        first = asyncio.ensure_future(self.queue.get())
        await _watch(request, first, self.stop)
        kind, item = first.result()
        if kind == "error":
            raise item
        if kind == "end":
            raise RuntimeError("the stream ended before its first chunk")
        return item

    async def events(self, first: Any, request_id: str) -> AsyncIterator[str]:
        """The SSE data: the chunks as JSON, then "[DONE]" or an error event."""
        try:
            yield json.dumps(first)
            while True:
                kind, chunk = await self.queue.get()
                if kind == "chunk":
                    yield json.dumps(chunk)
                elif kind == "error":
                    status, body = error_of(chunk, request_id)
                    yield json.dumps(body)
                    return
                else:
                    break
            yield "[DONE]"
        finally:
            self.stop.set()  # the client went away, or the stream ended: the producer stops


class EventStream(EventSourceResponse):
    """An SSE response that runs `on_close` however it ends, also if it never starts sending."""

    def __init__(self, *args: Any, on_close: Callable[[], None], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _watch(request: Request, future: asyncio.Future, cancel: threading.Event) -> None:
    """Wait for future, setting cancel as soon as the client goes away."""
    while not future.done():
        await asyncio.wait({future}, timeout=POLL_S)
        if not future.done() and not cancel.is_set() and await request.is_disconnected():
            cancel.set()


def _poller(cancel: threading.Event, deadline: float) -> Callable[[], None]:
    """The turn's poll hook: Cancelled once the client is gone, StopGeneration past the deadline."""

    def poll() -> None:
        if cancel.is_set():
            raise Cancelled("the client went away")
        if time.monotonic() > deadline:
            raise StopGeneration

    return poll


def error_of(exc: BaseException, request_id: str) -> tuple[int, dict]:
    """The HTTP status and OpenAI error body of a failed request; server faults are logged."""
    if isinstance(exc, RequestError):
        return exc.status, error_body(str(exc), exc.kind)
    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5]
        )
        return 400, error_body(f"invalid request: {problems}")
    if isinstance(exc, HistoryDivergedError):
        return 409, error_body(str(exc), "conflict", "history_diverged")
    if isinstance(exc, Busy):
        return 503, error_body(str(exc), "server_busy")
    if isinstance(exc, QuotaFull):
        return 429, error_body(str(exc), "quota_exceeded")
    if isinstance(exc, SaveFailed):
        log.error("request %s: %s", request_id, exc)
        return 503, error_body(f"{exc} (request {request_id})", "server_busy")
    if isinstance(exc, StopGeneration):
        return 503, error_body("the request passed its deadline (--timeout) before a first token", "timeout")
    if isinstance(exc, Cancelled):
        return 400, error_body("the request was cancelled: its client went away", "cancelled")
    if isinstance(exc, (ValueError, TypeError, FileNotFoundError)):
        return 400, error_body(str(exc))
    log.error("request %s failed", request_id, exc_info=exc)
    return 500, error_body(f"internal error (request {request_id}); the server log has it", "server_error")
