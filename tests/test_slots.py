"""Sequence slots: several endless streams in one context, each scored, evicted and compacted
alone in a KV stream of its own."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from infmllm_gguf import H2O, InfMLLM, Llama, Recall


def policy() -> InfMLLM:
    return InfMLLM(budget=256, chunk=32)


@pytest.mark.slow  # a long stream: the slow suite
def test_each_slot_streams_as_a_llama_of_its_own(model_path, text_tokens):
    """Two slots fed in turns, both past many evictions: each gives the log-probs and keeps the
    cells a single-stream Llama gives for its text."""
    multi = Llama(model_path, n_ctx=320, kv_policy=policy(), n_slots=3, n_threads=2, debug=True)
    one, two = multi.slot(1), multi.slot(2)
    assert (one.seq_id, two.seq_id, multi.slot(0) is multi, multi.slot(1) is one) == (1, 2, True, True)
    texts = {one: text_tokens[:1200], two: text_tokens[3000:4200]}
    got: dict[Llama, list[np.ndarray]] = {one: [], two: []}
    for i in range(0, 1200, 300):
        for llm, toks in texts.items():
            got[llm].append(llm.stream_logprobs(toks[i : i + 300]))
    assert multi.n_streamed == 0  # slot 0 untouched
    for llm, toks in texts.items():
        alone = Llama(model_path, n_ctx=320, kv_policy=policy(), n_threads=2)
        np.testing.assert_array_equal(np.concatenate(got[llm]), alone.stream_logprobs(toks))
        assert np.array_equal(llm.cached_stream_indices(), alone.cached_stream_indices())
        stats = llm.kv_stats()
        assert stats["evictions"] > 20 and stats["n_cached"] <= 288 and stats["max_pos_seen"] < 288
        alone.close()
    multi.close()


def test_a_session_saved_in_one_slot_continues_in_another(model_path, text_tokens):
    multi = Llama(
        model_path, n_ctx=320, kv_policy=H2O(budget=256, chunk=32), n_slots=2, recall=Recall(), n_threads=2
    )
    multi.eval(text_tokens[:500])  # several evictions: the recall store holds what they took
    assert multi.kv_stats()["evictions"] > 0
    state = multi.save_state()
    expected = multi.stream_logprobs(text_tokens[500:564])
    other = multi.slot(1)
    other.load_state(state)
    np.testing.assert_array_equal(other.stream_logprobs(text_tokens[500:564]), expected)
    assert other.kv_stats() == multi.kv_stats()
    multi.close()


def test_slot_closing_and_bad_slots(model_path, text_tokens):
    multi = Llama(model_path, n_ctx=320, kv_policy=policy(), n_slots=2, n_threads=2)
    with pytest.raises(ValueError, match="n_slots"):
        multi.slot(2)
    with pytest.raises(ValueError, match="seq_id"):
        multi.slot(-1)
    one = multi.slot(1)
    one.eval(text_tokens[:40])
    one.close()
    assert multi.kv.n_cells(1) == 0  # its cells are freed
    again = multi.slot(1)
    assert again is not one and again.n_streamed == 0
    again.eval(text_tokens[:20])
    multi.close()  # closes its slots too


def test_threads_on_different_slots_take_turns(model_path, text_tokens):
    small = InfMLLM(budget=128, chunk=32)  # evicting within a few pieces
    multi = Llama(model_path, n_ctx=192, kv_policy=small, n_slots=2, n_threads=2, debug=True)
    errors: list[BaseException] = []

    def run(llm: Llama, toks: np.ndarray) -> None:
        try:
            for i in range(0, len(toks), 60):
                llm.eval(toks[i : i + 60])
                llm.generate_text(max_tokens=3)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(multi.slot(s), text_tokens[s * 2000 : s * 2000 + 300]))
        for s in (0, 1)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s in (0, 1):
        multi.slot(s).check_invariants()
        assert multi.slot(s).kv_stats()["evictions"] > 0
    multi.close()
