"""`infmllm-gguf serve` driven by the real `openai` client: conversations in sequence slots, saved
and restored when the slots run out and across a restart, bad requests refused.  A real server
process on 127.0.0.1 serves what needs one (streaming over a socket, a restart); the other cases
call the same app in this process (`servers.App`)."""

from __future__ import annotations

import base64
import threading
import time

import pytest
from servers import BUDGET, CHUNK, MODEL, App, Server

from infmllm_gguf.recall import Recall

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app in this process: two slots, two requests queued."""
    srv = App(tmp_path_factory.mktemp("sessions"), slots=2, max_queue=2)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def process(tmp_path_factory):
    """`infmllm-gguf serve` in a process of its own: one slot, two requests queued."""
    srv = Server(tmp_path_factory.mktemp("sessions"), slots=1, max_queue=2)
    yield srv
    srv.stop()


def chat(client, user: str, messages: list[dict], **kw) -> str:
    reply = client.chat.completions.create(model=MODEL, messages=messages, user=user, temperature=0, **kw)
    return reply.choices[0].message.content


def test_models_chat_and_streaming(process):
    client = process.client()
    assert [m.id for m in client.models.list()] == [MODEL]
    messages = [{"role": "user", "content": "Name a colour."}]
    plain = chat(client, "s1", messages, max_tokens=10)
    chunks = client.chat.completions.create(
        model=MODEL, messages=messages, user="s2", temperature=0, max_tokens=10, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain
    done = client.completions.create(
        model=MODEL, prompt="The sea is", max_tokens=5, temperature=0, logprobs=2
    )
    assert len(done.choices[0].logprobs.tokens) == done.usage.completion_tokens
    vectors = client.embeddings.create(model=MODEL, input=["a red apple", "the sea"])
    assert [len(d.embedding) for d in vectors.data] == [576, 576]


@pytest.mark.slow
def test_four_clients_forty_turns_in_two_slots(server):
    """Four conversations share two slots: they are saved and restored all along, each stream
    stays within budget + chunk, and every client gets its 40 answers."""
    seen_cells: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            m = server.metrics()
            seen_cells.extend(v for k, v in m.items() if k.startswith("infmllm_slot_cells"))
            time.sleep(0.2)

    answers: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def converse(i: int) -> None:
        client = server.client()
        messages: list[dict] = []
        try:
            for turn in range(40):
                messages.append({"role": "user", "content": f"Client {i}, turn {turn}: say a number."})
                reply = chat(client, f"client-{i}", messages, max_tokens=6)
                messages.append({"role": "assistant", "content": reply})
                answers.setdefault(i, []).append(reply)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    clients = [threading.Thread(target=converse, args=(i,)) for i in range(4)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    stop.set()
    watcher.join()
    assert not errors, errors[:1]
    assert all(len(answers[i]) == 40 for i in range(4))
    m = server.metrics()
    assert m["infmllm_sessions_saved_total"] > 4 and m["infmllm_sessions_restored_total"] > 4
    assert seen_cells and max(seen_cells) <= BUDGET + CHUNK
    assert sum(v for k, v in m.items() if k.startswith("infmllm_slot_evictions_total")) > 0


def test_restored_conversation_continues_as_if_it_had_stayed(process):
    """One slot: a conversation run straight through, and the same one evicted by another
    conversation and then by a restart (SIGINT: the slot is saved on the way out) before its
    last turn, give the same last answer."""
    srv = process
    client = srv.client()
    turns = ["Hello!", "What is the capital of France?", "And of Italy?"]

    def run(user: str, interrupt: bool) -> str:
        nonlocal client
        messages: list[dict] = []
        for n, text in enumerate(turns):
            if interrupt and n == len(turns) - 1:
                chat(client, "intruder", [{"role": "user", "content": "Tell me a story."}], max_tokens=2)
                srv.stop()  # saved to disk with the slot's conversation
                srv.start()
                client = srv.client()
            messages.append({"role": "user", "content": text})
            reply = chat(client, user, messages, max_tokens=6)
            messages.append({"role": "assistant", "content": reply})
        return reply

    straight = run("straight", interrupt=False)
    assert run("interrupted", interrupt=True) == straight
    assert srv.metrics()["infmllm_sessions_restored_total"] >= 1


def test_bad_requests_get_http_errors_and_the_server_goes_on(server):
    client = server.client()
    # one model loaded: a request naming another is answered by it, as llama-server does
    reply = client.chat.completions.create(
        model="gpt-4", messages=[{"role": "user", "content": "hi"}], max_tokens=2, user="named"
    )
    assert reply.model == MODEL
    for bad in ([{"content": "no role"}], "not a list", [{"role": "user", "content": 5}]):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=bad)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], top_p=3.0)
    status, body = server.post("/v1/chat/completions", b"{oops")
    assert status == 400 and "JSON" in body["error"]["message"]

    statuses: list[int] = []
    retry_after: list[str] = []

    clients = [server.client() for _ in range(8)]  # made before the race: the requests start together

    def hammer(i: int) -> None:
        try:
            chat(clients[i], f"busy-{i}", [{"role": "user", "content": "Count to ten."}], max_tokens=10)
            statuses.append(200)
        except openai.APIStatusError as exc:
            statuses.append(exc.status_code)
            retry_after.append(exc.response.headers.get("retry-after", ""))

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses.count(503) >= 4 and statuses.count(200) >= 1  # at most slots + queue in flight
    assert all(r == "1" for r in retry_after)
    assert chat(client, "after", [{"role": "user", "content": "Still there?"}], max_tokens=4)


def test_images_through_the_server(tmp_path, codebook_mmproj):
    """--mmproj: a picture sent as a data URL enters the conversation's stream."""
    from test_vision import png_bytes

    from infmllm_gguf.codebook import render_words

    srv = App(tmp_path, 1, 2, mmproj=str(codebook_mmproj))
    url = (
        "data:image/png;base64,"
        + base64.b64encode(png_bytes(render_words("the code is 4 7", codebook_mmproj))).decode()
    )
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "Read it."},
            ],
        }
    ]
    reply = srv.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert reply.usage.prompt_tokens > 16  # the picture's cells
    assert srv.metrics()['infmllm_slot_cells{slot="0"}'] == reply.usage.total_tokens
    srv.stop()


def test_anonymous_conversations_are_found_by_their_prefix(tmp_path):
    """No session id: a request that continues a conversation finds it by the prompt's prefix, in
    its slot or saved on disk; a new first message starts another conversation."""
    srv = App(tmp_path, 1, 2)
    client = srv.client()

    def turn(messages: list[dict], text: str) -> None:
        messages.append({"role": "user", "content": text})
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})

    a: list[dict] = []
    turn(a, "Hello, I am Ada.")
    turn(a, "What is my name?")
    m = srv.metrics()
    assert m["infmllm_sessions_saved_total"] == 0  # the same conversation, still in the slot
    b: list[dict] = []
    turn(b, "Tell me about ships.")  # another conversation takes the slot: Ada's is saved
    assert srv.metrics()["infmllm_sessions_saved_total"] == 1
    turn(a, "Thanks.")  # found on disk by its prefix and restored
    m = srv.metrics()
    assert m["infmllm_sessions_restored_total"] == 1 and m["infmllm_sessions_saved_total"] == 2
    srv.stop()


def test_a_conversation_longer_than_its_budget_recalls_with_recall_on(tmp_path):
    """`serve --recall`: a conversation that outgrows its slot's budget stores what it evicts, and
    its next question recalls pages; /metrics reports both per slot."""
    srv = App(tmp_path, 1, 2, recall=Recall())
    client = srv.client()
    text = "In the beginning God created the heaven and the earth. " * 24  # a ~310-token prompt > 256 + 32
    messages = [{"role": "user", "content": "The pass key is 48213. Remember it. " + text}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    messages += [
        {"role": "assistant", "content": reply.choices[0].message.content},
        {"role": "user", "content": "What is the pass key?"},
    ]
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    m = srv.metrics()
    assert m['infmllm_slot_recall_pages_stored{slot="0"}'] > 0
    assert m['infmllm_slot_recall_store_mb{slot="0"}'] > 0
    assert m['infmllm_slot_recalls_total{slot="0"}'] >= 1
    assert m['infmllm_slot_recall_pages_recalled_total{slot="0"}'] >= 1
    srv.stop()
