"""The Python runtime: policies on real streams, the llama-cpp-python surface, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from infmllm_gguf._llama_cpp import llama_cpp as lc
from reference import reference_keep

from infmllm_gguf import (
    H2O,
    POLICIES,
    ContextFullError,
    EvictingPolicy,
    FullCache,
    InfMLLM,
    KVPolicy,
    Llama,
    SlidingWindow,
    SnapKV,
    StreamingLLM,
)
from infmllm_gguf.policies import make_policy
from infmllm_gguf.texts import genesis

STREAM = 10_000
BUDGET = 128
CHUNK = 128  # batches of 128 tokens keep 10k-token streams quick on 2 cores


@pytest.fixture(scope="module")
def stream_tokens(model_path) -> np.ndarray:
    llm = Llama(model_path, n_ctx=256, kv_policy="window")
    toks = np.array(llm.tokenize(genesis(), add_bos=False), np.int32)
    llm.close()
    return np.resize(toks, STREAM)


class Recorder:
    """Wraps a policy's select/observe to check every eviction against a plain reference."""

    def __init__(self, policy):
        self.policy = policy
        self.rounds = 0
        self.acc: dict[int, float] = {}  # H2O reference accumulator, by cell
        select, observe, forget = policy.select, policy.observe, policy.forget

        def observe_hook(view, n_rows):
            for c, s in zip(view.cells.tolist(), view.scores.tolist()):
                self.acc[c] = self.acc.get(c, 0.0) + s
            observe(view, n_rows)

        def forget_hook(cells):
            for c in cells.tolist():
                self.acc.pop(c, None)
            forget(cells)

        def select_hook(view, n_keep=None):
            assert n_keep == policy.budget  # text only: every round keeps the budget
            keep = select(view, n_keep)
            np.testing.assert_array_equal(keep, self.reference(view))
            self.rounds += 1
            return keep

        policy.select, policy.observe, policy.forget = select_hook, observe_hook, forget_hook

    def reference(self, view):
        p = self.policy
        if isinstance(p, SlidingWindow):
            return reference_keep(np.zeros(len(view.cells)), p.budget, 0, p.budget, 0, 0.0)
        if isinstance(p, StreamingLLM):
            return reference_keep(np.zeros(len(view.cells)), p.budget, p.sinks, p.budget - p.sinks, 0, 0.0)
        if isinstance(p, H2O):
            acc = np.array([self.acc[c] for c in view.cells.tolist()])
            return reference_keep(acc, p.budget, 0, p.recent, 0, 0.0)
        # fresh window: eval() feeds batches longer than the window, so the newest decode covers it
        if isinstance(p, SnapKV):
            return reference_keep(view.scores, p.budget, p.sinks, p.recent, 0, 0.0)
        return reference_keep(view.scores, p.budget, p.sinks, p.recent, p.local_window, p.bias)


def run_stream(model_path, policy, tokens, n_ctx=256):
    llm = Llama(model_path, n_ctx=n_ctx, kv_policy=policy, n_batch=CHUNK)
    rec = Recorder(llm.policy)
    llm.eval(tokens)
    return llm, rec


POLICY_CASES = {
    "window": SlidingWindow(BUDGET, chunk=CHUNK),
    "streamingllm": StreamingLLM(BUDGET, chunk=CHUNK, sinks=4),
    "h2o": H2O(BUDGET, chunk=CHUNK),
    "snapkv": SnapKV(BUDGET, chunk=CHUNK),
    "infmllm": InfMLLM(BUDGET, chunk=CHUNK, recent=BUDGET // 4, local_window=2, bias=1e-3),
}


@pytest.mark.parametrize("length", [600, pytest.param(STREAM, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", list(POLICY_CASES))
def test_policy_keeps_its_rule_over_a_long_stream(model_path, stream_tokens, name, length):
    llm, rec = run_stream(model_path, POLICY_CASES[name], stream_tokens[:length])
    stats = llm.kv_stats()
    assert stats["n_streamed"] == length
    assert rec.rounds == stats["evictions"] >= (length - llm.policy.capacity) // llm.policy.chunk
    assert stats["max_pos_seen"] < llm.policy.capacity <= llm.n_ctx()
    assert stats["n_cached"] <= llm.policy.capacity
    kept = llm.cached_stream_indices()
    n = len(kept)
    if name == "window":
        np.testing.assert_array_equal(kept, np.arange(length - n, length))
    if name == "streamingllm":
        np.testing.assert_array_equal(kept[:4], np.arange(4))
        np.testing.assert_array_equal(kept[4:], np.arange(length - (n - 4), length))
    if name in ("snapkv", "infmllm"):
        np.testing.assert_array_equal(kept[:4], np.arange(4))  # sinks
        tail = n - llm.policy.budget + llm.policy.recent  # recent window + tokens since the last eviction
        np.testing.assert_array_equal(kept[-tail:], np.arange(length - tail, length))
    llm.close()


def test_h2o_accumulates_while_infmllm_scores_fresh(model_path, stream_tokens):
    toks = stream_tokens[:640]
    h2o, _ = run_stream(model_path, H2O(BUDGET, chunk=CHUNK), toks)
    inf, _ = run_stream(
        model_path, InfMLLM(BUDGET, chunk=CHUNK, recent=BUDGET // 4, local_window=0, bias=0.0), toks
    )
    # InfMLLM ranks by the newest window only: exactly the latest decode's attention
    view = inf.kv.cells()
    np.testing.assert_allclose(inf.policy.window_scores(view), view.scores, rtol=1e-6)
    # H2O ranks by everything each cell has received: far more than the latest decode gave
    hview = h2o.kv.cells()
    acc = h2o.policy._acc[hview.cells]
    old = slice(0, 64)  # cells that have seen many decodes
    assert np.all(acc[old] >= hview.scores[old])
    assert acc[old].sum() > 5 * hview.scores[old].sum()
    # and so they keep different tokens from the same stream
    assert set(h2o.cached_stream_indices()) != set(inf.cached_stream_indices())
    h2o.close()
    inf.close()


def saddle_ages(llm) -> np.ndarray:
    """Ages (tokens since fed) of kept saddles: neither sinks nor the recent window."""
    kept = llm.cached_stream_indices()
    n_streamed = llm.kv_stats()["n_streamed"]
    p = llm.policy
    saddles = kept[p.sinks : len(kept) - (len(kept) - p.budget + p.recent)]
    return n_streamed - saddles


@pytest.mark.slow
def test_bias_keeps_the_cache_turning_over(model_path, stream_tokens):
    """Paper Table 4: without bias, old saddles squat in the cache and the kept set freezes."""
    frozen, _ = run_stream(
        model_path,
        InfMLLM(BUDGET, chunk=CHUNK, recent=BUDGET // 4, local_window=2, bias=0.0),
        stream_tokens[:10_000],
    )
    turning, _ = run_stream(
        model_path,
        InfMLLM(BUDGET, chunk=CHUNK, recent=BUDGET // 4, local_window=2, bias=0.1),
        stream_tokens[:10_000],
    )
    old = 4 * BUDGET
    frozen_old = np.mean(saddle_ages(frozen) > old)
    turning_old = np.mean(saddle_ages(turning) > old)
    assert frozen_old > 0.2  # many saddles older than 4 budgets survive without bias
    assert turning_old < frozen_old / 2  # the bias turns them over
    frozen.close()
    turning.close()


def test_stream_logprobs_match_llama_cpp_python(model_path, stream_tokens):
    from infmllm_gguf._llama_cpp import Llama as PlainLlama

    toks = stream_tokens[:150]
    llm = Llama(model_path, n_ctx=512, kv_policy=InfMLLM(budget=400), n_batch=512)
    ours = llm.stream_logprobs(toks)
    assert np.isnan(ours[0]) and np.all(np.isfinite(ours[1:]))
    plain = PlainLlama(model_path, n_ctx=512, n_batch=512, logits_all=True, verbose=False)
    plain.eval(toks.tolist())
    logits = np.asarray(plain.scores[: len(toks)], np.float64)
    lsm = logits - logits.max(1, keepdims=True)
    lsm -= np.log(np.exp(lsm).sum(1, keepdims=True))
    np.testing.assert_allclose(ours[1:], lsm[np.arange(len(toks) - 1), toks[1:]], atol=1e-4)
    # continuing the stream scores the first new token with the previous logits
    more = llm.stream_logprobs(stream_tokens[150:160])
    assert np.all(np.isfinite(more))
    llm.close()


def test_full_cache_fails_clearly_at_n_ctx_and_stays_usable(model_path, stream_tokens):
    llm = Llama(model_path, n_ctx=256, kv_policy="full")
    llm.eval(stream_tokens[:200])
    with pytest.raises(ContextFullError, match="n_ctx is 256"):
        llm.eval(stream_tokens[200:300])
    assert llm.kv_stats()["n_streamed"] == 200  # nothing of the failed call was fed
    llm.eval(stream_tokens[200:250])
    assert llm.kv_stats()["n_cached"] == 250
    llm.close()


@pytest.mark.slow  # a long stream: the slow suite
def test_evicting_policies_run_past_n_ctx(model_path, stream_tokens):
    llm = Llama(model_path, n_ctx=256, kv_policy=StreamingLLM(budget=192))
    llm.eval(stream_tokens[:3000])
    stats = llm.kv_stats()
    assert stats["n_streamed"] == 3000 and stats["max_pos"] < 256 and stats["n_evicted"] > 2700
    positions, scores = llm.saddle_scores()
    np.testing.assert_array_equal(positions, np.arange(stats["n_cached"]))
    assert np.all(scores == 0)  # StreamingLLM needs no scores, so none are computed
    llm.close()


def test_saddle_scores_are_raw_attention_mass(model_path, stream_tokens):
    llm = Llama(model_path, n_ctx=512, kv_policy=InfMLLM(budget=256))  # capacity 288
    llm.eval(stream_tokens[:285])  # ends inside the newest 8 rows before an eviction: scored
    positions, scores = llm.saddle_scores()
    n_layer = lc.llama_model_n_layer(llm.engine.model.model)
    n_head = lc.llama_model_n_head(llm.engine.model.model)
    assert len(positions) == 285
    assert scores.sum() == pytest.approx(n_layer * n_head * 8, rel=1e-4)
    llm.close()


def test_fresh_window_scores_only_the_decodes_an_eviction_ranks_by(model_path, stream_tokens):
    policy = InfMLLM(budget=64, chunk=16, retrieval_window=8)  # capacity 80
    llm = Llama(model_path, n_ctx=256, kv_policy=policy)
    llm.eval(stream_tokens[:60])
    assert llm.kv.scoring == 0 and np.all(llm.saddle_scores()[1] == 0)
    ranked, select = [], llm.policy.select

    def recording_select(view, n_keep=None):
        ranked.append(llm.policy.window_scores(view))
        return select(view, n_keep)

    llm.policy.select = recording_select
    for i in range(60, 80):  # single tokens: 72 .. 79 are the newest 8 rows before the eviction
        llm.eval(stream_tokens[i : i + 1])
        assert llm.kv.scoring == (8 if i >= 72 else 0), i
    llm.eval(stream_tokens[80:81])  # the cache is full: evict, then decode
    n_layer = lc.llama_model_n_layer(llm.engine.model.model)
    n_head = lc.llama_model_n_head(llm.engine.model.model)
    # the eviction ranked by exactly 8 query rows, each a softmax per layer and head
    assert len(ranked) == 1 and ranked[0].sum() == pytest.approx(n_layer * n_head * 8, rel=1e-4)
    assert llm.kv.scoring == 0  # the decode after the eviction is far from the next one
    llm.close()


@pytest.mark.slow
def test_chat_runs_fifty_rounds_far_past_n_ctx(model_path):
    llm = Llama(model_path, n_ctx=384, kv_policy=InfMLLM(budget=192), seed=0)
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(52):
        messages.append(
            {"role": "user", "content": f"Round {i}: name an animal that starts with {chr(65 + i % 26)}."}
        )
        reply = llm.create_chat_completion(messages, max_tokens=12, temperature=0.0)
        text = reply["choices"][0]["message"]["content"]
        assert text.strip(), f"empty reply in round {i}"
        messages.append({"role": "assistant", "content": text})
    stats = llm.kv_stats()
    total = reply["usage"]["prompt_tokens"]
    assert total > 4 * llm.n_ctx()
    assert stats["max_pos"] < llm.n_ctx() and stats["evictions"] > 0
    # the history is continued, not re-fed: streamed tokens stay close to the conversation length
    assert stats["n_streamed"] < 1.5 * (total + 12)
    llm.close()


def test_streaming_completion_yields_chunks(model_path):
    llm = Llama(model_path, n_ctx=512, kv_policy=InfMLLM(budget=256))
    chunks = list(llm.create_completion("The sea is", max_tokens=8, temperature=0.0, stream=True))
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == llm.create_completion("The sea is", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    chat = list(llm.create_chat_completion([{"role": "user", "content": "Hi!"}], max_tokens=8, stream=True))
    assert chat[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chat).strip()
    llm.close()


def test_tokenize_detokenize_round_trip(model_path):
    llm = Llama(model_path, n_ctx=256, kv_policy="window")
    toks = llm.tokenize(b"In the beginning", add_bos=False)
    assert llm.detokenize(toks) == b"In the beginning"
    llm.close()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Llama(kv_policy="lru"), "unknown kv_policy 'lru'; valid names: infmllm, streamingllm, h2o"),
        (lambda: Llama(n_ctx=512, kv_policy=InfMLLM(budget=1024)), r"exceeds n_ctx \(512\)"),
        (lambda: InfMLLM(budget=64, sinks=4, recent=80), r"budget \(64\) must be >= sinks \+ recent"),
        (lambda: InfMLLM(budget=256, bias=float("nan")), "bias must be a finite number"),
        (lambda: InfMLLM(budget=256, bias=-1e-3), "bias must be a finite number"),
        (lambda: InfMLLM(budget=-5), "budget must be an integer >= 1"),
        (lambda: H2O(budget=128, recent=-1), "recent must be an integer >= 0"),
        (lambda: StreamingLLM(budget=2, sinks=4), r"budget \(2\) must be >= sinks"),
    ],
)
def test_bad_configuration_is_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file not found"):
        Llama(tmp_path / "missing.gguf")
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_bytes(b"hello world, not a model")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        Llama(not_gguf)


def test_truncated_model_file(tmp_path, model_path):
    truncated = tmp_path / "truncated.gguf"
    with open(model_path, "rb") as src:
        truncated.write_bytes(src.read(2_000_000))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Llama(truncated)


def test_failed_calls_leave_the_session_usable(model_path):
    llm = Llama(model_path, n_ctx=512, kv_policy=InfMLLM(budget=256))
    llm.feed("In the beginning God created the heaven and the earth.")
    before = llm.kv_stats()
    with pytest.raises(ValueError, match="tokenises to no tokens"):
        llm.feed("")
    with pytest.raises(ValueError, match="token ids must be in"):
        llm.eval([10**7])
    with pytest.raises(ValueError, match="max_tokens must be >= 0"):
        llm.generate_text(max_tokens=-1)
    with pytest.raises(ValueError, match="temperature must be"):
        llm.generate_text(temperature=float("nan"))
    assert llm.kv_stats() == before
    assert llm.generate_text(max_tokens=5).strip()
    llm.close()


def test_policy_by_name_and_reset(model_path, stream_tokens):
    llm = Llama(model_path, n_ctx=2048, kv_policy="snapkv")
    assert isinstance(llm.policy, SnapKV) and llm.policy.budget == 1024
    llm.close()
    llm = Llama(model_path, n_ctx=2048, kv_policy="h2o")
    assert isinstance(llm.policy, H2O) and llm.policy.budget == 1024
    llm.eval(stream_tokens[:50])
    assert llm.kv.scoring == -1  # H2O scores every query row of every decode
    llm.reset()
    assert llm.kv_stats()["n_streamed"] == 0 and llm.kv_stats()["n_cached"] == 0
    assert isinstance(Llama(model_path, n_ctx=256, kv_policy="full").policy, FullCache)
    llm.close()


def test_no_eviction_is_a_policy_without_a_budget():
    full = make_policy("full", budget=64)
    assert isinstance(full, FullCache) and isinstance(full, KVPolicy) and not full.evicts
    assert not isinstance(full, EvictingPolicy) and not hasattr(full, "budget")
    for name, cls in POLICIES.items():
        if cls is not FullCache:
            policy = make_policy(name, budget=64)
            assert isinstance(policy, EvictingPolicy) and policy.evicts and policy.capacity == 64 + 16


def test_ask_appends_a_chat_turn_and_the_stream_goes_on(model_path, stream_tokens):
    llm = Llama(model_path, n_ctx=384, kv_policy=InfMLLM(budget=192))
    llm.eval(stream_tokens[:500])
    before = llm.kv_stats()["n_streamed"]
    answer = llm.ask("Who created the heaven and the earth?", max_tokens=16)
    assert answer
    assert llm.engine.is_eog(int(llm.history[-1])) or len(llm.history) - before >= 16
    llm.feed("\nAnd the story goes on.")
    assert llm.kv_stats()["max_pos"] < llm.n_ctx()
    llm.close()


def test_rewind_takes_back_a_question_asked_aside(model_path, stream_tokens):
    """After a rewind the stream is as if the question had never been fed: same history, same
    next logits; once an eviction has taken part of what followed, nothing is taken back."""
    llm = Llama(model_path, n_ctx=384, kv_policy=InfMLLM(budget=256, chunk=64), debug=True)
    twin = Llama(model_path, n_ctx=384, kv_policy=InfMLLM(budget=256, chunk=64))
    try:
        for stream in (llm, twin):
            stream.eval(stream_tokens[:340])  # one eviction each, alike; 276 of 320 cells then
        mark = llm.n_streamed
        llm.feed("\nQuestion: who made the earth?\nAnswer:", add_bos=False)
        llm.generate_text(8, temperature=0.0)
        assert llm.rewind(mark)
        assert np.array_equal(llm.history, twin.history)
        for stream in (llm, twin):
            stream.eval(stream_tokens[340:350])
        np.testing.assert_allclose(llm.session.stream.last_logits, twin.session.stream.last_logits, atol=1e-3)

        mark = llm.n_streamed
        llm.eval(stream_tokens[350:700])  # more than the budget: part of it is evicted
        n = llm.n_streamed
        assert not llm.rewind(mark) and llm.n_streamed == n
        for bad in (-1, n + 1, 1.5):
            with pytest.raises(ValueError, match="n_streamed"):
                llm.rewind(bad)
        llm.check_invariants()
    finally:
        llm.close()
        twin.close()
