"""The server's sessions under pressure: quotas (least recently used removed, 429 when all are
in use), damaged files set aside, failed saves (503, nothing lost), each slot saved on its own
at shutdown, the deadline, the strict model name and the refusal to listen openly without a key.
The app runs in this process (`servers.App`); the refusal is the command line's own."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from servers import MODEL, App, Endpoint

from infmllm_gguf.server import Access, Limits
from infmllm_gguf.server.sessions import SlotPool

openai = pytest.importorskip("openai")

CHAT = "/v1/chat/completions"
ENDLESS = 'root ::= "a" root'


def turn(srv: Endpoint, sid: str, text: str = "Hello.", **kw) -> tuple[int, dict]:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 2, "temperature": 0, **kw}
    return srv.post(CHAT, body, **{"X-Session-Id": sid})


def path_of(srv: Endpoint, sid: str):
    return srv.cwd / f"{SlotPool.key_of(sid)}.session"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Two slots, four queued, three conversations kept, a 2 s deadline, the strict model name."""
    srv = App(
        tmp_path_factory.mktemp("sessions"),
        2,
        4,
        limits=Limits(max_sessions=3, timeout=2),
        access=Access(strict_model_name=True),
    )
    yield srv
    if srv.alive():
        srv.stop()


def test_strict_model_name(server):
    status, body = server.post(CHAT, {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 404 and "gpt-4" in body["error"]["message"]
    assert (
        server.post(CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})[
            0
        ]
        == 200
    )


def test_the_deadline_ends_a_generation_as_length(server):
    t0 = time.monotonic()
    status, body = turn(server, "slow", grammar=ENDLESS, max_tokens=4000)
    took = time.monotonic() - t0
    assert status == 200 and body["choices"][0]["finish_reason"] == "length", body
    assert 0 < body["usage"]["completion_tokens"] < 4000 and took < 2 + 2, took


def test_least_recently_used_sessions_go_first(server):
    for i in range(5):
        assert turn(server, f"lru-{i}")[0] == 200
    m = server.metrics()
    assert m["infmllm_sessions_removed_total"] >= 2
    assert not path_of(server, "lru-0").exists() and not path_of(server, "lru-1").exists()
    assert turn(server, "lru-0")[0] == 200  # comes back as a new conversation


def test_a_full_quota_of_busy_conversations_is_429(server):
    results: list[int] = []
    threads = [
        threading.Thread(
            target=lambda i=i: results.append(turn(server, f"busy-{i}", grammar=ENDLESS, max_tokens=4000)[0])
        )
        for i in range(3)
    ]
    for t in threads:  # two in the slots, one waiting for a slot: three conversations in use
        t.start()
        time.sleep(0.2)
    status, body = turn(server, "one-too-many")
    for t in threads:
        t.join()
    assert status == 429 and "quota" in body["error"]["message"], body
    assert results.count(200) >= 2


def test_a_damaged_session_file_is_set_aside(server):
    path_of(server, "damaged").write_bytes(b"PK\x03\x04 this is not a session")
    assert turn(server, "damaged")[0] == 200
    assert not path_of(server, "damaged").exists() or path_of(server, "damaged").stat().st_size > 100
    assert list(server.cwd.glob("*.unusable"))
    assert server.metrics()["infmllm_sessions_set_aside_total"] >= 1


def test_a_failed_save_is_503_and_loses_nothing(server):
    assert turn(server, "keep-a")[0] == 200 and turn(server, "keep-b")[0] == 200  # both slots
    blocked = [path_of(server, s) for s in ("keep-a", "keep-b")]
    for path in blocked:  # a folder where the file goes: the save fails, even for root
        path.unlink(missing_ok=True)
        path.mkdir()
    status, body = turn(server, "newcomer")
    assert status == 503 and "saving" in body["error"]["message"], body
    assert server.metrics()["infmllm_session_save_failures_total"] >= 2
    assert turn(server, "keep-a", "And now?")[0] == 200  # still in its slot
    blocked[1].rmdir()
    assert turn(server, "newcomer")[0] == 200  # keep-b saved, its slot reused
    assert path_of(server, "keep-b").is_file()


def test_shutdown_saves_each_slot_on_its_own(server):
    """keep-a's file is still blocked: its save fails at shutdown, the other slot's is saved."""
    assert turn(server, "last")[0] == 200
    output = server.stop()
    assert "saving session" in output and path_of(server, "last").is_file(), output[-2000:]


def test_an_open_host_without_a_key_is_refused_at_once(tmp_path):
    t0 = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "infmllm_gguf.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 2 and "--api-key" in run.stderr, run.stderr
    assert time.monotonic() - t0 < 30  # before the model loads
