"""`infmllm-gguf serve` as a real process on 127.0.0.1, for the server tests."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m"
BUDGET, CHUNK = 256, 32  # infmllm's default chunk at budget 256


class Server:
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

    def metrics(self) -> dict[str, float]:
        status, text = self.get("/metrics")
        assert status == 200, text
        return {name: float(value) for name, value in re.findall(r"^(\S+) (\S+)$", text.decode(), re.M)}
