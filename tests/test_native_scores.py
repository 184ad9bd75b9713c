"""Native in-graph scores against a numpy recomputation from captured Q/K."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import logits_of
from infmllm_gguf._llama_cpp import llama_cpp as lc
from reference import AttentionCapture

from infmllm_gguf.kv import Batch, KVCache, NativeError, decode

RTOL = 1e-3


def assert_scores_match(native: np.ndarray, reference: np.ndarray) -> None:
    # every cell within 1e-3 relative; cells whose mass is below float32 resolution of the
    # total (1e-9 of it) are compared absolutely
    atol = 1e-9 * reference.sum()
    np.testing.assert_allclose(native, reference, rtol=RTOL, atol=atol)


def model_dims(model) -> tuple[int, int]:
    return lc.llama_model_n_layer(model), lc.llama_model_n_head(model)


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
@pytest.mark.parametrize("n_ubatch", [512, 96], ids=["one-ubatch", "multi-ubatch"])
def test_scores_match_reference(make_ctx, model, text_tokens, flash_attn, n_ubatch):
    cap = AttentionCapture(flash_attn)
    ctx = make_ctx(n_ctx=1024, n_batch=512, n_ubatch=n_ubatch, flash_attn=flash_attn, cb_eval=cap.callback)
    kv = KVCache(ctx)
    kv.set_scoring(8)
    toks = text_tokens[:300]
    decode(ctx, toks, np.arange(300))
    view = kv.cells()
    assert np.array_equal(view.positions, np.arange(300))
    ref = cap.reference_scores(8)[0]
    assert_scores_match(view.scores, ref[view.cells])
    n_layer, n_head = model_dims(model)
    assert view.scores.sum() == pytest.approx(n_layer * n_head * 8, rel=1e-4)


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_scores_after_eviction_and_compaction(make_ctx, model, text_tokens, flash_attn):
    cap = AttentionCapture(flash_attn)
    ctx = make_ctx(n_ctx=1024, n_batch=256, n_ubatch=256, flash_attn=flash_attn, cb_eval=cap.callback)
    kv = KVCache(ctx)
    kv.set_scoring(8)
    decode(ctx, text_tokens[:400], np.arange(400))
    rng = np.random.default_rng(0)
    victims = rng.choice(np.arange(4, 380), size=150, replace=False)
    assert kv.evict(victims) == 150
    n = kv.compact()
    assert n == 250
    assert np.array_equal(kv.cells().positions, np.arange(250))
    decode(ctx, text_tokens[400:430], np.arange(250, 280))  # fills the holes
    view = kv.cells()
    assert np.array_equal(view.positions, np.arange(280))
    assert view.cells.max() < 400  # freed cells were reused
    ref = cap.reference_scores(8)[0]
    assert_scores_match(view.scores, ref[view.cells])
    evicted = np.setdiff1d(np.arange(ref.shape[0]), view.cells)
    assert np.all(ref[evicted] == 0)  # holes get no attention


def test_two_sequences_in_one_context(make_ctx, model, text_tokens):
    cap = AttentionCapture(False)
    ctx = make_ctx(n_ctx=1024, n_batch=512, n_ubatch=512, n_seq_max=2, kv_unified=True, cb_eval=cap.callback)
    kv = KVCache(ctx)
    kv.set_scoring(8)
    decode(ctx, text_tokens[:200], np.arange(200), seq_id=0)
    decode(ctx, text_tokens[1000:1150], np.arange(150), seq_id=1)
    ref = cap.reference_scores(8)[0]  # the last decode: seq 1's queries
    s1 = kv.cells(1)
    assert_scores_match(s1.scores, ref[s1.cells])
    n_layer, n_head = model_dims(model)
    assert s1.scores.sum() == pytest.approx(n_layer * n_head * 8, rel=1e-4)
    s0 = kv.cells(0)
    assert np.all(s0.scores == 0)  # seq 1's queries cannot see seq 0's cells
    # evicting and compacting seq 0 leaves seq 1 intact
    before = logits_after(ctx, model, text_tokens[1150], 150, seq_id=1, rollback=True)
    kv.evict(np.arange(10, 100), seq_id=0)
    kv.compact(0)
    assert np.array_equal(kv.cells(1).positions, np.arange(150))
    after = logits_after(ctx, model, text_tokens[1150], 150, seq_id=1, rollback=True)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-4)


def logits_after(ctx, model, token, pos, seq_id=0, rollback=False):
    decode(ctx, [token], [pos], seq_id=seq_id)
    out = logits_of(ctx, model)
    if rollback:
        mem = lc.llama_get_memory(ctx)
        assert lc.llama_memory_seq_rm(mem, seq_id, pos, -1)
    return out


def test_all_rows_mode_matches_reference_and_normalisation(make_ctx, model, text_tokens):
    cap = AttentionCapture(False)
    ctx = make_ctx(n_ctx=512, n_batch=128, n_ubatch=128, cb_eval=cap.callback)
    kv = KVCache(ctx)
    kv.set_scoring(-1)
    decode(ctx, text_tokens[:100], np.arange(100))
    view = kv.cells()
    ref = cap.reference_scores(-1)[0]
    assert_scores_match(view.scores, ref[view.cells])
    n_layer, n_head = model_dims(model)
    assert view.scores.sum() == pytest.approx(n_layer * n_head * 100, rel=1e-4)


def test_one_decode_step_sums_to_layers_times_heads(make_ctx, model, text_tokens):
    ctx = make_ctx(n_ctx=512, n_batch=256, n_ubatch=256)
    kv = KVCache(ctx)
    kv.set_scoring(8)
    decode(ctx, text_tokens[:64], np.arange(64))
    decode(ctx, text_tokens[64:65], [64])  # one query row: min(8, 1)
    n_layer, n_head = model_dims(model)
    scores = kv.cells().scores
    assert scores.sum() == pytest.approx(n_layer * n_head, rel=1e-4)
    assert np.all(scores > 0)


def test_scoring_off_changes_nothing(make_ctx, model, text_tokens):
    plain = make_ctx(n_ctx=512)
    scored = make_ctx(n_ctx=512)
    KVCache(scored).set_scoring(8)
    decode(plain, text_tokens[:120], np.arange(120))
    decode(scored, text_tokens[:120], np.arange(120))
    np.testing.assert_array_equal(logits_of(plain, model), logits_of(scored, model))
    assert np.all(KVCache(plain).cells().scores == 0)


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_scores_with_f32_cache(make_ctx, model, text_tokens, flash_attn):
    """An F32 cache: flash attention reads it through an F16 cast, which must still be
    recognised as the cache (it used to give all-zero scores) and scored like it."""
    cap = AttentionCapture(flash_attn)
    ctx = make_ctx(
        n_ctx=512,
        n_batch=256,
        n_ubatch=256,
        flash_attn=flash_attn,
        cb_eval=cap.callback,
        type_k=lc.GGML_TYPE_F32,
        type_v=lc.GGML_TYPE_F32,
    )
    kv = KVCache(ctx)
    kv.set_scoring(8)
    decode(ctx, text_tokens[:300], np.arange(300))
    view = kv.cells()
    ref = cap.reference_scores(8)[0]
    assert_scores_match(view.scores, ref[view.cells])
    n_layer, n_head = model_dims(model)
    assert view.scores.sum() == pytest.approx(n_layer * n_head * 8, rel=1e-4)


def test_sequences_sharing_a_decode_report_their_own_scored_rows(make_ctx, model, text_tokens):
    """Two sequences in one llama_decode, each a KV stream of its own: llama.cpp puts one row of
    each in a first ubatch and the longer one's rest in a second, and each sequence's scores
    come from its own rows: a probability mass of one per layer, head and reported row."""
    ctx = make_ctx(n_ctx=512, n_batch=256, n_ubatch=256, n_seq_max=2, kv_unified=False)
    kv = KVCache(ctx)
    decode(ctx, text_tokens[:40], np.arange(40), seq_id=0)
    decode(ctx, text_tokens[500:560], np.arange(60), seq_id=1)
    n_layer, n_head = model_dims(model)
    for n_long, mode, rows in [(20, 8, 8), (5, 8, 4), (12, -1, 12)]:
        kv.set_scoring(mode)
        assert (kv.scored_rows(0), kv.scored_rows(1)) == (0, 0)
        batch = Batch(64)
        inputs = np.concatenate([text_tokens[40:41], text_tokens[560 : 560 + n_long]])
        positions = np.concatenate([[40], np.arange(60, 60 + n_long)])
        seqs = np.array([0] + [1] * n_long)
        assert batch.decode(ctx, inputs, positions, seqs, np.ones(len(inputs), np.int8)) == 0
        batch.close()
        # one row of seq 0 (its only one), and of seq 1 the rows of its last ubatch (all, at -1)
        assert (kv.scored_rows(0), kv.scored_rows(1)) == (1, rows)
        assert kv.cells(0).scores.sum() == pytest.approx(n_layer * n_head, rel=1e-4)
        assert kv.cells(1).scores.sum() == pytest.approx(n_layer * n_head * rows, rel=1e-4)
        for seq, first in ((0, 40), (1, 60)):
            assert lc.llama_memory_seq_rm(lc.llama_get_memory(ctx), seq, first, -1)
    with pytest.raises(NativeError, match="invalid sequence"):
        kv.scored_rows(5)
