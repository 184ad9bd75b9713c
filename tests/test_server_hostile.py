"""Hostile input against `infmllm-gguf serve` (the real model and projector): every case is a
clear 4xx (or a correct answer), and afterwards the server still answers with its conversations
intact.  The requests go to the app in this process (`servers.App`); what needs a real socket
(bodies refused unread, clients that vanish, answers beside a generation) goes to a server
process started with the same limits as flags."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest
from servers import MODEL, App, Endpoint, Server

from infmllm_gguf.grammar import MAX_GRAMMAR_BYTES, MAX_GRAMMAR_NESTING
from infmllm_gguf.server import Access, Limits

openai = pytest.importorskip("openai")
Image = pytest.importorskip("PIL.Image")

KEY = "test-key-0123456789"
MAX_TOKENS, MAX_BODY, MAX_IMAGE_BYTES, MAX_PIXELS = 256, 1_000_000, 300_000, 1_000_000
CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
KEEPER = ["My name is Ada and my code is 4417.", "What is my code?", "Thank you. And my name?"]


def png(size: tuple[int, int], mode: str = "RGB", kind: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (40, 90, 200)).save(buf, format=kind)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(*urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What is this?"}]}]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    (root / "blue.png").write_bytes(png((32, 32)))
    (root / "notes.txt").write_text("not an image")
    (root / "huge.png").write_bytes(png((2000, 1000)))  # a few kB, 2 M pixels
    (root / "escape.png").symlink_to("/etc/hostname")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, codebook_mmproj, media):
    """The app in this process: two slots, four queued, the limits above, the key."""
    limits = Limits(
        max_tokens=MAX_TOKENS, max_prompt_tokens=3000, max_images=2, max_image_bytes=MAX_IMAGE_BYTES,
        max_image_pixels=MAX_PIXELS, max_body_bytes=MAX_BODY, timeout=120,
    )  # fmt: skip
    srv = App(
        tmp_path_factory.mktemp("sessions"), 2, 4, limits=limits, access=Access(media_path=media),
        mmproj=str(codebook_mmproj), api_key=KEY,
    )  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def process(tmp_path_factory, codebook_mmproj, media):
    """`infmllm-gguf serve` in a process of its own, set up as the app is, with flags."""
    srv = Server(
        tmp_path_factory.mktemp("sessions"), 2, 4, "--mmproj", str(codebook_mmproj),
        "--media-path", str(media),
        "--max-tokens", str(MAX_TOKENS), "--max-prompt-tokens", "3000", "--max-images", "2",
        "--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-image-pixels", str(MAX_PIXELS),
        "--max-body-bytes", str(MAX_BODY), "--timeout", "120",
        api_key=KEY,
    )  # fmt: skip
    yield srv
    srv.stop()


def converse(srv: Endpoint, sid: str, turns: list[str], max_tokens: int = 8) -> list[str]:
    client, messages, replies = srv.client(), [], []
    for text in turns:
        messages.append({"role": "user", "content": text})
        reply = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            temperature=0,
            max_tokens=max_tokens,
            extra_headers={"X-Session-Id": sid},
        )
        replies.append(reply.choices[0].message.content)
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies


def next_turn(srv: Endpoint, sid: str, turns: list[str], replies: list[str], max_tokens: int = 8) -> str:
    """One more turn of a conversation that said `turns` and got `replies`, as one request."""
    messages = []
    for text, reply in zip(turns, replies):
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": turns[len(replies)]})
    reply = srv.client().chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        max_tokens=max_tokens,
        extra_headers={"X-Session-Id": sid},
    )
    return reply.choices[0].message.content


@pytest.fixture(scope="module")
def keeper(server, process) -> dict[str, list[str]]:
    """A conversation held across the whole module, by the app and by the process: its third
    turn must come out as it does in a fresh conversation run straight through, whatever hostile
    requests came between."""
    return {"app": converse(server, "keeper", KEEPER[:2]), "process": converse(process, "keeper", KEEPER[:2])}


def assert_refused(status: int, body, expected: int = 400, words: str = "") -> None:
    assert status == expected, (status, body)
    assert isinstance(body, dict) and body["error"]["message"], body
    assert words.lower() in body["error"]["message"].lower(), body


def test_keeper_starts(keeper):
    for replies in keeper.values():
        assert len(replies) == 2


# --- grammars and JSON schemas -----------------------------------------------------------------
@pytest.mark.parametrize("depth", [20_000, MAX_GRAMMAR_NESTING + 1])
def test_deeply_nested_grammar_is_refused(server, depth):
    grammar = "root ::= " + "(" * depth + '"a"' + ")" * depth
    assert_refused(
        *server.post(COMPLETIONS, {"prompt": "x", "grammar": grammar, "max_tokens": 2}), words="nests"
    )


def test_nesting_within_bounds_works(server):
    depth = 200
    grammar = "root ::= " + "(" * depth + '"yes"' + ")" * depth
    status, body = server.post(COMPLETIONS, {"prompt": "Answer:", "grammar": grammar, "max_tokens": 4})
    assert status == 200 and body["choices"][0]["text"] == "yes", body


def test_long_rule_chain_and_huge_grammars_are_refused(server):
    chain = "root ::= r0\n" + "".join(f"r{i} ::= r{i + 1}\n" for i in range(8000)) + 'r8000 ::= "a"\n'
    assert len(chain) < MAX_GRAMMAR_BYTES
    assert_refused(
        *server.post(COMPLETIONS, {"prompt": "x", "grammar": chain, "max_tokens": 2}), words="grammar"
    )
    huge = 'root ::= "a"\n' + "# padding\n" * (MAX_GRAMMAR_BYTES // 10)
    assert_refused(
        *server.post(COMPLETIONS, {"prompt": "x", "grammar": huge, "max_tokens": 2}), words="bytes"
    )
    assert_refused(*server.post(COMPLETIONS, {"prompt": "x", "grammar": "root ::= (", "max_tokens": 2}))


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "maxLength": 200_000},
        {"type": "string", "minLength": 100_000},
        {"type": "array", "items": {"type": "integer"}, "maxItems": 10**9},
        {"type": "array", "items": {"type": "integer"}, "minItems": -1},
        {"type": "string", "maxLength": 1.5},
        {"type": "string", "pattern": "a{0,100000}"},
        {"type": "object", "properties": {"a": {"type": "string", "maxLength": 99_999}}},
    ],
)
def test_json_schemas_with_huge_repetitions_are_refused(server, schema):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert_refused(*server.post(CHAT, {"messages": user("hi"), "response_format": fmt, "max_tokens": 4}))


def test_deeply_nested_json_schema_is_refused(server):
    schema: dict = {"type": "string"}
    for _ in range(300):
        schema = {"type": "array", "items": schema}
    fmt = {"type": "json_object", "schema": schema}
    assert_refused(*server.post(CHAT, {"messages": user("hi"), "response_format": fmt, "max_tokens": 4}))


def test_a_bounded_schema_still_works(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "maxLength": 8}}}
    status, body = server.post(CHAT, {"messages": user("Say hi"), "response_format": fmt, "max_tokens": 16})
    assert status == 200, body
    text = body["choices"][0]["message"]["content"]
    assert text.startswith('"') and len(json.loads(text.strip())) <= 8 if text.strip().endswith('"') else True


def test_grammar_with_every_token_biased_to_minus_infinity_answers(server):
    bias = {str(t): -1e39 for t in range(0, 49152, 1)}
    status, body = server.post(
        COMPLETIONS,
        {"prompt": "Yes or no?", "grammar": 'root ::= "yes" | "no"', "logit_bias": bias, "max_tokens": 3},
    )
    assert status == 200 and body["choices"][0]["text"] in ("yes", "no"), body
    assert_refused(
        *server.post(COMPLETIONS, {"prompt": "x", "logit_bias": {"99999999": 1}}), words="logit_bias"
    )
    assert_refused(*server.post(COMPLETIONS, {"prompt": "x", "logit_bias": {"abc": 1}}), words="logit_bias")


# --- embeddings -------------------------------------------------------------------------------------
def test_embeddings_refused_inputs_leave_the_batch_clean(server):
    long = "word " * 600
    assert_refused(*server.post(EMBEDDINGS, {"input": [long, ""]}))
    for good in ([long], ["hello"], "hello", [long, "the sea", long]):
        status, body = server.post(EMBEDDINGS, {"input": good})
        assert status == 200 and len(body["data"]) == (1 if isinstance(good, str) else len(good)), body
    for bad in ([], "", 5, [1, 2], ["a"] * 2049, None):
        assert_refused(*server.post(EMBEDDINGS, {"input": bad}))
    vectors = server.client().embeddings.create(model=MODEL, input=["a red apple"])  # base64 by default
    assert len(vectors.data[0].embedding) == 576


# --- images -------------------------------------------------------------------------------------------
def test_local_files_only_inside_the_media_path(server, media):
    for url, words in [
        ("/etc/passwd", "media path"),
        ("file:///etc/passwd", "media path"),
        ("../../etc/passwd", "media path"),
        ("escape.png", "media path"),  # a symlink out of the folder
        ("missing.png", "media path"),
        ("notes.txt", "png, jpeg"),
        ("huge.png", "pixels"),
        ("http://example.com/a.png", "not fetched"),
    ]:
        status, body = server.post(CHAT, {"messages": image_message(url), "max_tokens": 2})
        assert_refused(status, body, words=words)
        assert "root:" not in json.dumps(body)  # nothing of the file is echoed
    for url in ("blue.png", f"file://{media / 'blue.png'}", str(media / "blue.png")):
        status, body = server.post(CHAT, {"messages": image_message(url), "max_tokens": 2})
        assert status == 200, (url, body)


def test_image_data_is_checked_before_decoding(server):
    for url, words in [
        (data_url(b"GIF89a" + b"\0" * 6), "header"),
        (data_url(b"hello world"), "png, jpeg"),
        (data_url(b""), "png, jpeg"),
        (data_url(png((900, 1200))), "pixels"),
        (data_url(os.urandom(MAX_IMAGE_BYTES + 1)), "bytes"),
        ("data:image/png;base64,!!!", "base64"),
        (data_url(png((16, 16), kind="TIFF")), "png, jpeg"),
    ]:
        assert_refused(*server.post(CHAT, {"messages": image_message(url), "max_tokens": 2}), words=words)
    three = image_message(*[data_url(png((8, 8)))] * 3)
    assert_refused(*server.post(CHAT, {"messages": three, "max_tokens": 2}), words="images")
    for kind in ("WEBP", "JPEG", "GIF", "BMP"):
        status, body = server.post(
            CHAT, {"messages": image_message(data_url(png((24, 24), kind=kind))), "max_tokens": 2}
        )
        assert status == 200, (kind, body)


# --- the HTTP layer -----------------------------------------------------------------------------------
def test_access_and_transport_checks(process):
    hi = json.dumps({"messages": user("hi"), "max_tokens": 2}).encode()
    as_json = {"Content-Type": "application/json"}
    assert process.request("POST", CHAT, hi, {**as_json, "Authorization": ""})[0] == 401
    assert process.request("POST", CHAT, hi, {**as_json, "Authorization": "Bearer x"})[0] == 401
    ok = process.request(
        "POST", CHAT, hi, {"Content-Type": "application/json", "Authorization": "", "X-Api-Key": KEY}
    )
    assert ok[0] == 200
    assert process.request("GET", "/v1/models", headers={"Authorization": ""})[0] == 401
    assert process.request("GET", "/health", headers={"Authorization": ""})[0] == 200  # public
    assert process.post(CHAT, hi, content_type="text/plain")[0] == 415
    assert process.post(CHAT, hi, content_type=None)[0] == 415
    assert process.post(CHAT, hi, content_type="application/x-www-form-urlencoded")[0] == 415
    with socket.create_connection(("127.0.0.1", process.port), timeout=30) as sock:  # refused unread
        sock.sendall(
            f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n{{".encode()
        )
        assert sock.recv(64).startswith(b"HTTP/1.1 413")
    assert (
        process.request("POST", CHAT, hi, {"Content-Type": "application/json", "Host": "evil.example"})[0]
        == 400
    )
    assert (
        process.request("POST", CHAT, hi, {"Content-Type": "application/json", "Host": "localhost:1"})[0]
        == 200
    )
    assert process.get("/metrics")[0] == 200  # behind the key like the rest


def test_chunked_body_over_the_limit_is_413(process):
    with socket.create_connection(("127.0.0.1", process.port), timeout=30) as sock:
        head = (
            f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sock.sendall(head.encode())
        chunk = b"x" * 65536
        try:
            for _ in range(MAX_BODY // len(chunk) + 2):
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        except OSError:
            pass  # the server may answer and close before the rest is sent
        assert sock.recv(64).startswith(b"HTTP/1.1 413")


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b"\xff\xfe\xfa not utf-8",
        b"",
        b"[]",
        b"null",
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
        b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}',
        b'{"messages": "hi"}',
        b'{"messages": []}',
        b'{"messages": [{"role": "user", "content": [{"type": "video", "video": 1}]}]}',
    ],
)
def test_malformed_bodies_are_400(server, body):
    assert_refused(*server.post(CHAT, body))


def test_unknown_fields_are_ignored_and_lone_surrogates_refused(server):
    status, body = server.post(CHAT, {"messages": user("hi"), "max_tokens": 2, "frobnicate": {"x": [1, 2]}})
    assert status == 200, body
    assert_refused(
        *server.post(CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}')
    )


# --- numeric fields at their bounds ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "fields", "ok"),
    [
        (CHAT, {"max_tokens": MAX_TOKENS}, True),
        (CHAT, {"max_tokens": MAX_TOKENS + 1}, False),
        (CHAT, {"max_completion_tokens": MAX_TOKENS + 1}, False),
        (CHAT, {"max_tokens": -1}, False),
        (CHAT, {"max_tokens": 2**63}, False),
        (CHAT, {"top_k": 2**31 - 1}, True),
        (CHAT, {"top_k": 2**31}, False),
        (CHAT, {"top_k": -1}, False),
        (CHAT, {"seed": 2**64 - 1}, True),
        (CHAT, {"seed": 2**64}, False),
        (CHAT, {"temperature": 1e308}, True),
        (CHAT, {"temperature": "hot"}, False),
        (CHAT, {"top_p": 3.0}, False),
        (CHAT, {"min_p": -0.5}, False),
        (CHAT, {"repeat_penalty": 0}, False),
        (CHAT, {"mirostat_mode": 3}, False),
        (CHAT, {"n": 2}, False),
        (CHAT, {"logprobs": True, "top_logprobs": 20}, True),
        (CHAT, {"logprobs": True, "top_logprobs": 21}, False),
        (CHAT, {"stop": ["x"] * 16}, True),
        (CHAT, {"stop": ["x"] * 17}, False),
        (CHAT, {"stop": "y" * 257}, False),
        (CHAT, {"user": "u" * 257}, False),
        (CHAT, {"tools": [{"type": "function"}]}, False),
        (COMPLETIONS, {"logprobs": 20}, True),
        (COMPLETIONS, {"logprobs": 21}, False),
        (COMPLETIONS, {"prompt": [2**32]}, False),
        (COMPLETIONS, {"prompt": [-1]}, False),
        (COMPLETIONS, {"prompt": [49152]}, False),
        (COMPLETIONS, {"prompt": [49151, 1]}, True),
        (COMPLETIONS, {"prompt": []}, False),
        (COMPLETIONS, {"prompt": "tok " * 4000}, False),  # --max-prompt-tokens 3000
        (COMPLETIONS, {"suffix": "x"}, False),
    ],
)
def test_numeric_fields_at_their_bounds(server, path, fields, ok):
    body = {"max_tokens": 2, **fields}
    body.update({"messages": user("hi")} if path == CHAT else {"prompt": fields.get("prompt", "The sea")})
    status, reply = server.post(path, body)
    if ok:
        assert status == 200, reply
    else:
        assert_refused(status, reply)


def test_an_endless_grammar_stops_at_the_token_limit(server):
    status, body = server.post(COMPLETIONS, {"prompt": "a", "grammar": 'root ::= "a" root', "max_tokens": 0})
    assert status == 200 and body["choices"][0]["finish_reason"] == "length", body
    assert 0 < body["usage"]["completion_tokens"] <= MAX_TOKENS


def test_another_model_name_is_served_by_the_loaded_one(server):
    status, body = server.post(CHAT, {"model": "gpt-4o", "messages": user("hi"), "max_tokens": 2})
    assert status == 200 and body["model"] == MODEL


# --- sessions ---------------------------------------------------------------------------------------
def test_a_history_that_departs_before_the_cache_is_409(server):
    long = "In the beginning God created the heaven and the earth. " * 40  # ~500 tokens > budget 256
    converse(server, "diverge", [long])
    status, body = server.post(
        CHAT, {"messages": user("A different first message."), "max_tokens": 2}, **{"X-Session-Id": "diverge"}
    )
    assert_refused(status, body, 409, "evicted")
    assert converse(server, "diverge-after", ["Still fine?"])  # and the server goes on


def test_session_files_are_private(server):
    for i in range(3):  # three conversations in two slots: one is saved
        converse(server, f"private-{i}", ["Hello."], max_tokens=2)
    files = list(server.cwd.glob("*.session"))
    assert files
    assert stat.S_IMODE(server.cwd.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)


# --- cancellation and the event loop ---------------------------------------------------------------
def wait_idle(srv: Endpoint, seconds: float = 10.0) -> float:
    """Seconds until no slot is busy and nothing is in flight."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        m = srv.metrics()
        if m["infmllm_slots_busy"] == 0 and m["infmllm_requests_in_flight"] == 0:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"still busy after {seconds} s: {srv.metrics()}")


def raw_request(srv: Server, body: dict, sid: str) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
    sock.sendall(
        (
            f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"X-Session-Id: {sid}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        ).encode()
        + data
    )
    return sock


@pytest.mark.parametrize("stream", [False, True])
def test_a_vanished_client_stops_its_turn_and_the_turn_is_undone(process, stream):
    sid = f"vanish-{stream}"
    turns = ["Remember this: " + "The sea is wide and deep. " * 40 + "Tell me about the sea.", "And the sky?"]
    # the first turn fills the cache past its budget, so the turn below evicts within 32 tokens
    before = converse(process, sid, turns[:1])
    undone = process.metrics()["infmllm_turns_undone_total"]
    decoded = process.metrics()["infmllm_tokens_decoded_total"]
    history = [*user(turns[0]), {"role": "assistant", "content": before[0]}, *user("Tell me a long story.")]
    sock = raw_request(
        process,
        {"messages": history, "max_tokens": MAX_TOKENS, "stream": stream, "grammar": 'root ::= "a" root'},
        sid,
    )
    if stream:
        received = b""
        while received.count(b"data:") < 48:  # 48 tokens in: past an eviction (chunk 32)
            piece = sock.recv(4096)
            assert piece, received.decode(errors="replace")
            received += piece
    else:
        time.sleep(2.0)
    sock.close()
    wait_idle(process)
    m = process.metrics()
    assert m["infmllm_turns_undone_total"] == undone + 1
    assert m["infmllm_tokens_decoded_total"] == decoded  # the undone turn counts nothing
    # the conversation is as it was: its next turn is the one a fresh copy gives
    assert next_turn(process, sid, turns, before) == converse(process, f"{sid}-fresh", turns)[1]


def test_a_client_that_vanishes_beside_another_leaves_its_stream_as_it_is_alone(process):
    """Two conversations generate in shared steps; one client vanishes mid-stream: the other's
    reply is token for token the one it gets with no one beside it."""
    question = "Tell me about the sea and the sky."
    alone = converse(process, "beside-alone", [question], max_tokens=64)[0]
    wait_idle(process)
    shared = process.metrics().get('infmllm_steps_by_sequences_total{sequences="2"}', 0)
    story = {"messages": user("Tell me a long story."), "max_tokens": 200, "stream": True}
    sock = raw_request(process, story, "gone")
    received = b""
    while received.count(b"data:") < 4:  # generating: the other conversation joins its steps
        piece = sock.recv(4096)
        assert piece, received.decode(errors="replace")
        received += piece
    done: dict[str, str] = {}
    beside = threading.Thread(
        target=lambda: done.update(reply=converse(process, "beside", [question], max_tokens=64)[0])
    )
    beside.start()
    time.sleep(0.3)
    sock.close()  # gone while the other conversation generates
    beside.join(timeout=120)
    assert done["reply"] == alone
    wait_idle(process)
    assert process.metrics()['infmllm_steps_by_sequences_total{sequences="2"}'] > shared


def test_a_client_gone_before_the_response_starts_releases_everything(process):
    for _ in range(3):
        sock = raw_request(process, {"messages": user("Hi"), "max_tokens": 50, "stream": True}, "early")
        sock.close()
    wait_idle(process)
    with socket.create_connection(("127.0.0.1", process.port), timeout=30) as sock:  # half a body, then gone
        head = f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        sock.sendall(f"{head}Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{".encode())
    wait_idle(process)


def test_health_models_and_metrics_answer_during_a_long_generation(process):
    done = threading.Event()

    def generate() -> None:
        process.post(COMPLETIONS, {"prompt": "a", "grammar": 'root ::= "a" root', "max_tokens": MAX_TOKENS})
        done.set()

    threading.Thread(target=generate).start()
    time.sleep(0.5)
    worst = 0.0
    for path in ("/health", "/v1/models", "/metrics") * 3:
        t0 = time.monotonic()
        assert process.get(path)[0] == 200
        worst = max(worst, time.monotonic() - t0)
    assert not done.is_set(), "the generation ended before the checks: make it longer"
    assert worst < 0.5, worst  # answered beside the generation, not after it
    done.wait(120)


def test_the_keeper_conversation_is_intact(server, process, keeper):
    """Last: after every case above, the kept conversation continues as a fresh one does, on
    the app and on the process."""
    for srv, replies in ((server, keeper["app"]), (process, keeper["process"])):
        assert srv.alive()
        assert next_turn(srv, "keeper", KEEPER, replies) == converse(srv, "keeper-fresh", KEEPER)[2]
        assert srv.metrics().get('infmllm_errors_total{status="500"}', 0) == 0
