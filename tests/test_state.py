"""Saved sessions: save_state/load_state in memory, save_session/load_session on disk, in this and
in a fresh process; damaged and mismatched files refused with the session left as it was."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from infmllm_gguf import H2O, InfMLLM, Llama, LlamaGrammar, LlamaState, Recall, StateError, StreamingLLM

NUMBER = LlamaGrammar.from_string('root ::= "1" | "2" | "3" | "4" | "5" | "6" | "7" | "8" | "9" | "10"')


def session(model_path, policy=None, **kw) -> Llama:
    policy = policy or InfMLLM(budget=256, chunk=32)
    return Llama(model_path, n_ctx=320, kv_policy=policy, n_threads=2, debug=True, **kw)


def test_save_state_reproduces_seeded_samples(model_path):
    """llama-cpp-python's scenario: a state saved before two seeded samples brings back the first."""
    llm = session(model_path)
    llm.create_completion("Pick a number from 1 to 10?:\n", max_tokens=1, temperature=0)
    llm.set_seed(1337)
    state = llm.save_state()
    assert isinstance(state, LlamaState) and state.n_streamed == llm.n_streamed and state.seed == 1337

    def sample() -> tuple[str, str]:
        number = llm.create_completion(
            "Pick a number from 1 to 10?:\n", max_tokens=4, temperature=1.0, grammar=NUMBER
        )
        story = llm.create_completion("Once upon a time", max_tokens=4, temperature=1.0)
        return number["choices"][0]["text"], story["choices"][0]["text"]

    first = sample()
    second = sample()
    llm.load_state(state)
    third = sample()
    assert first == third
    assert first[1] != second[1]  # the session's seed moved on between the first two
    llm.close()


@pytest.mark.parametrize(
    "policy",
    [InfMLLM(budget=256, chunk=32), pytest.param(H2O(budget=256, chunk=32), marks=pytest.mark.slow)],
    ids=["infmllm", "h2o"],
)
def test_in_memory_round_trip_after_evictions(model_path, text_tokens, policy):
    a = session(model_path, policy)
    a.eval(text_tokens[:500])  # several evictions
    b = session(model_path, policy)
    b.eval(text_tokens[5000:5040])  # something else, replaced by the load
    b.load_state(a.save_state())
    b.check_invariants()
    assert a.kv_stats() == b.kv_stats()
    assert np.array_equal(a.history, b.history)
    assert np.array_equal(a.cached_stream_indices(), b.cached_stream_indices())
    assert np.array_equal(
        a.session.stream.last_logits, b.session.stream.last_logits
    )  # the next token's logits
    pa, pb = a.session.stream.view(), b.session.stream.view()
    np.testing.assert_array_equal(a.policy.scores(pa), b.policy.scores(pb))  # H2O's sums, by position
    # the cells go back where they were, so later batches land, and round, as they would have
    assert np.array_equal(a.kv.cells().cells, b.kv.cells().cells) and a.kv.head() == b.kv.head()
    evictions = a.kv_stats()["evictions"]
    la, lb = a.stream_logprobs(text_tokens[500:564]), b.stream_logprobs(text_tokens[500:564])
    assert a.kv_stats()["evictions"] > evictions  # the later batches evicted too
    assert np.array_equal(la, lb, equal_nan=True)
    assert a.kv_stats() == b.kv_stats()
    a.close()
    b.close()


FRESH = """
import json, sys
import numpy as np
from infmllm_gguf import InfMLLM, Llama, Recall
llm = Llama(sys.argv[1], n_ctx=320, kv_policy=InfMLLM(budget=256, chunk=32), recall=Recall(), n_threads=2)
llm.load_session(sys.argv[2])
llm.check_invariants()
out = {"stats": llm.kv_stats(), "recalled": llm.recalled(), "logits": llm.session.stream.last_logits.tolist(),
       "n_streamed": llm.n_streamed}
tokens = json.loads(sys.argv[3])
out["logprobs"] = llm.stream_logprobs(tokens).tolist()
llm.feed("\\nWho made the heaven and the earth?")
out["answer"] = llm.generate_text(8)
print(json.dumps(out))
"""


def test_session_file_restores_in_a_fresh_process(model_path, text_tokens, tmp_path):
    """Cells after eviction, history, recall store and recalled pages survive the process."""
    llm = session(model_path, recall=Recall())
    llm.eval(text_tokens[:500])
    llm.feed("\nWho was the first man?")
    llm.generate_text(4)  # a turn: the recall tier brings pages back
    path = tmp_path / "session.bin"
    nbytes = llm.save_session(path)
    assert path.stat().st_size == nbytes
    saved = {"stats": llm.kv_stats(), "recalled": llm.recalled(), "logits": llm.session.stream.last_logits}
    assert saved["stats"]["pages_recalled"] > 0 and saved["recalled"]
    more = text_tokens[500:550]
    expected = llm.stream_logprobs(more)
    llm.feed("\nWho made the heaven and the earth?")
    answer = llm.generate_text(8)
    run = subprocess.run(
        [sys.executable, "-c", FRESH, model_path, str(path), json.dumps(more.tolist())],
        capture_output=True, text=True, timeout=300, check=True, cwd=tmp_path,  # not the checkout
    )  # fmt: skip
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["stats"] == json.loads(json.dumps(saved["stats"]))
    assert [tuple(r) for r in got["recalled"]] == saved["recalled"]
    assert np.array_equal(np.array(got["logits"], np.float32), saved["logits"])  # identical next-token logits
    assert np.array_equal(np.array(got["logprobs"]), expected, equal_nan=True)
    assert got["answer"] == answer
    llm.close()


@pytest.mark.slow  # a long stream: the slow suite
def test_a_turn_saved_before_its_answer_recalls_after_a_restore(model_path, text_tokens):
    """The captured queries travel with the state: a question fed but not yet answered brings back
    the same pages, and gets the same answer, in the session it was restored into."""
    a = session(model_path, recall=Recall())
    a.eval(text_tokens[:2000])
    a.feed("\nWho was the first man?")
    b = session(model_path, recall=Recall())
    b.load_state(a.save_state())
    answers = [llm.generate_text(8) for llm in (a, b)]
    assert a.recalled() and a.recalled() == b.recalled()
    assert answers[0] == answers[1] and a.kv_stats() == b.kv_stats()
    a.close()
    b.close()


def _continuation(llm: Llama) -> tuple[int, str]:
    mark = llm.n_streamed
    llm.feed(" And")
    text = llm.generate_text(6)
    assert llm.rewind(mark)
    return mark, text


@pytest.fixture(scope="module")
def evicted(model_path, text_tokens, tmp_path_factory) -> tuple[LlamaState, Path]:
    """A session past several evictions, streamed once for the tests that only load it: its
    state and its session file (neither is changed by them)."""
    llm = session(model_path)
    llm.eval(text_tokens[:500])
    path = tmp_path_factory.mktemp("evicted") / "s.bin"
    llm.save_session(path)
    state = llm.save_state()
    llm.close()
    return state, path


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_damaged_session_file_is_refused_and_nothing_changes(
    model_path, text_tokens, tmp_path, evicted, damage
):
    llm = session(model_path)
    llm.load_session(evicted[1])
    path = tmp_path / "s.bin"
    data = bytearray(evicted[1].read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) * 2 // 3]
    elif damage == "garbage":
        data = bytearray(np.random.default_rng(0).bytes(4096))
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    llm.eval(text_tokens[500:540])
    before = _continuation(llm)
    with pytest.raises(StateError):
        llm.load_session(path)
    llm.check_invariants()
    assert _continuation(llm) == before
    llm.close()


@pytest.mark.parametrize(
    "other, match",
    [
        ({"policy": StreamingLLM(budget=256, chunk=32)}, "policy"),
        ({"policy": InfMLLM(budget=240, chunk=32)}, "policy"),
        ({"recall": Recall()}, "recall"),
    ],
    ids=["other policy", "other budget", "recall tier"],
)
def test_mismatched_session_is_refused(model_path, text_tokens, evicted, other, match):
    state = evicted[0]
    b = session(model_path, **other)
    b.eval(text_tokens[:40])
    before = _continuation(b)
    with pytest.raises(StateError, match=match):
        b.load_state(state)
    assert _continuation(b) == before
    c = Llama(model_path, n_ctx=384, kv_policy=InfMLLM(budget=256, chunk=32), n_threads=2)
    with pytest.raises(StateError, match="n_ctx"):
        c.load_state(state)
    with pytest.raises(FileNotFoundError):
        c.load_session("/nonexistent/session.bin")
    for llm in (b, c):
        llm.close()
