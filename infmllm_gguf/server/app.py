"""The OpenAI-compatible routes over a `SlotPool`: every request passes `Guard` (`guard.py`), is
admitted within the capacity (slots plus queue; 503 beyond it) and has every failure answered
as an HTTP error (`turns.error_of`).  Completions run as atomic turns of their conversation's
session (`turns.py`); decoding is serialised, since the slots share one llama_context.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from infmllm_gguf.llama import Llama
from infmllm_gguf.server.config import ServerConfig
from infmllm_gguf.server.guard import Guard, error_body
from infmllm_gguf.server.metrics import InFlight, prometheus
from infmllm_gguf.server.requests import RequestChecks, RequestError
from infmllm_gguf.server.schemas import ChatRequest, CompletionRequest, EmbeddingRequest
from infmllm_gguf.server.sessions import SlotPool
from infmllm_gguf.server.turns import EventStream, TurnRunner, error_of

__all__ = ["make_app"]

BODIES = (ChatRequest, CompletionRequest, EmbeddingRequest)


def make_app(llm: Llama, pool: SlotPool, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="infmllm-gguf")
    app.add_middleware(Guard, access=config.access, max_body_bytes=config.limits.max_body_bytes)
    routes = Routes(llm, pool, config)
    app.add_api_route("/v1/chat/completions", routes.chat_completions, methods=["POST"],
                      openapi_extra=_body_schema(ChatRequest))  # fmt: skip
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"],
                      openapi_extra=_body_schema(CompletionRequest))  # fmt: skip
    app.add_api_route("/v1/embeddings", routes.embeddings, methods=["POST"],
                      openapi_extra=_body_schema(EmbeddingRequest))  # fmt: skip
    app.add_api_route("/v1/models", routes.models, methods=["GET"])
    app.add_api_route("/health", routes.health, methods=["GET"])
    if config.access.metrics:
        app.add_api_route("/metrics", routes.metrics, methods=["GET"])
    _with_bodies(app)
    app.add_exception_handler(Exception, _server_fault)
    return app


class Routes:
    """The endpoints of one server.  Each POST is admitted within the capacity, and a stream
    stays in flight until it ends."""

    def __init__(self, llm: Llama, pool: SlotPool, config: ServerConfig):
        self.llm, self.pool, self.model_id = llm, pool, config.model_id
        self.max_embedding_inputs = config.limits.max_embedding_inputs
        self.checks = RequestChecks(
            config.limits, config.model_id, config.access.strict_model_name, llm.n_ctx(), llm.n_vocab()
        )
        self.runner = TurnRunner(llm, pool, self.checks, config)
        self.in_flight = InFlight(llm.n_slots + config.max_queue)

    async def chat_completions(self, request: Request) -> Response:
        return await self.admitted(request, lambda raw: self.runner.completion(request, raw, chat=True))

    async def completions(self, request: Request) -> Response:
        return await self.admitted(request, lambda raw: self.runner.completion(request, raw, chat=False))

    async def embeddings(self, request: Request) -> Response:
        return await self.admitted(request, self.embed)

    async def models(self) -> Any:
        card = {"id": self.model_id, "object": "model", "created": int(time.time())}
        return {"object": "list", "data": [{**card, "owned_by": "infmllm-gguf"}]}

    async def health(self) -> Any:
        return {"status": "ok", "slots": self.llm.n_slots, "slots_busy": self.pool.busy_slots}

    async def metrics(self) -> Any:
        return PlainTextResponse(prometheus(self.pool, self.in_flight.n, self.llm.engine.steps.stats))

    async def admitted(self, request: Request, serve: Callable[[bytes], Awaitable[Response]]) -> Response:
        """serve(body) within the capacity (503 beyond it), every failure an HTTP answer."""
        request_id = request.scope["state"]["request_id"]
        metrics = self.pool.metrics
        if not self.in_flight.enter():
            metrics.rejected += 1
            return self._respond(503, error_body("the server is at capacity; retry later", "server_busy"))
        handed_off = False
        try:
            started = time.monotonic()
            response = await serve(await request.body())
            if isinstance(response, EventStream):
                response.on_close = _chain(response.on_close, self.in_flight.leave)
                handed_off = True
            metrics.requests += 1
            metrics.request_seconds += time.monotonic() - started
            return response
        except Exception as exc:  # noqa: BLE001 - every failure becomes an HTTP answer
            return self._respond(*error_of(exc, request_id))
        finally:
            if not handed_off:
                self.in_flight.leave()

    async def embed(self, raw: bytes) -> Response:
        body = await run_in_threadpool(self.checks.parse, raw, EmbeddingRequest)
        texts = body.input
        if isinstance(texts, list) and len(texts) > self.max_embedding_inputs:
            raise RequestError(400, f"at most {self.max_embedding_inputs} inputs per request")
        result = await run_in_threadpool(self.llm.create_embedding, texts, self.model_id)
        if body.encoding_format == "base64":
            for item in result["data"]:
                floats = np.asarray(item["embedding"], "<f4")
                item["embedding"] = base64.b64encode(floats.tobytes()).decode()
        return JSONResponse(result)

    def _respond(self, status: int, body: dict) -> JSONResponse:
        """An error response, counted by status; 429 and 503 say when to retry."""
        counts = self.pool.metrics.status
        counts[status] = counts.get(status, 0) + 1
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        return JSONResponse(body, status_code=status, headers=headers)


async def _server_fault(request: Request, exc: Exception) -> Response:
    status, body = error_of(exc, request.scope.get("state", {}).get("request_id", "-"))
    return JSONResponse(body, status_code=status)


def _chain(*calls: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        for call in calls:
            call()

    return run


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
