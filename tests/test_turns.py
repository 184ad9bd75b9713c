"""`Llama.turn()`: a call that fails, is cancelled or runs past its deadline leaves the session
exactly as it was before the call (evictions, recalls and roll-backs undone), and its `poll`
hook stops a generation within a token; `restart_on_divergence=False` refuses a prompt that
departs from the stream where it can no longer be taken back."""

from __future__ import annotations

import numpy as np
import pytest

from infmllm_gguf import H2O, HistoryDivergedError, InfMLLM, Llama, Recall, StopGeneration
from infmllm_gguf.state import unpack
from infmllm_gguf.texts import genesis

BUDGET = 128


def state_of(llm: Llama) -> tuple[dict, dict[str, np.ndarray]]:
    facts, arrays = unpack(llm.save_state().data)
    return facts, arrays


def assert_same_state(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert np.array_equal(a[1][name], b[1][name], equal_nan=True), name


class Boom(Exception):
    pass


class BoomOnCall:
    """A poll hook that raises Boom on its n-th call; `calls` counts them."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls == self.n:
            raise Boom


def make(model_path, policy, **kw) -> Llama:
    return Llama(model_path, n_ctx=2 * BUDGET, kv_policy=policy, n_threads=2, seed=7, debug=True, **kw)


@pytest.mark.parametrize(
    ("policy", "recall"),
    [
        (InfMLLM(budget=BUDGET), None),
        (H2O(budget=BUDGET), None),  # scores accumulate on every decode
        (InfMLLM(budget=BUDGET), Recall(when="chunk")),
    ],
    ids=["infmllm", "h2o", "infmllm-recall"],
)
def test_a_failed_turn_is_undone_exactly(model_path, policy, recall):
    """Failing after evictions (and recalls) inside the turn: the state, byte for byte, and the
    next answer are those of a session the turn never happened to."""
    text = genesis()[:1200]
    a, b = make(model_path, policy, recall=recall), make(model_path, policy, recall=recall)
    for llm in (a, b):
        llm.feed(text[:700])  # past the budget: the cache is full
        llm.generate_text(4)
    before = state_of(a)
    with pytest.raises(Boom):
        with a.turn(poll=BoomOnCall(16)):  # polled between pieces, then before each token
            a.feed(text[700:])  # several evictions
            a.generate_text(100, temperature=0.9)
    assert a.kv_stats()["evictions"] == b.kv_stats()["evictions"]
    assert_same_state(state_of(a), before)
    for llm in (a, b):
        llm.feed(" And then")
    assert a.generate_text(12, temperature=0.8) == b.generate_text(12, temperature=0.8)
    a.check_invariants()


def test_a_turn_without_evictions_costs_no_copy_and_is_undone(model_path):
    llm = make(model_path, InfMLLM(budget=BUDGET))
    llm.feed("In the beginning God created the heaven and the earth.")
    before = state_of(llm)
    with pytest.raises(Boom):
        with llm.turn():
            llm.feed(" And the earth was without form")
            assert llm.session.stream._transaction.saved is None  # appending only: nothing copied
            raise Boom
    assert_same_state(state_of(llm), before)


def test_stop_generation_ends_the_reply_as_length_and_keeps_it(model_path):
    llm = make(model_path, InfMLLM(budget=BUDGET))
    n_tokens = 0

    def poll() -> None:
        if n_tokens >= 5:
            raise StopGeneration

    def count(input_ids, logits) -> bool:
        nonlocal n_tokens
        n_tokens += 1
        return False

    with llm.turn(poll=poll):
        out = llm.create_completion("Once upon a time", max_tokens=50, stopping_criteria=count, temperature=0)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 5
    assert llm.n_streamed == out["usage"]["total_tokens"]


def test_a_poll_raising_during_the_prompt_stops_it_between_pieces(model_path):
    small = InfMLLM(budget=32)  # a capacity of 48
    llm = Llama(model_path, n_ctx=64, kv_policy=small, n_batch=16, n_threads=2)
    poll = BoomOnCall(3)
    with pytest.raises(Boom):
        with llm.turn(poll=poll):
            llm.create_completion(genesis()[:1000], max_tokens=4)
    assert poll.calls == 3 and llm.n_streamed == 0  # three pieces of 16 decoded (an eviction), undone


def test_a_streamed_turn_abandoned_midway_is_undone(model_path):
    llm = make(model_path, InfMLLM(budget=BUDGET // 4))
    llm.create_completion("The sea", max_tokens=4, temperature=0)
    before = state_of(llm)
    with pytest.raises(Boom):
        with llm.turn():  # the prompt, past the cache's capacity, evicts before the abandon
            for i, _ in enumerate(llm.create_completion(genesis()[:300], max_tokens=40, stream=True)):
                if i == 5:
                    raise Boom
    assert_same_state(state_of(llm), before)


def test_a_departing_history_is_refused_where_it_cannot_be_taken_back(model_path):
    llm = make(model_path, InfMLLM(budget=BUDGET))
    llm.restart_on_divergence = False
    text = genesis()[:800]  # past the budget: the start is evicted
    llm.create_completion(text, max_tokens=2)
    before = state_of(llm)
    with pytest.raises(HistoryDivergedError, match="evicted"):
        llm.create_completion("Something else entirely", max_tokens=2)
    assert_same_state(state_of(llm), before)
    tail = llm.tokenize(text)[: llm.n_streamed - 1]  # departs inside the cached tail: rolled back
    assert llm.create_completion(tail + [11], max_tokens=2)["choices"]
    llm.restart_on_divergence = True
    assert llm.create_completion("Something else entirely", max_tokens=2)["choices"]
