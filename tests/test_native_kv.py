"""Eviction, compaction, bounded memory, the native selection rule and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import logits_of
from reference import AttentionCapture, reference_keep

from infmllm_gguf import H2O, Llama
from infmllm_gguf import _native as N
from infmllm_gguf.kv import KVCache, NativeError, decode, select_keep


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p = np.exp(p_logits - p_logits.max())
    p /= p.sum()
    q = np.exp(q_logits - q_logits.max())
    q /= q.sum()
    return float(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30))))


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_compacted_cache_equals_fresh_context_with_kept_tokens(make_ctx, model, text_tokens, flash_attn):
    """Kept tokens that never attended to the evicted ones (another sequence) must, once
    compacted, give the logits of a fresh context fed just them at 0..n-1.  (Tokens that
    did attend to evicted ones legitimately carry their trace in deeper layers.)"""
    evicted, kept = text_tokens[:100], text_tokens[100:300]
    nxt = text_tokens[300]
    ctx = make_ctx(n_ctx=512, n_seq_max=2, flash_attn=flash_attn)
    kv = KVCache(ctx)
    decode(ctx, evicted, np.arange(100), seq_id=1)
    decode(ctx, kept, np.arange(100, 300), seq_id=0)  # positions after the evicted block
    assert kv.evict(np.arange(100), seq_id=1) == 100
    assert kv.compact(0) == 200
    assert np.array_equal(kv.cells(0).positions, np.arange(200))
    decode(ctx, [nxt], [200])
    compacted = logits_of(ctx, model)

    fresh_ctx = make_ctx(n_ctx=512, flash_attn=flash_attn)
    decode(fresh_ctx, kept, np.arange(200))
    decode(fresh_ctx, [nxt], [200])
    fresh = logits_of(fresh_ctx, model)

    assert np.argmax(compacted) == np.argmax(fresh)
    # A missing or wrong K-shift would leave the new token 100 positions off its keys.  The
    # bound is the fp noise of RoPE at other absolute angles: the same tokens merely offset by
    # 1..1000 positions measured KL 0.7e-3..2.4e-3 against this fresh context.
    assert kl_divergence(fresh, compacted) < 5e-3


def test_compaction_rotates_keys_like_fresh_positions(make_ctx, text_tokens):
    """Arbitrary per-cell shifts: layer-0 keys depend on the token and its position only, so
    after evicting a random set and compacting, each kept cell's key must equal the key a
    fresh context computes for that token at its new position."""
    cap = AttentionCapture(flash_attn=False)
    ctx = make_ctx(n_ctx=512, cb_eval=cap.callback)
    kv = KVCache(ctx)
    toks = text_tokens[:300]
    decode(ctx, toks, np.arange(300))
    k_before = cap.layers[0]["k"][0].copy()  # keys at the original positions
    rng = np.random.default_rng(1)
    victims = np.sort(rng.choice(np.arange(4, 290), size=120, replace=False))
    kv.evict(victims)
    n = kv.compact()
    kept = np.setdiff1d(np.arange(300), victims)
    decode(ctx, text_tokens[300:301], [n])
    view = kv.cells()
    k_cache = cap.layers[0]["k"][0]  # [kv_heads, n_kv, d]

    fresh_cap = AttentionCapture(flash_attn=False)
    fresh = make_ctx(n_ctx=512, cb_eval=fresh_cap.callback)
    decode(fresh, np.append(toks[kept], text_tokens[300]), np.arange(n + 1))
    k_fresh = fresh_cap.layers[0]["k"][0]

    got = k_cache[:, view.cells, :]  # cells in position order 0..n
    want = k_fresh[:, : n + 1, :]
    error = np.abs(got - want).max()
    assert error < 2e-3 * np.abs(want).max()  # F16 rounding of the re-rotated keys
    unrotated = np.abs(k_before[:, view.cells[:n], :] - want[:, :n, :]).max()
    assert unrotated > 50 * error  # the cells really were re-rotated


@pytest.mark.parametrize("n_stream", [1_000, pytest.param(10_000, marks=pytest.mark.slow)])
def test_long_stream_stays_within_budget_plus_chunk(make_ctx, text_tokens, n_stream):
    budget, chunk = 256, 128
    ctx = make_ctx(n_ctx=512, n_batch=chunk, n_ubatch=chunk)  # far less than the stream
    kv = KVCache(ctx)
    kv.set_scoring(8)
    stream = np.resize(text_tokens, n_stream)
    next_pos = 0
    evictions = 0
    for start in range(0, n_stream, chunk):
        piece = stream[start : start + chunk]
        decode(ctx, piece, np.arange(next_pos, next_pos + len(piece)))
        next_pos += len(piece)
        view = kv.cells()
        assert len(view.cells) <= budget + chunk
        assert view.cells.max() < budget + chunk  # freed cells are reused, the buffer never grows
        if len(view.cells) > budget:
            keep = select_keep(view.scores, budget, n_sink=4, n_recent=budget // 4, local_window=2, bias=1e-3)
            kv.evict(view.positions[~keep])
            next_pos = kv.compact()
            evictions += 1
            assert next_pos == budget
    assert evictions >= (n_stream - budget) // chunk - 1
    assert kv.cells().positions.max() < budget + chunk


@pytest.mark.parametrize("w,bias", [(0, 0.0), (2, 0.0), (2, 1e-3), (1, 1e-2)])
def test_select_keep_matches_reference(w, bias):
    rng = np.random.default_rng(42)
    for n in (50, 300, 577):
        scores = rng.gamma(0.3, size=n).astype(np.float32)
        scores[rng.choice(n, 20)] = 0.0  # ties
        got = select_keep(scores, 256, 4, 64, w, bias)
        want = reference_keep(scores, 256, 4, 64, w, bias)
        assert got.sum() == min(n, 256)
        np.testing.assert_array_equal(got, want)


def test_select_keep_rejects_bad_parameters():
    s = np.ones(10, np.float32)
    for args in [(4, 3, 2, 0, 0.0), (-1, 0, 0, 0, 0.0), (8, 0, 0, -1, 0.0), (8, 0, 0, 0, math.nan)]:
        with pytest.raises(NativeError):
            select_keep(s, *args)


def test_bad_input_returns_errors_and_corrupts_nothing(make_ctx, model, text_tokens):
    ctx = make_ctx(n_ctx=512, n_batch=128, n_ubatch=128)
    twin = make_ctx(n_ctx=512, n_batch=128, n_ubatch=128)
    kv = KVCache(ctx)
    decode(ctx, text_tokens[:100], np.arange(100))
    decode(twin, text_tokens[:100], np.arange(100))

    for seq in (-1, 1, 999):
        with pytest.raises(NativeError) as err:
            kv.cells(seq)
        assert err.value.status == N.INFMLLM_ERR_INVALID_SEQ
        with pytest.raises(NativeError):
            kv.evict([1, 2], seq)
        with pytest.raises(NativeError):
            kv.compact(seq)
    for bad_positions in ([5, 100], [7, 7], [-3]):
        with pytest.raises(NativeError) as err:
            kv.evict(bad_positions)
        assert err.value.status == N.INFMLLM_ERR_POS_NOT_FOUND
    cells = kv.cells().cells
    free = int(np.setdiff1d(np.arange(kv.size), cells)[0])
    for bad_cells in ([cells[5], free], [cells[7], cells[7]], [-3], [kv.size]):
        with pytest.raises(NativeError) as err:
            kv.evict_cells(bad_cells)
        assert err.value.status == N.INFMLLM_ERR_INVALID_ARG
    for n in (129, -2):
        with pytest.raises(NativeError) as err:
            kv.set_scoring(n)
        assert err.value.status == N.INFMLLM_ERR_INVALID_ARG
    assert kv.scoring == 0
    assert np.array_equal(kv.cells().positions, np.arange(100))

    decode(ctx, text_tokens[100:101], [100])
    decode(twin, text_tokens[100:101], [100])
    np.testing.assert_array_equal(logits_of(ctx, model), logits_of(twin, model))


def test_scoring_reads_back_every_mode(make_ctx):
    """All-rows mode is -1, which the read-back must return as a mode, not as an error."""
    kv = KVCache(make_ctx(n_ctx=512, n_batch=128, n_ubatch=128))
    for mode in (N.INFMLLM_SCORE_ALL_ROWS, 8, 128, N.INFMLLM_SCORE_OFF):
        kv.set_scoring(mode)
        assert kv.scoring == mode


def test_kv_size_is_the_padded_buffer(make_ctx, text_tokens):
    """llama.cpp pads n_ctx to a multiple of 256: every cell up to kv.size can be used."""
    n_ctx = 300
    ctx = make_ctx(n_ctx=n_ctx, n_batch=128, n_ubatch=128)
    kv = KVCache(ctx)
    assert kv.size == 512 > n_ctx
    decode(ctx, text_tokens[: kv.size], np.arange(kv.size))
    assert kv.cells().cells.max() == kv.size - 1


def test_h2o_with_cells_past_n_ctx(make_ctx, text_tokens):
    """H2O's accumulator is indexed by cell: sized from kv.size it ranks cells >= n_ctx
    (here seq 1 holds the lowest cells, so seq 0 lands above n_ctx)."""
    n_ctx = 300
    ctx = make_ctx(n_ctx=n_ctx, n_batch=128, n_ubatch=128, n_seq_max=2)
    kv = KVCache(ctx)
    decode(ctx, text_tokens[:n_ctx], np.arange(n_ctx), seq_id=1)
    kv.set_scoring(N.INFMLLM_SCORE_ALL_ROWS)
    decode(ctx, text_tokens[n_ctx : n_ctx + 150], np.arange(150), seq_id=0)
    view = kv.cells(0)
    assert view.cells.min() >= n_ctx

    policy = H2O(budget=64, chunk=16)
    policy.reset(kv.size)
    policy.observe(view, 150)
    keep = policy.select(view)
    assert keep.sum() == 64
    np.testing.assert_array_equal(keep, reference_keep(view.scores, 64, 0, policy.recent, 0, 0.0))
    kv.evict(view.positions[~keep])
    policy.forget(view.cells[~keep])
    assert kv.compact() == 64
    assert np.all(policy._acc[view.cells[~keep]] == 0)


def test_runtime_sizes_policies_by_the_kv_buffer(model_path, text_tokens):
    llm = Llama(model_path, n_ctx=300, n_batch=64, kv_policy=H2O(budget=128, chunk=32))
    try:
        assert llm.kv.size > llm.n_ctx()
        assert len(llm.policy._acc) == llm.kv.size
        llm.eval(text_tokens[:400])  # several evictions
        assert llm.n_cached <= 160
    finally:
        llm.close()


def test_select_keep_nan_scores_rank_lowest():
    """NaN never reaches the ordering (undefined behaviour in nth_element): it ranks below
    every other score, -inf below every finite one, +inf above; sums skip them."""
    rng = np.random.default_rng(7)
    n, budget = 200, 64
    scores = rng.gamma(0.3, size=n).astype(np.float32)
    nan_cells = rng.choice(np.arange(4, n - 16), size=120, replace=False)
    scores[nan_cells] = np.nan
    scores[nan_cells[:5]] = -np.inf
    scores[nan_cells[5:8]] = np.inf
    for w, bias in [(0, 0.0), (2, 1e-3)]:
        keep = select_keep(scores, budget, 4, 16, w, bias)
        assert keep.sum() == budget
        np.testing.assert_array_equal(keep, reference_keep(scores, budget, 4, 16, w, bias))
        middle = np.zeros(n, bool)
        middle[4 : n - 16] = True
        finite = middle & np.isfinite(scores)
        assert keep[middle & (scores == np.inf)].all()
        # 44 saddles: 3 +inf, then the finite cells, and no NaN or -inf while any finite is left
        assert keep[finite].sum() == min(budget - 20 - 3, finite.sum())
        assert not keep[middle & np.isnan(scores)].any()
    # all NaN: still exactly budget, ties to the newer cell
    keep = select_keep(np.full(n, np.nan, np.float32), budget, 4, 16, 0, 0.0)
    np.testing.assert_array_equal(np.flatnonzero(keep), np.r_[0:4, n - 60 : n])
