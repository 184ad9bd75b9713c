"""K/V rows to host memory and back, re-ordering cells, and query capture (the recall tier's
native half)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import logits_of
from reference import AttentionCapture
from test_native_kv import kl_divergence

from infmllm_gguf import _native as N
from infmllm_gguf.kv import KVCache, NativeError, decode


def _row_bytes(kv: KVCache) -> tuple[int, int]:
    layers = kv.layers()
    return sum(la.k_row_bytes for la in layers), sum(la.v_row_bytes for la in layers)


def _probe(kv: KVCache, model, tokens: np.ndarray, start: int) -> list[np.ndarray]:
    """Decode `tokens` from position `start`, take each one's logits, and take them back out of
    the cache."""
    positions = np.arange(start, start + len(tokens))
    decode(kv.ctx, tokens, positions, all_logits=True)
    logits = [logits_of(kv.ctx, model, i) for i in range(len(tokens))]
    kv.evict(positions)
    return logits


def _mean_kl(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.mean([kl_divergence(p, q) for p, q in zip(a, b, strict=True)]))


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])  # V transposed / not
def test_rows_evicted_and_written_back_restore_the_logits(make_ctx, model, text_tokens, flash_attn):
    """Read 64 cells out, evict them and compact; write them back at the positions their keys
    were rotated at and re-order everything into stream order: the logits of the next 16 tokens
    equal those of the cache that never lost them (two K-shifts of F16 keys apart; one token's
    KL alone moves by 1e-2 with such rounding on some CPUs, the mean over 16 does not)."""
    ctx = make_ctx(n_ctx=512, flash_attn=flash_attn)
    kv = KVCache(ctx)
    decode(ctx, text_tokens[:300], np.arange(300))
    probe = text_tokens[300:316]
    whole = _probe(kv, model, probe, 300)

    k_bytes, v_bytes = _row_bytes(kv)
    out = np.arange(200, 264)
    k, v = kv.read_rows(out, k_bytes, v_bytes)
    assert k.nbytes == 64 * k_bytes and v.nbytes == 64 * v_bytes
    kv.evict(out)
    assert kv.compact() == 236
    kv.update()
    without = _probe(kv, model, probe, 236)

    cells = kv.write_rows(out, k, v)  # at 200..263, among the compacted cells' positions
    assert len(set(cells)) == 64
    view = kv.cells()
    back = np.isin(view.cells, cells)
    # stream order: the kept cells 0..199 and 200..235, the written ones between them
    kept = view.cells[~back][np.argsort(view.positions[~back], kind="stable")]
    order = np.concatenate([kept[:200], cells, kept[200:]])
    assert kv.arrange(order) == 300
    assert kv.update()
    assert np.array_equal(kv.cells().positions, np.arange(300))
    restored = _probe(kv, model, probe, 300)

    assert _mean_kl(whole, restored) < 1e-2
    assert _mean_kl(whole, without) > 5 * max(_mean_kl(whole, restored), 1e-3)


def test_rows_written_back_are_rotated_to_their_new_positions(make_ctx, text_tokens):
    """Rows re-enter at other positions (moved to the front): each key in the cache must equal
    the key a fresh context computes for that token at its new position."""
    cap = AttentionCapture(flash_attn=False)
    ctx = make_ctx(n_ctx=512, cb_eval=cap.callback)
    kv = KVCache(ctx)
    toks = text_tokens[:300]
    decode(ctx, toks, np.arange(300))
    k_bytes, v_bytes = _row_bytes(kv)
    moved = np.arange(200, 232)
    k, v = kv.read_rows(moved, k_bytes, v_bytes)
    kv.evict(moved)
    kv.compact()
    kv.update()
    cells = kv.write_rows(moved, k, v)
    rest = kv.cells()
    rest_cells = rest.cells[~np.isin(rest.cells, cells)]
    rest_cells = rest_cells[np.argsort(rest.positions[~np.isin(rest.cells, cells)], kind="stable")]
    kv.arrange(np.concatenate([cells, rest_cells]))  # the moved tokens first
    kv.update()
    decode(ctx, text_tokens[300:301], [300])
    view = kv.cells()
    k_cache = cap.layers[0]["k"][0][:, view.cells, :]  # [kv_heads, n, d] in position order

    kept = np.setdiff1d(np.arange(300), moved)
    fresh_cap = AttentionCapture(flash_attn=False)
    fresh = make_ctx(n_ctx=512, cb_eval=fresh_cap.callback)
    decode(fresh, np.concatenate([toks[moved], toks[kept], text_tokens[300:301]]), np.arange(301))
    want = fresh_cap.layers[0]["k"][0][:, :301, :]
    error = np.abs(k_cache - want).max()
    assert error < 2e-3 * np.abs(want).max()


def test_quantized_cache_rows_round_trip_as_blocks(make_ctx, model, text_tokens):
    """A Q8_0 K/V cache (V untransposed, flash attention) copies its blocks unchanged."""
    ctx = make_ctx(n_ctx=512, flash_attn=True, type_k=8, type_v=8)  # GGML_TYPE_Q8_0
    kv = KVCache(ctx)
    layers = kv.layers()
    assert layers[0].type_k == 8 and layers[0].k_row_bytes == layers[0].n_embd_k // 32 * 34
    decode(ctx, text_tokens[:200], np.arange(200))
    k_bytes, v_bytes = _row_bytes(kv)
    k, v = kv.read_rows(np.arange(50, 80), k_bytes, v_bytes)
    kv.evict(np.arange(50, 80))
    cells = kv.write_rows(np.arange(50, 80), k, v)
    k2, v2 = kv.read_rows(np.arange(50, 80), k_bytes, v_bytes)
    assert np.array_equal(k, k2) and np.array_equal(v, v2)
    assert len(cells) == 30


def test_row_transfers_refuse_bad_input_and_change_nothing(make_ctx, text_tokens):
    ctx = make_ctx(n_ctx=256)
    kv = KVCache(ctx)
    decode(ctx, text_tokens[:200], np.arange(200))
    k_bytes, v_bytes = _row_bytes(kv)
    before = kv.cells()
    with pytest.raises(NativeError, match="position not cached"):
        kv.read_rows(np.array([5, 999]), k_bytes, v_bytes)
    with pytest.raises(NativeError, match="buffer size"):
        kv.read_rows(np.array([5]), k_bytes - 1, v_bytes)
    k, v = kv.read_rows(np.arange(100), k_bytes, v_bytes)
    with pytest.raises(NativeError, match="not enough free cells"):
        kv.write_rows(np.arange(100), k, v)  # 256 cells, 200 used
    with pytest.raises(NativeError, match="buffer size"):
        kv.write_rows(np.arange(10), k[:-1], v)
    cells = before.cells
    with pytest.raises(NativeError, match="invalid argument"):
        kv.arrange(cells[:-1])  # not every cell
    with pytest.raises(NativeError, match="invalid argument"):
        kv.arrange(np.append(cells[:-1], cells[0]))  # a repeat
    after = kv.cells()
    assert np.array_equal(before.cells, after.cells) and np.array_equal(before.positions, after.positions)


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_captured_queries_are_the_graph_queries_across_ubatches(make_ctx, text_tokens, flash_attn):
    """The kept window holds the newest rows across ubatches and decodes, equal to the Q the
    attention of every layer used."""
    cap = AttentionCapture(flash_attn=flash_attn)
    ctx = make_ctx(n_ctx=512, n_batch=64, n_ubatch=64, flash_attn=flash_attn, cb_eval=cap.callback)
    kv = KVCache(ctx)
    layers = kv.layers()
    w = 24
    n_floats = sum(la.n_head * w * la.head_dim for la in layers)
    kv.set_query_capture(w)
    assert kv.queries(n_floats)[1] == 0
    decode(ctx, text_tokens[:100], np.arange(100))  # ubatches of 64 and 36
    q_prev = {il: e["q"][0].copy() for il, e in cap.layers.items()}
    decode(ctx, text_tokens[100:110], np.arange(100, 110))  # 10 more rows: 14 old + 10 new
    flat, held = kv.queries(n_floats)
    assert held == w
    offset = 0
    for la in layers:
        got = flat[offset : offset + la.n_head * w * la.head_dim].reshape(la.n_head, w, la.head_dim)
        offset += got.size
        want = np.concatenate([q_prev[la.il][:, -14:, :], cap.layers[la.il]["q"][0]], axis=1)
        assert np.allclose(got, want, rtol=1e-5, atol=1e-5), la.il
    kv.clear_queries()
    assert kv.queries(n_floats)[1] == 0
    kv.set_queries(flat, held)  # what a restored session puts back
    again, held_again = kv.queries(n_floats)
    assert held_again == held and np.array_equal(again, flat)
    for bad, match in (((flat[:-1], held), "buffer size"), ((flat, w + 1), "invalid argument")):
        with pytest.raises(NativeError, match=match):
            kv.set_queries(*bad)
    assert kv.queries(n_floats)[1] == held and np.array_equal(kv.queries(n_floats)[0], flat)  # unchanged
    kv.clear_queries()
    assert kv.queries(n_floats)[1] == 0
    with pytest.raises(NativeError, match="buffer size"):
        kv.queries(n_floats - 1)
    with pytest.raises(NativeError, match="invalid argument"):
        kv.set_query_capture(65)  # more than a ubatch
    assert N.infmllm_set_query_capture(ctx, 0) == 0


def test_place_moves_a_sequence_onto_chosen_cells(make_ctx, text_tokens):
    """Cells move with their rows and positions; the head is set; a bad list changes nothing."""
    ctx = make_ctx(n_ctx=256, n_batch=64)
    kv = KVCache(ctx)
    decode(ctx, text_tokens[:40], np.arange(40))
    kv.evict(np.arange(5, 15))
    before = kv.cells()
    layers = kv.layers()
    k_bytes, v_bytes = sum(la.k_row_bytes for la in layers), sum(la.v_row_bytes for la in layers)
    rows = kv.read_rows(before.positions, k_bytes, v_bytes)
    target = np.arange(100, 130)[::-1].copy()  # free cells, in reverse order
    for bad in (target[:-1], np.r_[target[:-1], target[0]], np.r_[target[:-1], 999_999]):
        with pytest.raises(NativeError):
            kv.place(bad, 7)
    with pytest.raises(NativeError):
        kv.place(target, kv.size)  # head out of range
    assert np.array_equal(kv.cells().cells, before.cells)
    assert kv.place(target, 7) == len(target)
    after = kv.cells()
    assert np.array_equal(after.positions, before.positions)
    assert np.array_equal(after.cells, target) and kv.head() == 7
    moved = kv.read_rows(after.positions, k_bytes, v_bytes)
    assert all(np.array_equal(a, b) for a, b in zip(rows, moved))
    assert kv.place(target, 3) == len(target)  # onto the cells it is on: only the head moves
    assert np.array_equal(kv.cells().cells, target) and kv.head() == 3
    assert all(np.array_equal(a, b) for a, b in zip(rows, kv.read_rows(after.positions, k_bytes, v_bytes)))
