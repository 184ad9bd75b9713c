"""The OpenAI-compatible routes over a `SlotPool`: each request is parsed and checked off the
event loop, finds its conversation, and runs as one atomic turn of that conversation's session.

A turn is undone (the session becomes what it was before the request) when it fails, when its
client goes away (checked between prompt pieces and before each token; a stream counts as in
flight until it ends) or when its deadline passes before the first token; a deadline passed
while generating ends the reply there, finish_reason "length".  A streamed request answers
with an HTTP error until its first chunk exists, and with an SSE error event after that.
Decoding is serialised: the slots share one llama_context, so one turn decodes at a time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from infmllm_gguf.grammar import check_grammar
from infmllm_gguf.llama import HistoryDivergedError, Llama, StopGeneration
from infmllm_gguf.server.config import ServerConfig
from infmllm_gguf.server.guard import Guard, error_body
from infmllm_gguf.server.media import MediaPolicy
from infmllm_gguf.server.schemas import (
    CHAT_ONLY,
    COMPLETION_ONLY,
    SAMPLING,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from infmllm_gguf.server.sessions import Busy, QuotaFull, SaveFailed, SlotPool

__all__ = ["make_app"]

log = logging.getLogger("infmllm_gguf.server")
BIAS_BOUND = 100.0  # logit_bias values are clamped to [-100, 100], as OpenAI does
POLL_S = 0.1  # how often a waiting request checks whether its client is still there


class RequestError(Exception):
    """A request refused with an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


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


def make_app(llm: Llama, pool: SlotPool, config: ServerConfig) -> FastAPI:
    limits, access, model_id = config.limits, config.access, config.model_id
    root = access.media_path.resolve() if access.media_path is not None else None
    media = MediaPolicy(limits.max_images, limits.max_image_bytes, limits.max_image_pixels, root)
    app = FastAPI(title="infmllm-gguf")
    app.add_middleware(Guard, access=access, max_body_bytes=limits.max_body_bytes)
    in_flight = {"n": 0}
    capacity = llm.n_slots + config.max_queue
    n_vocab = llm.n_vocab()

    # --- checking a request (in a worker thread: parsing, images and tokens take time) ----------
    def parse(raw: bytes, model: type[BaseModel]) -> Any:
        try:
            body = json.loads(raw, parse_constant=_no_constant)
        except RecursionError:
            raise RequestError(400, "the JSON body nests too deeply") from None
        except ValueError as exc:
            raise RequestError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        request = model.model_validate(body)
        if request.model not in (None, model_id) and access.strict_model_name:
            raise RequestError(404, f"model {request.model!r} does not exist; this server has {model_id!r}",
                               "model_not_found")  # fmt: skip
        return request

    def sampling(request: ChatRequest | CompletionRequest, chat: bool) -> dict[str, Any]:
        names = set(SAMPLING + (CHAT_ONLY if chat else COMPLETION_ONLY))
        kwargs = request.model_dump(include=names, exclude_none=True)
        if chat and request.max_completion_tokens is not None:
            kwargs["max_tokens"] = request.max_completion_tokens
        asked = kwargs.get("max_tokens") or 0
        if asked > limits.max_tokens:
            raise RequestError(400, f"max_tokens is {asked}; at most {limits.max_tokens} are generated")
        kwargs["max_tokens"] = asked or min(llm.n_ctx(), limits.max_tokens)
        if "logit_bias" in kwargs:
            kwargs["logit_bias"] = _logit_bias(kwargs["logit_bias"], n_vocab)
        stops = [kwargs["stop"]] if isinstance(kwargs.get("stop"), str) else kwargs.get("stop", [])
        if len(stops) > limits.max_stops or any(len(s) > limits.max_stop_chars for s in stops):
            raise RequestError(
                400, f"at most {limits.max_stops} stop strings of {limits.max_stop_chars} characters each"
            )
        n_top = kwargs.get("top_logprobs" if chat else "logprobs")
        if n_top is not None and n_top > limits.max_top_logprobs:
            name = "top_logprobs" if chat else "logprobs"
            raise RequestError(400, f"{name} must be at most {limits.max_top_logprobs}, got {n_top}")
        if "grammar" in kwargs:
            check_grammar(kwargs["grammar"])
        kwargs["model"] = model_id
        return kwargs

    def check_prompt(prompt: np.ndarray) -> np.ndarray:
        if len(prompt) > limits.max_prompt_tokens:
            raise RequestError(
                400, f"the prompt has {len(prompt)} tokens; at most {limits.max_prompt_tokens} are taken"
            )
        return prompt

    def prepare(raw: bytes, chat: bool, header_sid: str | None, started: float) -> Turn:
        request = parse(raw, ChatRequest if chat else CompletionRequest)
        kwargs = sampling(request, chat)
        if chat:
            messages = media.prepare([m.model_dump(exclude_none=True) for m in request.messages])
            payload, prompt = messages, check_prompt(llm.chat_prompt_tokens(messages))
        elif isinstance(request.prompt, str):
            payload = request.prompt
            prompt = check_prompt(np.asarray(llm.tokenize(request.prompt, special=True), np.int32))
        else:
            payload = llm.engine.token_ids(request.prompt)  # the library's own check, before a slot is taken
            prompt = check_prompt(np.asarray(payload, np.int32))
        sid = header_sid or request.user
        return Turn(chat, request.stream, sid or None, prompt, payload, kwargs, started + limits.timeout)

    # --- running a turn (in a worker thread) ------------------------------------------------------
    def in_session(turn: Turn, cancel: threading.Event, work: Callable[[Llama], Any]) -> Any:
        """work(session) as one atomic turn of the request's conversation.  An anonymous request
        that departs from the conversation its prefix found starts a new one instead."""
        fresh = False
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

    async def plain(request: Request, turn: Turn) -> Any:
        cancel = threading.Event()
        future = asyncio.ensure_future(run_in_threadpool(in_session, turn, cancel, turn.call))
        await _watch(request, future, cancel)
        return JSONResponse(future.result())

    async def streamed(request: Request, turn: Turn) -> Response:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def push(kind: str, item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, item))

        def work(session: Llama) -> None:
            for chunk in turn.call(session):
                push("chunk", chunk)

        def produce() -> None:
            try:
                in_session(turn, stop, work)
            except BaseException as exc:  # noqa: BLE001 - handed to the event loop
                push("error", exc)
            finally:
                push("end", None)

        threading.Thread(target=produce, daemon=True, name="infmllm-stream").start()
        first = asyncio.ensure_future(queue.get())
        await _watch(request, first, stop)
        kind, item = first.result()
        if kind == "error":
            raise item
        if kind == "end":
            raise RuntimeError("the stream ended before its first chunk")
        request_id = request.scope["state"]["request_id"]

        async def events() -> AsyncIterator[str]:
            try:
                yield json.dumps(item)
                while True:
                    kind, chunk = await queue.get()
                    if kind == "chunk":
                        yield json.dumps(chunk)
                    elif kind == "error":
                        status, body = _error(chunk, request_id)
                        yield json.dumps(body)
                        return
                    else:
                        break
                yield "[DONE]"
            finally:
                stop.set()  # the client went away, or the stream ended: the producer stops

        return _Stream(events(), on_close=stop.set, ping=15)

    async def admitted(request: Request, serve: Callable[[bytes], Awaitable[Response]]) -> Response:
        """serve(body) within the capacity (503 beyond it), every failure an HTTP answer; a
        stream stays in flight until it ends."""
        request_id = request.scope["state"]["request_id"]
        if in_flight["n"] >= capacity:
            pool.metrics.rejected += 1
            return _respond(503, error_body("the server is at capacity; retry later", "server_busy"),
                            {"Retry-After": "1"}, pool)  # fmt: skip
        in_flight["n"] += 1
        handed_off = False
        try:
            started = time.monotonic()
            response = await serve(await request.body())
            if isinstance(response, _Stream):
                response.on_close = _chain(response.on_close, lambda: _done(in_flight))
                handed_off = True
            pool.metrics.requests += 1
            pool.metrics.request_seconds += time.monotonic() - started
            return response
        except Exception as exc:  # noqa: BLE001 - every failure becomes an HTTP answer
            status, body = _error(exc, request_id)
            return _respond(status, body, _retry_headers(status), pool)
        finally:
            if not handed_off:
                _done(in_flight)

    async def completion(request: Request, raw: bytes, chat: bool) -> Response:
        sid = request.headers.get("x-session-id")
        turn = await run_in_threadpool(prepare, raw, chat, sid, time.monotonic())
        return await (streamed(request, turn) if turn.stream else plain(request, turn))

    async def embed(raw: bytes) -> Response:
        body = await run_in_threadpool(parse, raw, EmbeddingRequest)
        texts = body.input
        if isinstance(texts, list) and len(texts) > limits.max_embedding_inputs:
            raise RequestError(400, f"at most {limits.max_embedding_inputs} inputs per request")
        result = await run_in_threadpool(llm.create_embedding, texts, model_id)
        if body.encoding_format == "base64":
            for item in result["data"]:
                floats = np.asarray(item["embedding"], "<f4")
                item["embedding"] = base64.b64encode(floats.tobytes()).decode()
        return JSONResponse(result)

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatRequest))
    async def chat_completions(request: Request) -> Response:
        return await admitted(request, lambda raw: completion(request, raw, chat=True))

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request) -> Response:
        return await admitted(request, lambda raw: completion(request, raw, chat=False))

    @app.post("/v1/embeddings", openapi_extra=_body_schema(EmbeddingRequest))
    async def embeddings(request: Request) -> Response:
        return await admitted(request, embed)

    @app.get("/v1/models")
    async def models() -> Any:
        card = {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "infmllm-gguf"}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok", "slots": llm.n_slots, "slots_busy": pool.busy_slots}

    if access.metrics:

        @app.get("/metrics")
        async def metrics() -> Any:
            return PlainTextResponse(prometheus(pool, in_flight["n"]))

    _with_bodies(app)

    @app.exception_handler(Exception)
    async def server_fault(request: Request, exc: Exception) -> Response:
        status, body = _error(exc, request.scope.get("state", {}).get("request_id", "-"))
        return JSONResponse(body, status_code=status)

    return app


class _Stream(EventSourceResponse):
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
    def poll() -> None:
        if cancel.is_set():
            raise Cancelled("the client went away")
        if time.monotonic() > deadline:
            raise StopGeneration

    return poll


def _error(exc: BaseException, request_id: str) -> tuple[int, dict]:
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


def _respond(status: int, body: dict, headers: dict[str, str], pool: SlotPool) -> JSONResponse:
    pool.metrics.status[status] = pool.metrics.status.get(status, 0) + 1
    return JSONResponse(body, status_code=status, headers=headers or None)


def _retry_headers(status: int) -> dict[str, str]:
    return {"Retry-After": "1"} if status in (429, 503) else {}


def _done(in_flight: dict[str, int]) -> None:
    in_flight["n"] -= 1


def _chain(*calls: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        for call in calls:
            call()

    return run


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _logit_bias(bias: dict[str, float], n_vocab: int) -> dict[int, float]:
    """Token ids checked against the vocabulary, values clamped to [-100, 100] as OpenAI does."""
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise RequestError(400, f"logit_bias keys must be token ids, got {key!r}") from None
        if not 0 <= token < n_vocab:
            raise RequestError(400, f"logit_bias token ids must be in [0, {n_vocab}), got {token}")
        out[token] = min(BIAS_BOUND, max(-BIAS_BOUND, value))
    return out


BODIES = (ChatRequest, CompletionRequest, EmbeddingRequest)


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads its body itself (so that parsing runs
    off the event loop and every error is ours to word); `_with_bodies` adds the schemas."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _with_bodies(app: FastAPI) -> None:
    """Put the request bodies' schemas (and those they use) into the app's OpenAPI components."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = plain()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in BODIES:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
        return app.openapi_schema

    app.openapi = openapi


def prometheus(pool: SlotPool, in_flight: int) -> str:
    m = pool.metrics
    slots = pool.slot_stats
    lines = [
        "# TYPE infmllm_slots gauge",
        f"infmllm_slots {len(slots)}",
        "# TYPE infmllm_slots_busy gauge",
        f"infmllm_slots_busy {pool.busy_slots}",
        "# TYPE infmllm_requests_in_flight gauge",
        f"infmllm_requests_in_flight {in_flight}",
        "# TYPE infmllm_requests_total counter",
        f"infmllm_requests_total {m.requests}",
        "# TYPE infmllm_requests_rejected_total counter",
        f"infmllm_requests_rejected_total {m.rejected}",
        "# TYPE infmllm_turns_undone_total counter",
        f"infmllm_turns_undone_total {m.cancelled}",
        "# TYPE infmllm_errors_total counter",
        *(f'infmllm_errors_total{{status="{s}"}} {n}' for s, n in sorted(m.status.items())),
        "# TYPE infmllm_tokens_decoded_total counter",
        f"infmllm_tokens_decoded_total {m.tokens_decoded}",
        "# TYPE infmllm_tokens_per_second gauge",
        f"infmllm_tokens_per_second {m.tokens_decoded / max(m.request_seconds, 1e-9):.3f}",
        "# TYPE infmllm_sessions_saved_total counter",
        f"infmllm_sessions_saved_total {m.sessions_saved}",
        "# TYPE infmllm_sessions_restored_total counter",
        f"infmllm_sessions_restored_total {m.sessions_restored}",
        "# TYPE infmllm_sessions_removed_total counter",
        f"infmllm_sessions_removed_total {m.sessions_removed}",
        "# TYPE infmllm_sessions_set_aside_total counter",
        f"infmllm_sessions_set_aside_total {m.sessions_set_aside}",
        "# TYPE infmllm_session_save_failures_total counter",
        f"infmllm_session_save_failures_total {m.save_failures}",
        "# TYPE infmllm_slot_cells gauge",
        *(f'infmllm_slot_cells{{slot="{i}"}} {s["n_cached"]}' for i, s in enumerate(slots)),
        "# TYPE infmllm_slot_evictions_total counter",
        *(f'infmllm_slot_evictions_total{{slot="{i}"}} {s["evictions"]}' for i, s in enumerate(slots)),
    ]
    if slots and "recalls" in slots[0]:  # the recall tier is on
        for name, kind, key in RECALL_METRICS:
            lines.append(f"# TYPE infmllm_slot_{name} {kind}")
            lines.extend(f'infmllm_slot_{name}{{slot="{i}"}} {s[key]:g}' for i, s in enumerate(slots))
    return "\n".join(lines) + "\n"


RECALL_METRICS = (  # (metric, Prometheus type, kv_stats key) per slot, with the recall tier on
    ("recall_pages_stored", "gauge", "pages_stored"),
    ("recall_store_mb", "gauge", "store_mb"),
    ("recalls_total", "counter", "recalls"),
    ("recall_pages_recalled_total", "counter", "pages_recalled"),
)
