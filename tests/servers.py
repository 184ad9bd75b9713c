"""The server for the server tests, two ways: `infmllm-gguf serve` as a real process on
127.0.0.1 (`Server`: real sockets, clients that vanish, SIGINT and a restart) or its app in this
process through Starlette's test client (`App`: no process to start, no socket).  Both answer
the same calls (`Endpoint`), the real `openai` client's included."""

from __future__ import annotations

import abc
import io
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from infmllm_gguf.recall import Recall
from infmllm_gguf.server import Access, Limits, ServerConfig

MODEL = "smollm2-135m"
BUDGET, CHUNK = 256, 32  # infmllm's default chunk at budget 256


class Endpoint(abc.ABC):
    """What a test sends a server: OpenAI clients, raw requests and /metrics."""

    url: str
    cwd: Path  # the sessions folder
    api_key: str | None

    @abc.abstractmethod
    def request(
        self, method: str, path: str, data: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """(status, body) of one HTTP request, with the API key unless headers replace it."""

    @abc.abstractmethod
    def alive(self) -> bool: ...

    @abc.abstractmethod
    def stop(self) -> str:
        """Shut the server down as `serve` does on SIGINT; returns what it printed or logged."""

    def client(self, **kw: Any):
        import openai

        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0, timeout=300, **kw
        )

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def get(self, path: str) -> tuple[int, bytes]:
        return self.request("GET", path)

    def post(
        self, path: str, body: Any, content_type: str | None = "application/json", **headers: str
    ) -> tuple[int, Any]:
        """POST body (a dict is sent as JSON, bytes as they are); (status, parsed JSON or raw bytes)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs = {**({"Content-Type": content_type} if content_type else {}), **headers}
        status, raw = self.request("POST", path, data, hdrs)
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw

    def metrics(self) -> dict[str, float]:
        status, text = self.get("/metrics")
        assert status == 200, text
        return {name: float(value) for name, value in re.findall(r"^(\S+) (\S+)$", text.decode(), re.M)}


class Server(Endpoint):
    """`infmllm-gguf serve` in a process of its own, started with the command line's flags."""

    def __init__(self, sessions: Path, slots: int, max_queue: int, *extra: str, api_key: str | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.api_key = api_key
        self.args = [
            sys.executable, "-m", "infmllm_gguf.cli", "serve", "--budget", str(BUDGET), "--slots", str(slots),
            "--max-queue", str(max_queue), "--port", str(self.port), "--sessions-dir", str(sessions),
            "--threads", "2", "--metrics", *extra, *(["--api-key", api_key] if api_key else []),
        ]  # fmt: skip
        self.proc: subprocess.Popen | None = None
        self.cwd = sessions
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        # run from the sessions folder: from the checkout, Python would import the unbuilt sources;
        # output to a file, not a pipe nobody reads while the server runs (a full pipe blocks it)
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            self.args, cwd=self.cwd, stdout=self.log, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.output()}")
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=1).read()
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        raise RuntimeError("the server did not come up")

    def stop(self) -> str:
        """SIGINT (uvicorn shuts down, the slots are saved); returns what the server printed."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)
        return self.output()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def request(
        self, method: str, path: str, data: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        req = urllib.request.Request(
            f"{self.url}{path}", data=data, method=method, headers={**self.headers(), **(headers or {})}
        )
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()


class App(Endpoint):
    """The server's app as `serve` builds it (`make_app` over a `SlotPool`, the same
    configuration the flags make) in this process, called through Starlette's test client on
    one event loop, as under uvicorn.  A server fault is a 500, as over a socket."""

    url = "http://127.0.0.1"  # a Host the default allowed hosts take

    def __init__(
        self,
        sessions: Path,
        slots: int,
        max_queue: int,
        limits: Limits | None = None,
        access: Access | None = None,
        mmproj: str | None = None,
        recall: Recall | None = None,
        api_key: str | None = None,
    ):
        from fastapi.testclient import TestClient

        from infmllm_gguf.server import SlotPool, make_app

        self.cwd, self.api_key = sessions, api_key
        access = replace(access or Access(), metrics=True, api_keys=(api_key,) if api_key else ())
        config = ServerConfig(
            mmproj=mmproj, budget=BUDGET, slots=slots, sessions_dir=str(sessions), max_queue=max_queue,
            recall=recall, n_threads=2, limits=limits or Limits(), access=access,
        )  # fmt: skip
        self.llm = config.make_llama()
        self.pool = SlotPool(self.llm, sessions, config.limits.max_sessions, config.limits.max_session_bytes)
        app = make_app(self.llm, self.pool, config)
        self.http = TestClient(app, base_url=self.url, raise_server_exceptions=False)
        self.http.__enter__()  # one event loop for every request
        self.log = io.StringIO()  # what the server logs (`Server` has it printed)
        self.handler = logging.StreamHandler(self.log)
        logging.getLogger("infmllm_gguf.server").addHandler(self.handler)
        self.stopped = False

    def client(self, **kw: Any):
        return super().client(http_client=self.http, **kw)

    def request(
        self, method: str, path: str, data: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        resp = self.http.request(method, path, content=data, headers={**self.headers(), **(headers or {})})
        return resp.status_code, resp.content

    def alive(self) -> bool:
        return not self.stopped

    def stop(self) -> str:
        """As `serve` ends: the event loop stops, every conversation in a slot is saved (each on
        its own), the model is closed.  Returns what the server logged; a second call only that."""
        if not self.stopped:
            self.stopped = True
            try:
                self.http.__exit__(None, None, None)
                self.pool.save_all()
            finally:
                self.llm.close()
                logging.getLogger("infmllm_gguf.server").removeHandler(self.handler)
        return self.log.getvalue()
