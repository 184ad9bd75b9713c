"""An OpenAI-compatible server of many endless conversations in the sequence slots of one context.

Each conversation is a stream of its own: while it is in a slot it keeps its cells, policy
state and recall store there, bounded by the budget however long it runs.  A request finds its
conversation by session id (the `X-Session-Id` header, else OpenAI's `user` field) or, without
one, by the longest prefix its prompt shares with a known conversation.  When every slot is
taken, the least recently used idle conversation is saved to `sessions_dir` with
`save_session` and its slot reused; it is restored on its next request, also after a restart.

Decoding is serialised: the slots share one llama_context, so one request decodes at a time
and the others wait their turn (at most `max_queue` of them; beyond that 503 with Retry-After).
Built on FastAPI, uvicorn and sse-starlette, the stack llama-cpp-python's server uses.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from infmllm_gguf.llama import Llama
from infmllm_gguf.recall import Recall
from infmllm_gguf.state import StateError

__all__ = ["ServerConfig", "SlotPool", "make_app", "serve"]

SESSION_SUFFIX = ".session"
# request fields passed on to create_completion / create_chat_completion
SAMPLING = (
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "typical_p", "stop", "seed", "presence_penalty",
    "frequency_penalty", "repeat_penalty", "mirostat_mode", "mirostat_tau", "mirostat_eta", "logit_bias",
    "grammar",
)  # fmt: skip
CHAT_ONLY = (
    "response_format",
    "logprobs",
    "top_logprobs",
    "tools",
    "functions",
    "tool_choice",
    "function_call",
)
COMPLETION_ONLY = ("logprobs", "echo", "suffix")


@dataclass
class ServerConfig:
    """What `infmllm-gguf serve` runs: a model, a policy per slot, the slots and the queue."""

    model: str | None = None
    mmproj: str | None = None
    kv_policy: str = "infmllm"
    budget: int = 1024
    reposition: bool = True
    flash_attn: bool = False
    n_ctx: int | None = None  # per slot; default budget + chunk
    slots: int = 8
    sessions_dir: str = "infmllm-sessions"
    max_queue: int = 32
    model_alias: str | None = None
    recall: Recall | None = None  # the recall tier of every slot's stream
    n_threads: int | None = None
    pooling: str = "mean"  # /v1/embeddings: one vector per input

    def make_llama(self) -> Llama:
        from infmllm_gguf._llama_cpp import llama_cpp as lc
        from infmllm_gguf.policies import make_policy

        policy = make_policy(self.kv_policy, budget=self.budget, reposition=self.reposition)
        n_ctx = self.n_ctx or (policy.capacity if self.kv_policy != "full" else 2048)
        return Llama(
            self.model, kv_policy=policy, n_ctx=n_ctx, n_slots=self.slots, mmproj_path=self.mmproj,
            recall=self.recall, embedding=True, n_threads=self.n_threads, seed=0,
            flash_attn=self.flash_attn,
            pooling_type=getattr(lc, f"LLAMA_POOLING_TYPE_{self.pooling.upper()}"),
        )  # fmt: skip


class Busy(Exception):
    """No slot and no room in the queue: the client should retry later."""


@dataclass
class Conversation:
    key: str  # the file stem: a hash of the session id, or a random id
    slot: int | None = None
    history: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # while not in a slot
    last_used: float = 0.0
    busy: int = 0  # requests using it now


@dataclass
class Metrics:
    requests: int = 0
    rejected: int = 0
    errors: int = 0
    tokens_decoded: int = 0  # prompt tokens fed and tokens generated
    request_seconds: float = 0.0
    sessions_saved: int = 0
    sessions_restored: int = 0


class SlotPool:
    """Conversations ↔ the slots of one Llama; saves the least recently used idle one to disk
    when a slot is needed, restores it on demand.  Thread-safe."""

    def __init__(self, llm: Llama, sessions_dir: str | Path, wait_s: float = 600.0):
        self.llm = llm
        self.dir = Path(sessions_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.wait_s = wait_s
        self.metrics = Metrics()
        self._cond = threading.Condition()
        self._slots: list[str | None] = [None] * llm.n_slots
        self._convs: dict[str, Conversation] = {}
        for path in sorted(self.dir.glob(f"*{SESSION_SUFFIX}")):  # conversations of earlier runs
            self._convs[path.stem] = Conversation(path.stem, history=_saved_history(path))

    @staticmethod
    def key_of(session_id: str) -> str:
        return hashlib.sha256(session_id.encode()).hexdigest()[:40]

    def _path(self, conv: Conversation) -> Path:
        return self.dir / f"{conv.key}{SESSION_SUFFIX}"

    def _route(self, session_id: str | None, prompt: np.ndarray) -> Conversation:
        if session_id is not None:
            key = self.key_of(session_id)
            return self._convs.setdefault(key, Conversation(key))
        best, best_common = None, 0
        for conv in self._convs.values():
            history = conv.history if conv.slot is None else self.llm.slot(conv.slot).history
            m = min(len(history), len(prompt))
            diverge = np.flatnonzero(history[:m] != prompt[:m])
            common = int(diverge[0]) if len(diverge) else m
            # a continuation shares most of the conversation, not just a system prompt
            if common > best_common and common >= len(history) / 2:
                best, best_common = conv, common
        if best is None:
            best = Conversation(uuid.uuid4().hex)
            self._convs[best.key] = best
        return best

    def _free_slot(self) -> int | None:
        if None in self._slots:
            return self._slots.index(None)
        idle = [self._convs[k] for k in self._slots if k is not None and self._convs[k].busy == 0]
        if not idle:
            return None
        victim = min(idle, key=lambda c: c.last_used)
        slot = victim.slot
        llm = self.llm.slot(slot)
        llm.save_session(self._path(victim))
        victim.history = np.array(llm.history)
        llm.reset()
        victim.slot = None
        self._slots[slot] = None
        self.metrics.sessions_saved += 1
        return slot

    def acquire(self, session_id: str | None, prompt: np.ndarray) -> tuple[Llama, Conversation]:
        """The slot session of the request's conversation, brought into a slot if need be."""
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            conv = self._route(session_id, prompt)
            conv.busy += 1
            try:
                while conv.slot is None:
                    slot = self._free_slot()
                    if slot is not None:
                        break
                    if not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                        raise Busy("every slot is busy")
                if conv.slot is None:
                    conv.slot = slot
                    self._slots[slot] = conv.key
                    path = self._path(conv)
                    if path.exists():
                        try:
                            self.llm.slot(slot).load_session(path)
                            self.metrics.sessions_restored += 1
                        except (StateError, OSError):
                            self.llm.slot(slot).reset()  # a file of another setup: start afresh
            except BaseException:
                conv.busy -= 1
                raise
            return self.llm.slot(conv.slot), conv

    def release(self, conv: Conversation) -> None:
        with self._cond:
            conv.busy -= 1
            conv.last_used = time.monotonic()
            self._cond.notify_all()

    def save_all(self) -> None:
        """Save every conversation in a slot (at shutdown), so a restart finds them."""
        with self._cond:
            for slot, key in enumerate(self._slots):
                if key is not None:
                    self.llm.slot(slot).save_session(self._path(self._convs[key]))
                    self.metrics.sessions_saved += 1

    def snapshot(self) -> list[dict[str, Any]]:
        with self._cond:
            return [
                {"slot": i, "busy": bool(k and self._convs[k].busy), "stats": self.llm.slot(i).kv_stats()}
                for i, k in enumerate(self._slots)
            ]


def _saved_history(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return np.array(npz["history"], np.int32)
    except Exception:  # noqa: BLE001 - an unreadable file is refused when loaded, not here
        return np.zeros(0, np.int32)


# --- the app ------------------------------------------------------------------------------
def make_app(llm: Llama, pool: SlotPool, model_id: str, max_queue: int) -> FastAPI:
    app = FastAPI(title="infmllm-gguf")
    in_flight = {"n": 0}
    limit = llm.n_slots + max_queue

    def error(status: int, message: str, kind: str = "invalid_request_error", **headers: str) -> JSONResponse:
        body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        return JSONResponse(body, status_code=status, headers=headers or None)

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        if body.get("model") not in (None, model_id):
            raise LookupError(f"model {body.get('model')!r} does not exist; this server has {model_id!r}")
        if body.get("n", 1) != 1:
            raise ValueError("n must be 1")
        return body

    def session_id(request: Request, body: dict) -> str | None:
        sid = request.headers.get("x-session-id") or body.get("user")
        return str(sid) if sid else None

    async def handle(request: Request, chat: bool) -> Any:
        if in_flight["n"] >= limit:
            pool.metrics.rejected += 1
            return error(503, "the server is at capacity; retry later", "server_busy", **{"Retry-After": "1"})
        in_flight["n"] += 1
        try:
            try:
                body = await body_of(request)
                return await run(request, body, chat)
            except LookupError as exc:
                return error(404, str(exc), "model_not_found")
            except (ValueError, TypeError) as exc:
                return error(400, str(exc))
            except Busy as exc:
                pool.metrics.rejected += 1
                return error(503, str(exc), "server_busy", **{"Retry-After": "1"})
        finally:
            in_flight["n"] -= 1

    async def run(request: Request, body: dict, chat: bool) -> Any:
        kwargs = {k: body[k] for k in SAMPLING + (CHAT_ONLY if chat else COMPLETION_ONLY) if k in body}
        if chat and "max_completion_tokens" in body:
            kwargs["max_tokens"] = body["max_completion_tokens"]
        kwargs["model"] = model_id
        stream = bool(body.get("stream", False))
        sid = session_id(request, body)
        if chat:
            if "messages" not in body:
                raise ValueError("messages is required")
            messages = body["messages"]
            prompt = await run_in_threadpool(llm.chat_prompt_tokens, messages)

            def call(session: Llama) -> Any:
                return session.create_chat_completion(messages, stream=stream, **kwargs)

        else:
            text = body.get("prompt")
            if isinstance(text, list) and text and all(isinstance(t, int) for t in text):
                prompt = np.asarray(text, np.int32)
            elif isinstance(text, str):
                prompt = np.asarray(llm.tokenize(text), np.int32)
            else:
                raise ValueError("prompt must be a string or a list of token ids")

            def call(session: Llama) -> Any:
                return session.create_completion(text, stream=stream, **kwargs)

        started = time.perf_counter()
        session, conv = await run_in_threadpool(pool.acquire, sid, prompt)
        n_before = session.n_streamed
        try:
            result = await run_in_threadpool(call, session)
        except BaseException:
            pool.release(conv)
            raise
        if not stream:
            account(session.n_streamed - n_before, started)
            pool.release(conv)
            return result

        def finish() -> None:
            account(session.n_streamed - n_before, started)
            pool.release(conv)

        return EventSourceResponse(sse(result, finish), ping=15)

    def account(n_streamed: int, started: float) -> None:
        pool.metrics.requests += 1
        pool.metrics.tokens_decoded += max(0, n_streamed)
        pool.metrics.request_seconds += time.perf_counter() - started

    async def sse(chunks: Iterator[dict], finish: Callable[[], None]) -> AsyncIterator[str]:
        async for chunk in _in_thread(chunks, finish):
            yield json.dumps(chunk)
        yield "[DONE]"

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, chat=False)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Any:
        try:
            body = await body_of(request)
            texts = body.get("input")
            texts_ok = isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)
            if not (isinstance(texts, str) or texts_ok):
                raise ValueError("input must be a string or a non-empty list of strings")
            return await run_in_threadpool(llm.create_embedding, texts, model_id)
        except LookupError as exc:
            return error(404, str(exc), "model_not_found")
        except (ValueError, TypeError) as exc:
            return error(400, str(exc))

    @app.get("/v1/models")
    async def models() -> Any:
        card = {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "infmllm-gguf"}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Any:
        slots = pool.snapshot()
        return {"status": "ok", "slots": len(slots), "slots_busy": sum(s["busy"] for s in slots)}

    @app.get("/metrics")
    async def metrics() -> Any:
        return PlainTextResponse(prometheus(pool, in_flight["n"]))

    return app


async def _in_thread(chunks: Iterator[dict], finish: Callable[[], None]) -> AsyncIterator[dict]:
    """Iterate a streamed completion in one thread of its own (it holds the session's lock from
    the first chunk to the last, and a lock belongs to a thread); stop it when the client goes."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def produce() -> None:
        try:
            for chunk in chunks:
                loop.call_soon_threadsafe(queue.put_nowait, ("chunk", chunk))
                if stop.is_set():
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop
            loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # in this thread, which holds the lock
            finish()
            loop.call_soon_threadsafe(queue.put_nowait, ("end", None))

    threading.Thread(target=produce, daemon=True).start()
    try:
        while True:
            kind, item = await queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()


def prometheus(pool: SlotPool, in_flight: int) -> str:
    m = pool.metrics
    slots = pool.snapshot()
    lines = [
        "# TYPE infmllm_slots gauge",
        f"infmllm_slots {len(slots)}",
        "# TYPE infmllm_slots_busy gauge",
        f"infmllm_slots_busy {sum(s['busy'] for s in slots)}",
        "# TYPE infmllm_requests_in_flight gauge",
        f"infmllm_requests_in_flight {in_flight}",
        "# TYPE infmllm_requests_total counter",
        f"infmllm_requests_total {m.requests}",
        "# TYPE infmllm_requests_rejected_total counter",
        f"infmllm_requests_rejected_total {m.rejected}",
        "# TYPE infmllm_tokens_decoded_total counter",
        f"infmllm_tokens_decoded_total {m.tokens_decoded}",
        "# TYPE infmllm_tokens_per_second gauge",
        f"infmllm_tokens_per_second {m.tokens_decoded / max(m.request_seconds, 1e-9):.3f}",
        "# TYPE infmllm_sessions_saved_total counter",
        f"infmllm_sessions_saved_total {m.sessions_saved}",
        "# TYPE infmllm_sessions_restored_total counter",
        f"infmllm_sessions_restored_total {m.sessions_restored}",
        "# TYPE infmllm_slot_cells gauge",
        *(f'infmllm_slot_cells{{slot="{s["slot"]}"}} {s["stats"]["n_cached"]}' for s in slots),
        "# TYPE infmllm_slot_evictions_total counter",
        *(f'infmllm_slot_evictions_total{{slot="{s["slot"]}"}} {s["stats"]["evictions"]}' for s in slots),
    ]
    if slots and "recalls" in slots[0]["stats"]:  # the recall tier is on
        for name, kind, key in RECALL_METRICS:
            lines.append(f"# TYPE infmllm_slot_{name} {kind}")
            lines.extend(f'infmllm_slot_{name}{{slot="{s["slot"]}"}} {s["stats"][key]:g}' for s in slots)
    return "\n".join(lines) + "\n"


RECALL_METRICS = (  # (metric, Prometheus type, kv_stats key) per slot, with the recall tier on
    ("recall_pages_stored", "gauge", "pages_stored"),
    ("recall_store_mb", "gauge", "store_mb"),
    ("recalls_total", "counter", "recalls"),
    ("recall_pages_recalled_total", "counter", "pages_recalled"),
)


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the server until interrupted; conversations in slots are saved on the way out."""
    import uvicorn

    llm = config.make_llama()
    pool = SlotPool(llm, config.sessions_dir)
    model_id = config.model_alias or (Path(config.model).stem if config.model else "smollm2-135m")
    app = make_app(llm, pool, model_id, config.max_queue)
    print(
        f"infmllm-gguf serve: {model_id}, {config.slots} slots x {llm.n_ctx()} cells ({llm.policy!r}), "
        f"sessions in {pool.dir}, http://{host}:{port}/v1",
        flush=True,
    )
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        pool.save_all()
        llm.close()
