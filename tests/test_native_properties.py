"""Property tests of the native API: the keep rule against its plain reference over random
scores and parameters, and eviction + compaction on a real context against a model of the
cells.  Derandomized, so CI sees the same examples every run.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from infmllm_gguf._llama_cpp import llama_cpp as lc
from reference import reference_keep

from infmllm_gguf import _native as N
from infmllm_gguf.kv import KVCache, NativeError, decode, select_keep

INT32_MAX = 2**31 - 1
FAST = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

# attention mass is >= 0, but the rule must be defined on anything a float can hold
_score = st.one_of(
    st.floats(0, 10, width=32),
    st.floats(-1024, 2.0**100, width=32),
    st.sampled_from([0.0, 1.0, float("nan"), float("inf"), -float("inf")]),
)


@st.composite
def _keep_case(draw):
    scores = np.array(draw(st.lists(_score, max_size=80)), np.float32)
    n = len(scores)
    budget = draw(st.integers(0, n + 4))
    n_sink = draw(st.integers(0, budget))
    n_recent = draw(st.integers(0, budget - n_sink))
    w = draw(st.one_of(st.integers(0, 8), st.just(INT32_MAX)))
    bias = draw(st.one_of(st.sampled_from([0.0, 1e-3]), st.floats(0, 1, width=32)))
    return scores, budget, n_sink, n_recent, w, bias


@FAST
@given(_keep_case())
def test_select_keep_matches_reference(case):
    scores, budget, n_sink, n_recent, w, bias = case
    n = len(scores)
    got = select_keep(scores, budget, n_sink, n_recent, w, bias)
    np.testing.assert_array_equal(got, reference_keep(scores, budget, n_sink, n_recent, w, bias))
    assert got.sum() == min(n, budget)
    if n > budget:
        assert got[:n_sink].all() and got[n - n_recent :].all()
        middle = np.zeros(n, bool)
        middle[n_sink : n - n_recent] = True
        if got[middle & np.isnan(scores)].any():  # a NaN kept only once every other is
            assert got[middle & ~np.isnan(scores)].all()


@FAST
@given(
    budget=st.integers(0, INT32_MAX),
    n_sink=st.integers(0, INT32_MAX),
    n_recent=st.integers(0, INT32_MAX),
)
def test_select_keep_refuses_sinks_plus_recent_over_budget(budget, n_sink, n_recent):
    """n_sink + n_recent may overflow int32: still refused, never filled past keep."""
    s = np.ones(10, np.float32)
    if n_sink + n_recent > budget:
        with pytest.raises(NativeError) as err:
            select_keep(s, budget, n_sink, n_recent, 0, 0.0)
        assert err.value.status == N.INFMLLM_ERR_INVALID_ARG
    else:
        assert select_keep(s, budget, n_sink, n_recent, 0, 0.0).sum() == min(10, budget)


N_CTX = 256
CAPACITY = 64  # cells the model stream may hold; small keeps each example fast


@pytest.fixture(scope="module")
def small_ctx(model):
    p = lc.llama_context_default_params()
    p.n_ctx = N_CTX
    p.n_batch = p.n_ubatch = 32
    p.n_threads = p.n_threads_batch = 1  # tiny batches: threads would only wait on each other
    p.no_perf = True
    ctx = lc.llama_init_from_model(model, p)
    assert ctx
    yield ctx
    lc.llama_free(ctx)


def _check_view(kv: KVCache, stream: list[list[int]], cell_of: dict[int, int]) -> None:
    """The native view equals the model: stream order, positions, and cells that never move."""
    view = kv.cells()
    assert kv.n_cells() == len(stream) == len(view.cells)
    np.testing.assert_array_equal(view.positions, [pos for pos, _ in stream])
    np.testing.assert_array_equal(view.cells, [cell_of[uid] for _, uid in stream])
    assert len(np.unique(view.cells)) == len(view.cells)
    assert np.all((view.cells >= 0) & (view.cells < kv.size))


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_evict_compact_match_a_model_of_the_cells(small_ctx, text_tokens, data):
    """Random decodes, evictions (some with a missing or repeated position, which must be
    refused with nothing changed) and compactions (positions become the rank in stream order)."""
    lc.llama_memory_clear(lc.llama_get_memory(small_ctx), True)
    kv = KVCache(small_ctx)
    stream: list[list[int]] = []  # [position, uid] in stream order; uid = index into text_tokens
    cell_of: dict[int, int] = {}
    next_pos = next_uid = 0

    for _ in range(data.draw(st.integers(1, 6), label="n_ops")):
        op = data.draw(st.sampled_from(["decode", "evict", "compact"]), label="op")
        if op == "decode" and len(stream) < CAPACITY:
            k = data.draw(st.integers(1, min(16, CAPACITY - len(stream))), label="k")
            positions = np.arange(next_pos, next_pos + k)
            decode(small_ctx, text_tokens[next_uid : next_uid + k], positions)
            view = kv.cells()
            new = dict(zip(view.positions.tolist(), view.cells.tolist()))
            for i, pos in enumerate(positions.tolist()):
                stream.append([pos, next_uid + i])
                cell_of[next_uid + i] = new[pos]
            next_pos += k
            next_uid += k
        elif op == "evict":
            present = {pos for pos, _ in stream}
            subset = st.lists(st.sampled_from(sorted(present)), unique=True) if present else st.just([])
            victims = data.draw(subset, label="subset")
            flaw = data.draw(st.sampled_from(["none", "missing", "repeated"]), label="flaw")
            if flaw == "missing":
                absent = sorted(set(range(-3, next_pos + 4)) - present)
                victims = [*victims, data.draw(st.sampled_from(absent), label="missing")]
            elif flaw == "repeated" and victims:
                victims = [*victims, victims[0]]
            else:
                flaw = "none"
            victims = data.draw(st.permutations(victims), label="victims")
            if flaw == "none":
                assert kv.evict(np.array(victims, np.int32)) == len(victims)
                gone = set(victims)
                stream = [entry for entry in stream if entry[0] not in gone]
            else:
                before = kv.cells()
                with pytest.raises(NativeError) as err:
                    kv.evict(np.array(victims, np.int32))
                assert err.value.status == N.INFMLLM_ERR_POS_NOT_FOUND
                after = kv.cells()
                np.testing.assert_array_equal(after.cells, before.cells)
                np.testing.assert_array_equal(after.positions, before.positions)
        elif op == "compact":
            assert kv.compact() == len(stream)
            for rank, entry in enumerate(stream):
                entry[0] = rank
            next_pos = len(stream)
        _check_view(kv, stream, cell_of)
