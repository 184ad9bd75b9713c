"""Sessions generating at once share decode steps (continuous batching), and each gets exactly
what it would get alone: the same tokens at temperature 0, the same kept cells; one session's
failure, or its prompt arriving while the others generate, changes nothing for the others."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest

from infmllm_gguf import InfMLLM, Llama

N_SLOTS = 3
PROMPT = 100
GEN = 32


@pytest.fixture(scope="module")
def llm(model_path):
    # n_batch 64: a prompt goes in 64-token pieces alone and beside others alike; evictions
    # every 16 cells, the saddles scored in the steps before each
    policy = InfMLLM(budget=96, chunk=16)
    llm = Llama(model_path, n_ctx=256, n_batch=64, kv_policy=policy, n_slots=N_SLOTS, n_threads=2)
    yield llm
    llm.close()


def prompts(text_tokens: np.ndarray) -> list[list[int]]:
    return [[int(t) for t in text_tokens[1000 * i : 1000 * i + PROMPT]] for i in range(N_SLOTS)]


def generate(slot: Llama, prompt: list[int], max_tokens: int = GEN) -> dict:
    slot.reset()
    text = slot.create_completion(prompt, max_tokens=max_tokens, temperature=0)["choices"][0]["text"]
    return {"text": text, "kept": slot.cached_stream_indices(), "evicted": slot.kv_stats()["n_evicted"]}


def concurrently(jobs: dict[int, Callable[[], dict]]) -> dict[int, dict | BaseException]:
    """Run each job in a thread of its own, all started together; results or exceptions by key."""
    out: dict[int, dict | BaseException] = {}
    start = threading.Barrier(len(jobs))

    def run(key: int, job: Callable[[], dict]) -> None:
        start.wait()
        try:
            out[key] = job()
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            out[key] = exc

    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


@pytest.fixture(scope="module")
def alone(llm, text_tokens) -> list[dict]:
    """Each slot's completion with no other session decoding."""
    return [generate(llm.slot(i), p) for i, p in enumerate(prompts(text_tokens))]


def same(got: dict, expected: dict) -> None:
    assert got["text"] == expected["text"]
    np.testing.assert_array_equal(got["kept"], expected["kept"])
    assert got["evicted"] == expected["evicted"] > 0


def test_sessions_generating_at_once_share_steps_and_match_alone(llm, text_tokens, alone):
    stats = llm.engine.steps.stats
    shared_before = sum(n for size, n in stats.sizes.items() if size > 1)
    slots = [llm.slot(i) for i in range(N_SLOTS)]
    jobs = {i: (lambda i=i, p=p: generate(slots[i], p)) for i, p in enumerate(prompts(text_tokens))}
    got = concurrently(jobs)
    for i in range(N_SLOTS):
        same(got[i], alone[i])
    shared = sum(n for size, n in stats.sizes.items() if size > 1) - shared_before
    assert shared >= GEN // 2  # most generated tokens were decoded beside another session's
    assert stats.sizes.get(N_SLOTS, 0) > 0 and stats.timeouts == 0


def test_one_sessions_failure_leaves_the_others_alone(llm, text_tokens, alone):
    """The last slot's logits processor fails at its tenth token, inside a turn: its turn is
    undone, the others generate what they generate alone, and it goes on as before."""
    slots = [llm.slot(i) for i in range(N_SLOTS)]
    ps = prompts(text_tokens)
    last = N_SLOTS - 1
    slots[last].reset()
    slots[last].eval(ps[last][:50])
    before = (slots[last].n_streamed, slots[last].cached_stream_indices())
    calls = []

    def failing(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        calls.append(1)
        if len(calls) == 10:
            raise RuntimeError("the processor broke")
        return scores

    def broken() -> dict:
        with slots[last].turn():
            tail = ps[last][50:]
            slots[last].create_completion(tail, max_tokens=GEN, temperature=0, logits_processor=[failing])
        return {}

    jobs: dict[int, Callable[[], dict]] = {i: (lambda i=i: generate(slots[i], ps[i])) for i in range(last)}
    jobs[last] = broken
    got = concurrently(jobs)
    assert isinstance(got[last], RuntimeError) and len(calls) == 10
    for i in range(last):
        same(got[i], alone[i])
    assert slots[last].n_streamed == before[0]
    np.testing.assert_array_equal(slots[last].cached_stream_indices(), before[1])
    slots[last].check_invariants()
    same(generate(slots[last], ps[last]), alone[last])


def test_a_prompt_arriving_mid_generation_is_fed_between_tokens(llm, text_tokens, alone):
    """Slot 1's prompt arrives while slot 0 generates: it is fed in pieces of at most
    prefill_chunk tokens in steps that also decode slot 0's tokens, and both get what they get
    alone."""
    steps = llm.engine.steps
    slots = [llm.slot(0), llm.slot(1)]
    ps = prompts(text_tokens)
    started = threading.Event()
    seen: list[tuple[int, ...]] = []
    decode = steps._decode_call

    def watch(pieces, mode, last):  # which sequences, and how many tokens each, every call decodes
        seen.append(tuple(len(p) if p.seq_id == 1 else -1 for p in pieces))
        if any(p.seq_id == 0 for p in pieces) and len(seen) > 3:
            started.set()
        return decode(pieces, mode, last)

    steps._decode_call = watch
    try:

        def late() -> dict:
            assert started.wait(60)
            return generate(slots[1], ps[1])

        got = concurrently({0: lambda: generate(slots[0], ps[0], 3 * GEN), 1: late})
    finally:
        del steps._decode_call
    first = next(i for i, call in enumerate(seen) if any(n > 1 for n in call))
    prompt_calls = [call for call in seen[first:] if any(n > 1 for n in call)]
    assert sum(n for call in prompt_calls for n in call if n > 0) == PROMPT
    assert all(n <= steps.prefill_chunk for call in prompt_calls for n in call)
    # slot 0 decoded tokens between slot 1's prompt pieces: the prompt did not stall it
    between = seen[first : first + len(prompt_calls) * 2]
    assert any(-1 in call for call in between)
    same(got[1], alone[1])
    assert got[0]["text"].startswith(alone[0]["text"])
