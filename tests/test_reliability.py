"""Reliability of a session: interrupts, stop strings, threads, sampling seeds, configuration.

Interrupts are real SIGINTs sent to the main thread at random moments of real decodes,
evictions and generations; after each one the cache and the stream's records must agree,
and the stream must go on as if nothing had happened.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import logits_of

from infmllm_gguf import H2O, InfMLLM, Llama, Recall, StreamingLLM
from infmllm_gguf.kv import KVCache, decode
from infmllm_gguf.stops import StopMatcher
from infmllm_gguf.system import physical_cores
from infmllm_gguf.texts import genesis


@pytest.fixture(scope="module")
def tokens(model_path) -> np.ndarray:
    llm = Llama(model_path, n_ctx=256, kv_policy="window")
    toks = np.array(llm.tokenize(genesis(), add_bos=True), np.int32)
    llm.close()
    return toks


class Interrupter:
    """Sends one real SIGINT to the main thread after a delay; `settle()` waits until it has landed."""

    def __init__(self, delay: float):
        self.fired = threading.Event()
        self.timer = threading.Timer(delay, self._fire)

    def _fire(self) -> None:
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        self.fired.set()

    def start(self) -> Interrupter:
        self.timer.start()
        return self

    def settle(self) -> None:
        """Call inside the try: the pending KeyboardInterrupt is raised here at the latest."""
        self.fired.wait()
        for _ in range(1000):
            time.sleep(0.001)
        raise AssertionError("the SIGINT never arrived")


def stream_with_interrupts(llm: Llama, tokens: np.ndarray, delays: np.ndarray) -> int:
    """Feed tokens, interrupted at each delay; resume from what the stream recorded each time."""
    interrupted = 0
    for delay in delays:
        timer = Interrupter(float(delay)).start()
        try:
            if llm.kv_stats()["n_streamed"] < len(tokens):
                llm.eval(tokens[llm.kv_stats()["n_streamed"] :])
            timer.settle()
        except KeyboardInterrupt:
            interrupted += 1
        llm.check_invariants()
    if llm.kv_stats()["n_streamed"] < len(tokens):
        llm.eval(tokens[llm.kv_stats()["n_streamed"] :])
    return interrupted


@pytest.mark.usefixtures("sigint")
@pytest.mark.parametrize(
    ("n_tokens", "n_interrupts"),
    [(600, 6), pytest.param(3000, 30, marks=pytest.mark.slow)],
    ids=["short", "long"],
)
def test_interrupts_at_random_points_leave_an_identical_stream(model_path, tokens, n_tokens, n_interrupts):
    """StreamingLLM keeps a set fixed by counts, so the interrupted run must end exactly where
    an uninterrupted one does: the same kept tokens and the same next-token logits."""
    toks = tokens[:n_tokens]

    def make() -> Llama:
        return Llama(model_path, n_ctx=256, kv_policy=StreamingLLM(128, chunk=32), n_batch=32, debug=True)

    reference = make()
    start = time.perf_counter()
    reference.eval(toks)
    full_time = time.perf_counter() - start
    delays = np.random.default_rng(0).uniform(0.0, 2 * full_time / n_interrupts, size=n_interrupts)

    llm = make()
    assert stream_with_interrupts(llm, toks, delays) == n_interrupts
    assert llm.kv_stats() == reference.kv_stats()
    np.testing.assert_array_equal(llm.cached_stream_indices(), reference.cached_stream_indices())
    np.testing.assert_array_equal(llm.history, reference.history)
    more = tokens[n_tokens : n_tokens + 40]
    ours, theirs = llm.stream_logprobs(more), reference.stream_logprobs(more)
    np.testing.assert_allclose(ours, theirs, atol=2e-3)  # ubatch splits differ: float noise only
    llm.close()
    reference.close()


@pytest.mark.usefixtures("sigint")
@pytest.mark.parametrize(
    "policy",
    [InfMLLM(128, chunk=32), pytest.param(H2O(128, chunk=32), marks=pytest.mark.slow)],
    ids=["infmllm", "h2o"],
)
def test_interrupted_scored_streams_and_generation_stay_consistent(model_path, tokens, policy):
    llm = Llama(model_path, n_ctx=256, kv_policy=policy, n_batch=32, debug=True)
    delays = np.random.default_rng(1).uniform(0.0, 0.7, size=6)
    stream_with_interrupts(llm, tokens[:800], delays)
    for delay in np.random.default_rng(2).uniform(0.0, 0.3, size=4):
        timer = Interrupter(float(delay)).start()
        try:
            llm.generate_text(max_tokens=64, temperature=0.7, seed=1)
            timer.settle()
        except KeyboardInterrupt:
            pass
        llm.check_invariants()
    llm.eval(tokens[800:900])  # still usable: decodes, evicts, scores on
    llm.check_invariants()
    assert llm.kv_stats()["evictions"] > 10
    llm.close()


@pytest.mark.usefixtures("sigint")
@pytest.mark.parametrize("when", ["chunk", pytest.param("turn", marks=pytest.mark.slow)])
def test_interrupted_recalls_leave_cache_store_and_stream_consistent(model_path, tokens, when):
    """Ctrl-C at random moments of a stream whose evictions copy rows out and whose recalls
    write rows back, re-arrange and K-shift: every time the cache, the recalled flags and the
    store agree, and recall goes on working."""
    llm = Llama(
        model_path, n_ctx=288, kv_policy=InfMLLM(256), n_batch=32, recall=Recall(when=when), debug=True
    )
    stream_with_interrupts(llm, tokens[:900], np.random.default_rng(3).uniform(0.0, 0.9, size=6))
    recalls = llm.kv_stats()["recalls"]
    for delay in np.random.default_rng(4).uniform(0.0, 0.3, size=4):
        timer = Interrupter(float(delay)).start()
        try:
            llm.eval(tokens[llm.n_streamed : llm.n_streamed + 12])  # a turn: recall, then answer
            llm.generate_text(max_tokens=16)
            timer.settle()
        except KeyboardInterrupt:
            pass
        llm.check_invariants()
    st = llm.session.stream
    own = set(st.stream_index[~st.recalled].tolist())
    for pid in st.store.page_ids():  # the store never holds a cell the policy still caches
        assert not own & set(st.store.stream_indices(int(pid)).tolist())
    llm.eval(tokens[llm.n_streamed : llm.n_streamed + 12])
    llm.generate_text(max_tokens=4)
    llm.check_invariants()
    assert llm.kv_stats()["recalls"] > recalls and llm.kv_stats()["recall_error"] is None
    llm.close()


@pytest.mark.usefixtures("sigint")
def test_ctrl_c_stops_a_long_prefill_inside_the_decode(model_path, tokens):
    """One 1024-token decode takes seconds; Ctrl-C must end it early through the abort
    callback, leaving nothing of it in the cache, rather than land after it completed."""
    llm = Llama(model_path, n_ctx=2048, kv_policy="full", n_batch=1024, debug=True)
    llm.eval(tokens[:8])
    timer = Interrupter(0.3).start()
    with pytest.raises(KeyboardInterrupt):
        llm.eval(tokens[8:1032])
        timer.settle()
    assert llm.kv_stats()["n_streamed"] == 8  # the aborted decode was rolled back whole
    llm.check_invariants()
    llm.eval(tokens[8:40])
    fresh = Llama(model_path, n_ctx=2048, kv_policy="full", n_batch=1024)
    fresh.eval(tokens[:40])
    np.testing.assert_allclose(llm.session.stream.last_logits, fresh.session.stream.last_logits, atol=2e-3)
    llm.close()
    fresh.close()


@pytest.mark.usefixtures("sigint")
def test_ctrl_c_inside_an_image_takes_the_whole_image_back(model_path, tmp_path):
    """A 1024-cell picture decoded in four batches: Ctrl-C after the first batches must take
    back the batches already decoded, restore the logits before the image and leave the stream
    able to take the same picture whole."""
    from infmllm_gguf.codebook import DEFAULT_WORDS, render_words, write_codebook_mmproj

    mmproj = write_codebook_mmproj(model_path, tmp_path / "mmproj-32.gguf", grid=32)
    picture = render_words([DEFAULT_WORDS[i % 400] for i in range(1024)], mmproj)
    llm = Llama(model_path, n_ctx=2048, kv_policy="full", n_batch=256, mmproj_path=mmproj, debug=True)
    try:
        llm.feed("A picture:")
        history, logits = llm.history.copy(), llm.session.stream.last_logits.copy()
        timer = Interrupter(1.6).start()  # each batch takes about a second on 2 cores
        with pytest.raises(KeyboardInterrupt):
            llm.feed_image(picture)
            timer.settle()
        assert np.array_equal(llm.history, history)
        np.testing.assert_array_equal(llm.session.stream.last_logits, logits)
        llm.check_invariants()
        assert llm.feed_image(picture) == 1024 and llm.n_cached == len(history) + 1024
    finally:
        llm.close()


def test_stop_matcher_holds_back_a_stop_that_spans_pieces():
    matcher = StopMatcher(["\n\nUser:"])
    out = []
    for piece in ["Hello", " world", "\n\n", "User", ":", " more"]:
        safe, hit = matcher.push(piece)
        out.append(safe)
        if hit:
            break
    assert hit and "".join(out) == "Hello world"
    assert out[2] == "" and out[3] == ""  # "\n\n" and "User" were held back, not leaked

    matcher = StopMatcher(["\n\nUser:", "END"])
    pieces = ["Hi", "\n\n", "Us", "e", "d", " to E", "N"]
    assert "".join(matcher.push(p)[0] for p in pieces) + matcher.flush() == "Hi\n\nUsed to EN"


def test_stop_string_spanning_tokens_cuts_plain_and_streamed(model_path):
    llm = Llama(model_path, n_ctx=512, kv_policy=StreamingLLM(256))
    prompt = "The first book of Moses, called Genesis. In the beginning"
    free = llm.create_completion(prompt, max_tokens=32, temperature=0.0)
    text = free["choices"][0]["text"]
    generated = llm.history[-free["usage"]["completion_tokens"] :]
    pieces = [llm.engine.piece(int(t)).decode("utf-8", "ignore") for t in generated]
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]  # two characters on each side of a token boundary
    expected = text[: text.find(stop)]

    plain = llm.create_completion(prompt, max_tokens=32, temperature=0.0, stop=[stop])
    assert plain["choices"][0]["text"] == expected
    assert plain["choices"][0]["finish_reason"] == "stop"
    chunks = list(llm.create_completion(prompt, max_tokens=32, temperature=0.0, stop=stop, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    llm.close()


def test_sampling_with_a_seed_is_reproducible(model_path):
    prompt = "Once upon a time"
    a = Llama(model_path, n_ctx=512, kv_policy=InfMLLM(256))
    b = Llama(model_path, n_ctx=512, kv_policy=InfMLLM(256))

    def sample(llm: Llama, seed: int) -> str:
        out = llm.create_completion(prompt, max_tokens=24, temperature=1.0, top_k=0, top_p=1.0, seed=seed)
        return out["choices"][0]["text"]

    first = sample(a, 7)
    assert sample(b, 7) == first  # another session, same seed
    assert sample(a, 7) == first  # the same session after the stream moved on
    assert len({sample(a, s) for s in (1, 2, 3)} | {first}) >= 3  # other seeds, other texts
    a.close()
    b.close()


def test_one_session_shared_by_threads_serialises(model_path, tokens):
    """Without the lock two threads' decodes interleave and clash on positions."""
    llm = Llama(model_path, n_ctx=512, kv_policy=StreamingLLM(256, chunk=32), n_batch=16, debug=True)
    parts = [tokens[:300], tokens[300:600]]
    errors: list[BaseException] = []

    def run(part: np.ndarray) -> None:
        try:
            for i in range(0, len(part), 100):
                llm.eval(part[i : i + 100])
                llm.generate_text(max_tokens=4)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    llm.check_invariants()
    hist = llm.history
    assert 600 < len(hist) <= 600 + 6 * 4  # every eval and up to 4 generated tokens per call
    for part in parts:  # each eval call's 100 tokens are contiguous in the stream
        for i in range(0, len(part), 100):
            chunk = part[i : i + 100]
            windows = np.lib.stride_tricks.sliding_window_view(hist, len(chunk))
            assert np.any(np.all(windows == chunk, axis=1))
    llm.close()


def test_retrieval_window_larger_than_the_ubatch_is_refused_at_creation(model_path):
    with pytest.raises(ValueError, match=r"retrieval_window \(32\) exceeds n_ubatch \(16"):
        Llama(model_path, n_ctx=512, n_batch=16, kv_policy=InfMLLM(256, retrieval_window=32))


def test_physical_cores_count_sibling_threads_once(tmp_path: Path):
    siblings = {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"}
    for cpu, text in siblings.items():
        (tmp_path / f"cpu{cpu}" / "topology").mkdir(parents=True)
        (tmp_path / f"cpu{cpu}" / "topology" / "thread_siblings_list").write_text(text + "\n")
    assert physical_cores({0, 1, 2, 3}, tmp_path) == 2
    assert physical_cores({0, 2}, tmp_path) == 1  # two threads of one core
    assert physical_cores({0, 1}, tmp_path) == 2
    assert physical_cores({0, 1, 7}, tmp_path) == 3  # no topology: count what is there
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))


def test_separate_kv_streams_per_sequence(make_ctx, model, tokens):
    """kv_unified=False: each sequence has its own cells; scoring, eviction and compaction of one
    leave the other exactly as it was."""
    ctx = make_ctx(n_ctx=512, n_seq_max=2, kv_unified=False)
    kv = KVCache(ctx)
    decode(ctx, tokens[:100], np.arange(100), seq_id=0)
    kv.set_scoring(8)
    decode(ctx, tokens[200:300], np.arange(100), seq_id=1)
    before = kv.cells(0)
    assert kv.evict(np.arange(10, 40), seq_id=1) == 30
    assert kv.compact(1) == 70
    np.testing.assert_array_equal(kv.cells(1).positions, np.arange(70))
    after = kv.cells(0)
    np.testing.assert_array_equal(after.cells, before.cells)
    np.testing.assert_array_equal(after.positions, np.arange(100))
    kv.set_scoring(0)
    decode(ctx, tokens[100:101], [100], seq_id=0)
    shared = logits_of(ctx, model)
    fresh = make_ctx(n_ctx=512)
    decode(fresh, tokens[:100], np.arange(100))  # the same batches: batch shape changes the kernels
    decode(fresh, tokens[100:101], [100])
    np.testing.assert_allclose(shared, logits_of(fresh, model), atol=2e-3)


def test_a_llama_left_open_at_exit_closes_quietly(model_path, tmp_path):
    """Slots with cells, a recall store, never closed: the interpreter's exit frees them without
    an exception from a finaliser (the context goes whole; no stream is reset on the way)."""
    script = (
        "import numpy as np\n"
        "from infmllm_gguf import InfMLLM, Llama, Recall\n"
        f"llm = Llama({model_path!r}, n_ctx=320, kv_policy=InfMLLM(budget=256, chunk=32), n_slots=2,\n"
        "            recall=Recall())\n"
        "llm.eval(np.arange(300, 900, dtype=np.int32))\n"
        "llm.slot(1).eval(np.arange(300, 400, dtype=np.int32))\n"
        "print('fed')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0 and done.stdout.strip() == "fed", done.stderr
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr
