"""The recall tier on the real model: evicted pages stored, the needle brought back, triggers,
a bounded store, spilling, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import f16_keys

from infmllm_gguf import InfMLLM, Llama, Recall, RecallError, StreamingLLM
from infmllm_gguf.evaluate import passkey_tokens, passkey_trial
from infmllm_gguf.kv import decode
from infmllm_gguf.recall import (
    AttentionScorer,
    Probe,
    RecallTier,
    keys_as_float,
    selection,
    text_matches,
    with_neighbours,
    with_runs,
)
from infmllm_gguf.texts import kjv

BUDGET = 256  # where the model's answers count
SMALL = 128  # where only the tier's mechanics do: half the tokens


@pytest.fixture(scope="module")
def filler():
    llm = Llama(n_ctx=64, kv_policy="full")
    tokens = llm.tokenize(kjv()[:60_000], add_bos=False)
    llm.close()
    return tokens


def _llm(recall: Recall | None, policy=None, budget: int = BUDGET, **kw) -> Llama:
    policy = policy or InfMLLM(budget=budget)
    return Llama(n_ctx=policy.capacity, kv_policy=policy, seed=0, recall=recall, debug=True, **kw)


def _stored_v(st, sidx: np.ndarray) -> np.ndarray:
    """The stored V rows of the cells at stream indices sidx, as [layer, cell, row bytes]."""
    s_sidx, _, _, s_v = st.store.rows(sorted(set((sidx // st.recall.page).tolist())))
    return s_v.reshape(st.store.n_layer, len(s_sidx), -1)[:, np.isin(s_sidx, sidx)]


def test_recall_configuration_is_checked():
    for bad in (
        {"page": 0},
        {"when": "always"},
        {"reserve": 0},
        {"store_limit_mb": 0},
        {"query_window": 0},
        {"score": "nearest"},
        {"every": 0, "when": "chunk"},
    ):
        with pytest.raises(ValueError):
            Recall(**bad)
    with pytest.raises(ValueError, match="turn"):
        Recall(reencode=True, when="chunk")
    with pytest.raises(ValueError, match="chunk"):
        Recall(every=32)
    with pytest.raises(ValueError, match="shortlist"):
        Recall(shortlist=0)
    with pytest.raises(ValueError, match="not a directory"):
        Recall(spill_dir="/nonexistent/dir")
    with pytest.raises(ValueError, match="evicting kv_policy"):
        Llama(n_ctx=512, kv_policy="full", recall=Recall())
    with pytest.raises(ValueError, match="below the budget"):
        _llm(Recall(reserve=BUDGET))
    with pytest.raises(ValueError, match="query_window"):
        Llama(n_ctx=512, n_batch=16, kv_policy=InfMLLM(budget=256), recall=Recall(query_window=32))


@pytest.mark.parametrize("policy", ["infmllm", pytest.param("streamingllm", marks=pytest.mark.slow)])
def test_needle_that_left_the_window_is_recalled_and_answered(filler, policy):
    """A pass key 3/4 of a 4x-budget stream back: without the tier no policy keeps it (it left
    the recent window long ago); with it the key's page comes back and the model copies it."""
    make = InfMLLM if policy == "infmllm" else StreamingLLM
    key, length, depth = "58213", 4 * BUDGET, 0.2
    plain = _llm(None, make(budget=BUDGET))
    assert not passkey_trial(plain, filler, length, depth, key)["correct"]
    plain.close()

    llm = _llm(Recall(), make(budget=BUDGET))
    result = passkey_trial(llm, filler, length, depth, key)
    assert result["correct"], result
    stats = llm.kv_stats()
    assert stats["recalls"] == 1 and stats["pages_stored"] > 0 and 0 < stats["n_recalled"] <= BUDGET // 4
    at = 1 + int(depth * (length - 30))  # where the needle starts, near enough
    assert any(a <= at + 8 < b for a, b in llm.recalled())
    assert stats["n_cached"] <= llm.policy.capacity


def test_a_passkey_trial_says_whether_all_of_the_needle_was_cached(filler):
    """A needle that never left the cache is whole and was not recalled; the trial reports both,
    so that a needle brought back in part is not counted as back."""
    llm = _llm(Recall())
    result = passkey_trial(llm, filler, BUDGET // 2, 0.5, "58213")
    assert result["needle_whole"] is True and result["needle_recalled"] is False, result
    llm.close()


def test_recalled_cells_hold_the_rows_that_were_evicted(filler):
    """Round trip through the store: the V rows of recalled cells are the stored bytes (keys are
    re-rotated, checked natively), and every stored page holds evicted tokens only."""
    llm = _llm(Recall(), budget=SMALL)
    passkey_trial(llm, filler, 3 * SMALL, 0.3, "13579")
    st = llm.session.stream
    assert st.n_recalled > 0
    view = st.kv.cells()
    rec = st.recalled
    _, v = st.kv.read_rows(view.positions[rec], st.store.k_bytes, st.store.v_bytes)
    sidx = st.stream_index[rec]
    assert np.array_equal(v.reshape(st.store.n_layer, len(sidx), -1), _stored_v(st, sidx))
    cached_own = set(st.stream_index[~rec].tolist())
    for pid in st.store.page_ids():
        assert not cached_own & set(st.store.stream_indices(int(pid)).tolist())


def test_turn_mode_recalls_once_per_answer_and_chunk_mode_after_evictions(filler):
    text = np.array(filler[: 3 * SMALL], np.int32)
    turn = _llm(Recall(when="turn"), budget=SMALL)
    turn.eval([1] + list(text))
    assert turn.kv_stats()["recalls"] == 0  # streaming costs nothing but the store
    assert turn.kv_stats()["pages_stored"] > 0
    turn.generate_text(max_tokens=2)
    assert turn.kv_stats()["recalls"] == 1
    turn.check_invariants()

    chunk = _llm(Recall(when="chunk"), budget=SMALL)
    chunk.eval([1] + list(text))
    stats = chunk.kv_stats()
    assert stats["recalls"] >= stats["evictions"] // 2 > 0
    assert stats["n_recalled"] <= stats["recall_reserve"]
    assert stats["n_cached"] <= chunk.policy.capacity


def test_chunk_mode_also_recalls_every_so_many_tokens_between_evictions(filler, monkeypatch):
    """Recall(every=E): chunk mode recalls after each eviction and again once E tokens were fed
    since the last recall, matching (score="text") the E tokens about to be decoded; a recall
    that fills the cache is followed by an eviction, not by an empty decode."""
    calls = []
    recall_pages = RecallTier.recall_pages

    def spy(self, rows=None, upcoming=None):
        calls.append((self.stream.n_streamed, None if upcoming is None else len(upcoming)))
        return recall_pages(self, rows, upcoming)

    monkeypatch.setattr(RecallTier, "recall_pages", spy)
    every = 12  # the chunk is 32: between evictions two more recalls
    llm = _llm(Recall(when="chunk", score="text", every=every), InfMLLM(budget=SMALL, chunk=32))
    tokens = [1] + filler[: 4 * SMALL]
    for i in range(0, len(tokens), 100):  # pieces that do not line up with the recalls
        llm.eval(tokens[i : i + 100])
    at = np.array([n for n, _ in calls])
    assert len(calls) > 3 * llm.kv_stats()["evictions"] > 0
    assert np.diff(at).max() <= every
    assert max(n for _, n in calls) == every  # fewer where a piece ends first
    assert llm.kv_stats()["recalls"] > llm.kv_stats()["evictions"]
    llm.check_invariants()
    llm.close()


@pytest.mark.slow  # a long stream: the slow suite
def test_turn_mode_streams_like_the_policy_alone_until_a_question(filler):
    """Between questions the reserve's empty part is the policy's: the stream keeps the cells
    and predicts the text as the policy without recall does; a question first makes room."""
    text = [1] + filler[: 4 * BUDGET]
    plain, turn = _llm(None), _llm(Recall(when="turn"))
    lp_plain, lp_turn = plain.stream_logprobs(text), turn.stream_logprobs(text)
    assert turn.kv_stats()["evictions"] == plain.kv_stats()["evictions"] > 0
    np.testing.assert_array_equal(turn.cached_stream_indices(), plain.cached_stream_indices())
    np.testing.assert_allclose(lp_turn, lp_plain, atol=1e-4)
    turn.generate_text(max_tokens=2)
    stats = turn.kv_stats()
    assert stats["recalls"] == 1 and 0 < stats["n_recalled"] <= stats["recall_reserve"]
    assert stats["n_cached"] <= turn.policy.capacity
    turn.check_invariants()
    plain.close()
    turn.close()


def test_a_turn_gives_the_log_probs_of_the_tokens_it_decodes_again(filler):
    """A turn's recall rolls back the newest query_window tokens and decodes them again with the
    pages in place; their log-probs (but the first's) come back, as a stream's would."""
    llm = _llm(Recall(when="turn"), budget=SMALL)
    lp = llm.stream_logprobs([1] + filler[:100])
    again = llm.session.stream.recall_turn()  # nothing stored yet: the same cache, the same predictions
    np.testing.assert_allclose(again, lp[-7:], atol=2e-3)
    assert llm.session.stream.recall_turn() is None  # nothing new since that turn
    llm.stream_logprobs(filler[100 : 100 + 3 * SMALL])
    again = llm.session.stream.recall_turn()
    assert again.shape == (7,) and np.isfinite(again).all() and (again <= 0).all()
    assert llm.kv_stats()["recalls"] == 1
    llm.close()


def test_chosen_pages_come_before_any_neighbour(filler):
    """A page ranked fourth still comes back when the neighbours of the three ahead of it
    would fill the room: neighbours only take what the chosen pages leave."""
    llm = _llm(Recall())
    llm.eval([1] + filler[: 3 * BUDGET])
    store, page = llm.session.stream.store, Recall().page
    best = [int(p) for p in store.page_ids()[[2, 6, 10, 14]]]
    assert with_neighbours(store, best, 4 * page) == best
    assert with_neighbours(store, best, 6 * page) == [*best, best[0] + 1, best[0] - 1]
    llm.close()


def test_a_chosen_page_brings_the_adjacent_pages_above_the_median(filler):
    """With `adjacent` a fact across page boundaries comes back whole: the pages next to a
    chosen one that score above the median join it, outwards until one does not, before any
    plain neighbour."""
    llm = _llm(Recall())
    llm.eval([1] + filler[: 3 * BUDGET])
    store, page = llm.session.stream.store, Recall().page
    p = int(store.page_ids()[10])
    runs = with_runs([p], {p - 2, p - 1, p + 1, p + 3})
    assert runs == [p, p + 1, p - 1, p - 2]
    assert with_neighbours(store, runs, 5 * page) == [*runs, p + 2]
    llm.close()


@pytest.mark.slow  # a long stream: the slow suite
def test_adjacent_reaches_the_selection(filler, monkeypatch):
    """A turn's recall selects with the adjacent-pages rule exactly when Recall(adjacent=True)."""
    seen = []
    select = selection.select

    def spy(self, *args, **kw):
        seen.append(kw.get("adjacent", False))
        return select(self, *args, **kw)

    monkeypatch.setattr(selection, "select", spy)
    for adjacent in (False, True):
        llm = _llm(Recall(adjacent=adjacent))
        passkey_trial(llm, filler, 4 * BUDGET, 0.2, "58213")
        assert seen and set(seen) == {adjacent}
        seen.clear()
        llm.close()


def test_attention_score_is_each_pages_share_of_one_softmax(filler, monkeypatch):
    """Recall(score="attention"): a page's score is its share of one softmax of the question's
    queries over every stored key, each moved to stream index - shift, where shift is how far
    the stream had run ahead of the cache's positions when the queries were decoded; computed
    in chunks of 3 pages, the softmax carried across them, it equals the plain one.  The best
    page comes back, and a state saved before the question recalls the same pages."""
    seen = {}
    select = selection.select

    def spy(self, queries, room, shortlist=64, adjacent=False, attention=None, score="peak", **kw):
        seen.update(queries=queries.copy(), attention=attention, score=score)
        return select(self, queries, room, shortlist, adjacent, attention, score, **kw)

    monkeypatch.setattr(selection, "select", spy)
    monkeypatch.setattr(AttentionScorer, "CHUNK", 3)
    llm = _llm(Recall(score="attention"), budget=SMALL)
    tokens, _ = passkey_tokens(llm, filler, 4 * SMALL, 0.2, "58213")
    llm.eval(tokens)
    state = llm.save_state()
    shift = len(tokens) - llm.session.stream.next_pos  # before the question's turn evicts and compacts
    llm.generate_text(max_tokens=2)
    store = llm.session.stream.store
    rope, got_shift = seen["attention"]
    assert got_shift == shift > 2 * SMALL
    exported = store.export()
    sidx = exported["stream_index"]
    layers, kv_heads, dim = store.n_layer, store.n_head_kv, store.head_dim
    keys = keys_as_float(exported["k"], store.type_k).reshape(-1, layers, kv_heads, dim)
    keys = rope.rotate(keys, sidx - shift - exported["rot_pos"])
    q = seen["queries"]  # [layer, head, row, dim]; query head h reads kv head h // group
    group = store.n_head // kv_heads
    logits = np.einsum("tlhd,lhrd->lhtr", np.repeat(keys, group, axis=2), q) / np.sqrt(dim)
    weights = np.exp(logits - logits.max(axis=2, keepdims=True))
    weights /= weights.sum(axis=2, keepdims=True)
    want = np.bincount(sidx // store.page, weights.sum(axis=(0, 1, 3)))[store.page_ids()]
    probe = Probe(q.reshape(layers, kv_heads, -1, dim).transpose(0, 1, 3, 2), attention=(rope, shift))
    got = AttentionScorer().score(store, probe)[0].score
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    best = int(store.page_ids()[np.argmax(want)])
    recalled = llm.recalled()
    assert any(a <= best * store.page < b for a, b in recalled)
    llm.load_state(state)
    llm.generate_text(max_tokens=2)
    assert seen["attention"][1] == shift and llm.recalled() == recalled
    llm.close()


def test_both_scores_take_their_standing_out_pages_in_turn(filler, monkeypatch):
    """Recall(score="both"): a turn's recall ranks the pages by the peak score and by the
    attention score and brings back the standing-out pages of each in turn, the peak's first
    with the pages after and before it, the attention's alone; the needle that left the
    window comes back whole (the model's answer is the passkey benchmark's to count: with
    the opening's second page beside it, it answers this one with Genesis)."""
    picks = {}
    select = selection.select

    def spy(self, queries, room, shortlist=64, adjacent=False, attention=None, score="peak", **kw):
        assert score == "both" and attention is not None
        for other in ("peak", "attention", "both"):  # the same store and queries, each score alone
            picks[other] = select(self, queries, room, shortlist, adjacent, attention, other, **kw)
        with pytest.raises(ValueError, match="attention"):
            select(self, queries, room, score="both")  # it needs the RoPE and the queries' shift
        return picks[score]

    monkeypatch.setattr(selection, "select", spy)
    llm = _llm(Recall(score="both"))
    result = passkey_trial(llm, filler, 4 * BUDGET, 0.2, "58213")
    assert result["needle_whole"], result
    peak, attention, both = picks["peak"][0], picks["attention"][0], picks["both"]
    stored = set(llm.session.stream.store.page_ids().tolist())
    unit = [p for p in (peak, peak + 1, peak - 1) if p in stored]
    assert peak != attention and both[: len(unit) + 1] == [*unit, attention]
    page = Recall().page
    assert all(any(a <= p * page < b for a, b in llm.recalled()) for p in both)
    llm.close()


def test_attention_ranking_leaves_pages_of_control_tokens_out(filler, monkeypatch):
    """A chat turn's control tokens draw the queries' attention as sinks do, so a page holding
    them ranks high by attention wherever it stands; recalled, a past chat turn made the model
    answer a pass-key question as a chat.  The attention ranking leaves such pages out: the
    turn at the stream's start stands out without that and is not recalled with it."""
    picks = {}
    select = selection.select

    def spy(
        self, queries, room, shortlist=64, adjacent=False, attention=None, score="peak", structural=None, **kw
    ):
        picks["structural"] = structural
        picks["with"] = select(self, queries, room, shortlist, adjacent, attention, "attention", structural)
        picks["without"] = select(self, queries, room, shortlist, adjacent, attention, "attention")
        return select(self, queries, room, shortlist, adjacent, attention, score, structural)

    monkeypatch.setattr(selection, "select", spy)
    llm = _llm(Recall(score="both"), budget=SMALL)
    turn = llm.tokenize(
        "<|im_start|>user\nWho created the heaven and the earth?<|im_end|>\n"
        "<|im_start|>assistant\nGod created them.<|im_end|>\n",
        add_bos=False,
        special=True,
    )
    tokens, _ = passkey_tokens(llm, filler, 4 * SMALL, 0.5, "58213")
    llm.eval(turn + tokens)
    llm.generate_text(max_tokens=2)
    page = Recall().page
    chat = set(range((len(turn) - 1) // page + 1))  # the pages the turn's tokens are on
    assert set(picks["structural"].tolist()) == chat
    assert chat & set(picks["without"]) and not chat & set(picks["with"])
    llm.close()


def test_text_matches_are_the_places_that_continued_the_texts_runs():
    """Each run of 2 and 3 tokens of the new text votes for the key after each place it occurred,
    1 / its occurrences; a run across an image key (< 0) matches nothing."""
    history = np.array([5, 6, 7, 8, 1, 2, 5, 6, 9, -1, 5, 6, -1, 7], np.int32)
    after, weight = text_matches(history, 100, np.array([5, 6, 7], np.int32))
    votes = {}
    for a, w in zip(after.tolist(), weight.tolist()):
        votes[a] = votes.get(a, 0.0) + w
    # (5, 6) thrice, (6, 7) and (5, 6, 7) once: the place after "5 6 7" gets a vote per length
    assert votes == pytest.approx({102: 1 / 3, 108: 1 / 3, 112: 1 / 3, 103: 2.0})
    assert len(text_matches(history, 0, np.array([6, -1, 7], np.int32))[0]) == 0


@pytest.mark.slow  # a long stream: the slow suite
def test_text_score_recalls_what_the_new_text_repeats(filler):
    """Recall(when="chunk", score="text"): a passage read again long after it left the window
    brings its first reading back before each piece is decoded (no queries needed), and the
    model predicts the repetition far better than the policy alone; in turn mode the
    question's words bring back the needle they name."""
    passage, gap = filler[:192], filler[2000 : 2000 + 4 * BUDGET]
    tokens = np.array([1, *passage, *gap, *passage], np.int32)
    again = slice(len(tokens) - len(passage) + 32, len(tokens))  # past the first piece
    means = {}
    for name, recall in (("plain", None), ("text", Recall(when="chunk", score="text"))):
        llm = _llm(recall)
        means[name] = float(np.mean(llm.stream_logprobs(tokens)[again]))
        if recall is not None:
            assert any(a < len(passage) and b > 1 for a, b in llm.recalled())
            assert llm.kv_stats()["recalls"] > 0
        llm.close()
    assert means["text"] > means["plain"] + 0.5, means  # measured: -0.23 against -1.05 nats

    llm = _llm(Recall(score="text"))
    result = passkey_trial(llm, filler, 4 * BUDGET, 0.2, "58213")
    assert result["needle_recalled"] and llm.kv_stats()["recalls"] == 1, result
    llm.close()


@pytest.mark.parametrize(
    "recall, budget",
    [(Recall(when="chunk"), SMALL), (Recall(when="chunk", score="text", every=8), BUDGET)],
    ids=["peak", "text-every"],  # the text score needs the longer stream to find repeats near its end
)
def test_chunk_mode_keys_sit_rotated_at_their_new_positions(filler, recall, budget):
    """Evictions and recalls move cells many times, each pair sharing one K-shift (a recall
    between evictions has its own): every cached key of layer 0 (a function of its token and
    position alone) is the one a fresh context computes for that token at that position."""
    llm = _llm(recall, budget=budget)
    llm.eval([1] + filler[: 4 * budget])
    stats = llm.kv_stats()
    assert stats["recalls"] > 0 and stats["n_recalled"] > 0
    tokens = llm.history[llm.cached_stream_indices()]
    fresh = Llama(n_ctx=llm.n_cached + 64, kv_policy="full", seed=0, recall=None)
    fresh.eval(tokens)
    # layer 0 of the cells at positions 0..n-1 of each
    got, want = (f16_keys(x.session.stream.kv, x.n_cached)[0] for x in (llm, fresh))
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 4e-3 * scale
    assert np.abs(got[1:] - want[:-1]).max() > 0.1 * scale  # the check can fail: one position off
    llm.close()
    fresh.close()


def test_reencoded_cells_are_computed_in_the_context_they_now_sit_in(filler):
    """With reencode, a turn's recall decodes the cached text from the first recalled cell on
    again: those cells hold, in every layer, what a fresh decode of their tokens after the
    cells before them computes, and the recalled ones no longer hold their stored rows."""
    llm = _llm(Recall(reencode=True), budget=SMALL)
    passkey_trial(llm, filler, 4 * SMALL, 0.2, "58213")
    st = llm.session.stream
    assert llm.kv_stats()["recalls"] == 1 and st.n_recalled > 0
    first, n = int(np.argmax(st.recalled)), st.n_cached
    n_layer, k_bytes, v_bytes = st.store.n_layer, st.store.k_bytes, st.store.v_bytes
    k, v = (x.reshape(n_layer, n, -1) for x in st.kv.read_rows(np.arange(n), k_bytes, v_bytes))

    ref = Llama(n_ctx=n + 64, kv_policy="full", seed=0)
    kv = ref.session.stream.kv
    kv.write_rows(np.arange(first), k[:, :first].ravel(), v[:, :first].ravel())
    decode(ref.session.stream.ctx, llm.history[st.stream_index[first:]], np.arange(first, n))
    rk, rv = (x.reshape(n_layer, n, -1) for x in kv.read_rows(np.arange(n), k_bytes, v_bytes))
    for got, want in ((k, rk), (v, rv)):
        got, want = (x[:, first:].view(np.float16).astype(np.float32) for x in (got, want))
        scale = np.abs(want).max(axis=(1, 2), keepdims=True)
        # one batch or token by token: a few 1e-2 of the largest row at most, 1e-4 on average
        err = np.abs(got - want) / scale
        assert err.max() < 5e-2 and err.mean() < 1e-3
        assert (np.abs(got[:, 1:] - want[:, :-1]) / scale).mean() > 2e-2  # the check can fail
    ref.close()

    rec = st.recalled
    assert not np.array_equal(v[:, rec], _stored_v(st, st.stream_index[rec]))
    llm.close()


@pytest.mark.slow  # a long stream: the slow suite
def test_store_is_bounded_by_dropping_oldest_pages(filler):
    llm = _llm(Recall(store_limit_mb=2))
    llm.eval([1] + filler[: 6 * BUDGET])
    stats = llm.kv_stats()
    assert stats["pages_dropped"] > 0 and stats["store_mb"] <= 2
    stored = llm.session.stream.store.page_ids()
    assert stored.min() > 0  # the oldest went first
    llm.generate_text(max_tokens=2)  # recall still works over what is left
    llm.reset()
    assert llm.kv_stats()["pages_stored"] == 0 and llm.recalled() == []


@pytest.mark.slow  # a long stream: the slow suite
def test_spilled_pages_come_back_and_a_corrupt_spill_is_refused_once(filler, tmp_path):
    key, length = "24680", 4 * BUDGET
    llm = _llm(Recall(store_limit_mb=4, spill_dir=tmp_path))  # the rows of ~10 pages
    assert passkey_trial(llm, filler, length, 0.2, key)["correct"]  # the key's page was spilled
    stats = llm.kv_stats()
    assert stats["pages_spilled"] > 0 and stats["spilled_mb"] > 0 and stats["pages_dropped"] == 0

    llm.reset()
    llm.eval([1] + filler[: 4 * BUDGET])
    spill = llm.session.stream.store.spill_path
    with open(spill, "r+b") as fh:  # damage every spilled byte
        size = fh.seek(0, 2)
        fh.seek(0)
        fh.write(bytes(size))
    before = llm.history.copy()
    with pytest.raises(RecallError, match="corrupt"):
        llm.generate_text(max_tokens=2)
    assert np.array_equal(llm.history, before)  # nothing lost
    llm.check_invariants()
    assert llm.generate_text(max_tokens=2) is not None  # usable, now without recall
    assert llm.kv_stats()["recall_error"] and llm.kv_stats()["pages_stored"] == 0
