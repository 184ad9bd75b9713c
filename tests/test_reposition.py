"""Eviction without re-positioning (`reposition=False`): kept cells stay at the positions they
were decoded at, on the real model.

The reference replays the stream's evictions with llama.cpp's own `llama_memory_seq_rm` on a
full context that is never compacted: the same tokens decoded in the same batches, the same
positions removed before each batch.  The stream must give its logits.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import logits_of, replay_evictions

from infmllm_gguf import H2O, InfMLLM, Llama, Recall, SnapKV, StateError, StreamingLLM
from infmllm_gguf.evaluate import passkey_trial
from infmllm_gguf.kv import CellView
from infmllm_gguf.policies import FullCache, make_policy
from infmllm_gguf.texts import kjv

BUDGET = 128
POLICIES = {
    "streamingllm": StreamingLLM(budget=BUDGET, chunk=32, reposition=False),
    "infmllm": InfMLLM(budget=BUDGET, chunk=32, reposition=False),
    "snapkv": SnapKV(budget=BUDGET, chunk=32, reposition=False),
    # no recent window of its own: the newest cell must still be kept (llama.cpp continues there)
    "h2o-no-recent": H2O(budget=BUDGET, chunk=32, recent=0, reposition=False),
}


FAST = ("infmllm", "h2o-no-recent")  # the others stream in the slow suite


@pytest.mark.parametrize(
    "name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in POLICIES]
)
def test_kept_cells_keep_their_positions_and_give_a_replays_logits(
    model_path, model, make_ctx, text_tokens, name
):
    llm = Llama(model_path, n_ctx=256, kv_policy=POLICIES[name], n_threads=2, debug=True)
    ref = make_ctx(n_ctx=512)
    tokens = text_tokens[:320]  # a full cache of 160, then five chunks of 32: an eviction before each
    replay_evictions(llm, ref, tokens)
    stats = llm.kv_stats()
    assert stats["evictions"] >= 5 and stats["n_cached"] <= llm.policy.capacity
    assert stats["max_pos"] == len(tokens) - 1  # positions went on past n_ctx
    assert np.array_equal(llm.session.stream.kv.cells().positions, llm.cached_stream_indices())
    assert llm.cached_stream_indices()[-1] == len(tokens) - 1
    np.testing.assert_allclose(llm.session.stream.last_logits, logits_of(ref, model), rtol=1e-4, atol=1e-4)
    llm.close()


def test_recalled_rows_come_back_unchanged_at_their_own_positions():
    """With a recall tier the stored rows re-enter at the positions they were stored at: K and V
    bytes equal the stored ones (nothing is re-rotated), and the needle is found."""
    probe = Llama(n_ctx=64, kv_policy="full")
    filler = probe.tokenize(kjv()[:30_000], add_bos=False)
    probe.close()
    policy = StreamingLLM(budget=128, reposition=False)
    llm = Llama(n_ctx=policy.capacity, kv_policy=policy, seed=0, recall=Recall(), debug=True)
    result = passkey_trial(llm, filler, 4 * 128, 0.2, "58213")
    assert result["correct"], result
    st = llm.session.stream
    rec = st.recalled
    assert rec.any()
    view = st.kv.cells()
    assert np.array_equal(view.positions, st.stream_index)
    k, v = st.kv.read_rows(view.positions[rec], st.store.k_bytes, st.store.v_bytes)
    sidx = st.stream_index[rec]
    s_sidx, s_pos, s_k, s_v = st.store.rows(sorted(set((sidx // st.recall.page).tolist())))
    assert np.array_equal(s_pos, s_sidx)
    chosen = np.isin(s_sidx, sidx)
    n_layer = st.store.n_layer
    for got, stored in ((k, s_k), (v, s_v)):
        stored = stored.reshape(n_layer, len(s_sidx), -1)[:, chosen]
        assert np.array_equal(got.reshape(n_layer, len(sidx), -1), stored)
    llm.close()


def test_policies_take_reposition_as_a_keyword():
    assert StreamingLLM(budget=64).reposition and not make_policy("h2o", 64, reposition=False).reposition
    assert "reposition=False" in repr(InfMLLM(budget=64, reposition=False))
    with pytest.raises(ValueError, match="reposition"):
        SnapKV(budget=64, reposition="no")
    assert StreamingLLM(64, 16, 2).sinks == 2  # keyword only: positional arguments keep their meaning
    assert FullCache().reposition  # nothing is evicted, nothing re-positioned


def test_the_newest_cell_is_kept_even_by_a_policy_without_a_recent_window():
    scores = np.r_[np.ones(9), 0.0].astype(np.float32)  # the newest cell scores lowest
    view = CellView(np.arange(10, dtype=np.int32), np.arange(10, dtype=np.int32), scores)
    moved = H2O(budget=4, recent=0)
    kept = H2O(budget=4, recent=0, reposition=False)
    moved.reset(10), kept.reset(10)
    moved.observe(view, 1), kept.observe(view, 1)
    assert not moved.select(view)[-1]
    assert kept.select(view)[-1] and kept.select(view).sum() == 4


def test_saved_session_without_repositioning_continues_exactly(model_path, text_tokens):
    policy = InfMLLM(budget=BUDGET, chunk=32, reposition=False)
    a = Llama(model_path, n_ctx=256, kv_policy=policy, n_threads=2, debug=True)
    a.eval(text_tokens[:300])  # several evictions
    b = Llama(model_path, n_ctx=256, kv_policy=policy, n_threads=2, debug=True)
    b.load_state(a.save_state())
    assert b.kv_stats() == a.kv_stats()
    np.testing.assert_array_equal(
        a.stream_logprobs(text_tokens[300:350]), b.stream_logprobs(text_tokens[300:350])
    )
    assert b.kv_stats()["max_pos"] == 349
    with pytest.raises(StateError, match="another setup"):
        Llama(model_path, n_ctx=256, kv_policy=InfMLLM(budget=BUDGET, chunk=32), n_threads=2).load_state(
            a.save_state()
        )
    a.close()
    b.close()
