"""Property-based fuzzing of the server's OpenAPI schema with schemathesis (the slow suite): a
fixed number of generated requests per endpoint, valid and invalid, against a real server;
none may get a 5xx or stop the server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from servers import Server

KEY = "fuzz-key"
EXAMPLES = 100  # per endpoint and phase


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(tmp_path, codebook_mmproj):
    srv = Server(
        tmp_path, 2, 8, "--mmproj", str(codebook_mmproj), "--max-tokens", "8", "--timeout", "30",
        api_key=KEY,
    )  # fmt: skip
    try:
        run = subprocess.run(
            [
                str(Path(sys.executable).parent / "st"), "run", f"{srv.url}/openapi.json",
                "--checks", "not_a_server_error", "--max-examples", str(EXAMPLES), "--seed", "1",
                "--generation-database", "none", "--workers", "1", "--request-timeout", "120",
                "--phases", "examples,coverage,fuzzing", "-H", f"Authorization: Bearer {KEY}", "--no-color",
            ],
            capture_output=True, text=True, timeout=3000, cwd=tmp_path,
        )  # fmt: skip
        print(run.stdout[-3000:])
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert srv.alive()
        m = srv.metrics()
        assert not [k for k in m if re.match(r'infmllm_errors_total\{status="5', k)], m
        assert srv.post("/v1/completions", {"prompt": "The sea", "max_tokens": 2})[0] == 200
    finally:
        srv.stop()
