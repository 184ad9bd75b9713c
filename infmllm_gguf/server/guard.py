"""The checks every request passes before a route sees it (a pure ASGI middleware): a request
id, the Host header, the API key, the content type and the body's size.

- Host: one of `allowed_hosts` (loopback names by default), so a web page cannot reach a
  local server through DNS rebinding; 400 otherwise.
- API key: `Authorization: Bearer KEY` (or `X-Api-Key: KEY`), compared in constant time, on
  every path but /health; 401 otherwise.
- A POST body must be `application/json` (415), so no web page can send one without the
  browser asking first (CORS preflight), and at most `max_body_bytes` long (413).  The body is
  read here, whole, and handed on.
"""

from __future__ import annotations

import hmac
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from infmllm_gguf.server.config import Access

__all__ = ["Guard", "error_body"]

log = logging.getLogger("infmllm_gguf.server")
Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
PUBLIC = ("/health",)


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class Guard:
    def __init__(self, app: Callable, access: Access, max_body_bytes: int):
        self.app = app
        self.keys = [k.encode() for k in access.api_keys]
        self.hosts = {h.lower().strip("[]") for h in access.allowed_hosts}
        self.max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}

        async def reply(status: int, message: str, kind: str, extra: dict[str, str] | None = None) -> None:
            body = json.dumps(error_body(message, kind)).encode()
            head = {"content-type": "application/json", "x-request-id": request_id, **(extra or {})}
            await send({
                "type": "http.response.start", "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in head.items()],
            })  # fmt: skip
            await send({"type": "http.response.body", "body": body})

        if "*" not in self.hosts and _host_name(headers.get("host", "")) not in self.hosts:
            await reply(400, "the Host header names no host this server answers to", "invalid_host")
            return
        if self.keys and scope["path"] not in PUBLIC and not self._authorised(headers):
            await reply(401, "a valid API key is needed (Authorization: Bearer KEY)", "authentication_error",
                        {"www-authenticate": "Bearer"})  # fmt: skip
            return
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                await reply(415, "the request body must be application/json", "unsupported_media_type")
                return
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_body:
                await reply(413, f"the request body exceeds {self.max_body} bytes", "request_too_large")
                return
            body = await self._read_body(receive)
            if body is None:
                await reply(413, f"the request body exceeds {self.max_body} bytes", "request_too_large")
                return
            receive = _replay(body, receive)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)

    def _authorised(self, headers: dict[str, str]) -> bool:
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
        given_bytes = given.encode("latin-1", "replace")
        # every key is compared, so the time does not tell which one nearly matched
        return bool(sum(hmac.compare_digest(given_bytes, key) for key in self.keys))

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it passes the limit (or the client goes)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body read already, then what the client sends next (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _host_name(host: str) -> str:
    """The name in a Host header, without its port: "[::1]:8000" -> "::1"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
