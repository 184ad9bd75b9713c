"""The runtime on a GPU, against the same weights on the CPU: in-graph scores, eviction,
compaction, row transfers and the recall tier, image cells, and where the scheduler runs the
scoring ops; flash attention on and off.

Marked `gpu`: they skip, saying why, where no GPU device is present (any CPU build, or a CUDA
build on a machine without a GPU).  `INFMLLM_GPU_TESTS_ON_CPU=1` runs them with the CPU in the
GPU's place: a dry run of the tests themselves (scripts/gpu_check.sh --cpu), proving nothing
about a GPU.  The model is a small random Llama (infmllm_gguf.synthetic: head_dim 64, which
CUDA's flash attention supports), written here, so nothing has to travel to a GPU machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import f16_keys, logits_of, replay_evictions

from infmllm_gguf import InfMLLM, Llama, Recall, build_info, devices, synthetic
from infmllm_gguf.kv import KVCache, decode

pytestmark = pytest.mark.gpu

ON_CPU = os.environ.get("INFMLLM_GPU_TESTS_ON_CPU") == "1"
N_GPU_LAYERS = 0 if ON_CPU else -1  # every layer, its K/V and ops on the GPU
N_THREADS = 2
FLASH = pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])


@pytest.fixture(scope="module")
def gpu() -> str:
    """The name of the device the tests offload to (the backend the scheduler reports)."""
    if ON_CPU:
        return "CPU"
    gpus = [d.name for d in devices() if d.type == "gpu"]
    if not gpus:
        pytest.skip(
            f"no GPU device (registered backends: {', '.join(build_info()['backends'])}); a CUDA "
            'build (CMAKE_ARGS="-DGGML_CUDA=on" pip install .) on a machine with an NVIDIA GPU runs these'
        )
    return gpus[0]


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(synthetic.write_llama(tmp_path_factory.mktemp("gguf") / "small.gguf", synthetic.SMALL))


@pytest.fixture(scope="module")
def small_mmproj(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("gguf") / "small-mmproj.gguf"
    return str(synthetic.write_mmproj(path, synthetic.SMALL.n_embd))


@pytest.fixture
def make_ctx(gpu: str, small_gguf: str, open_gguf) -> Callable[..., tuple[Any, Any]]:
    """Factory: (model, context) of the small model, on the GPU or (on_gpu=False) the CPU."""

    def make(on_gpu: bool = True, flash_attn: bool = False, n_ctx: int = 512, n_seq_max: int = 1):
        return open_gguf(
            small_gguf,
            n_ctx=n_ctx,
            n_batch=512,
            n_seq_max=n_seq_max,
            flash_attn=flash_attn,
            n_gpu_layers=N_GPU_LAYERS if on_gpu else 0,
            n_threads=N_THREADS,
        )

    return make


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(300, synthetic.SMALL.n_vocab, n).astype(np.int32)


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


@FLASH
def test_scores_on_the_gpu_match_the_cpu(make_ctx, flash_attn: bool) -> None:
    """Saddle scores of a 200-token prompt (its last 8 rows) and then of a single decoded token
    equal the CPU's on the same weights within 1e-3 relative."""
    tokens = _tokens(201)
    scores = []
    for on_gpu in (True, False):
        _, ctx = make_ctx(on_gpu=on_gpu, flash_attn=flash_attn)
        kv = KVCache(ctx)
        kv.set_scoring(8)
        decode(ctx, tokens[:200], np.arange(200))
        prompt = kv.cells().scores.copy()
        decode(ctx, tokens[200:], [200])
        scores.append((prompt, kv.cells().scores.copy()))
    (gpu_prompt, gpu_step), (cpu_prompt, cpu_step) = scores
    assert len(gpu_step) == 201 and np.all(cpu_prompt > 0)
    assert _rel(gpu_prompt, cpu_prompt) < 1e-3
    assert _rel(gpu_step, cpu_step) < 1e-3


@FLASH
def test_compaction_on_the_gpu_rotates_keys_like_fresh_positions(make_ctx, flash_attn: bool) -> None:
    """Tokens that never saw the evicted ones (another sequence), compacted from 40..99 to
    0..59 on the GPU, hold the keys a fresh GPU context computes at 0..59 and give its logits."""
    model, ctx = make_ctx(flash_attn=flash_attn, n_seq_max=2)
    kv = KVCache(ctx)
    tokens = _tokens(101)
    decode(ctx, tokens[:40], np.arange(40), seq_id=1)
    decode(ctx, tokens[40:100], np.arange(40, 100))
    assert kv.evict(np.arange(40), seq_id=1) == 40
    assert kv.compact() == 60 and kv.update()
    _, fresh = make_ctx(flash_attn=flash_attn)
    decode(fresh, tokens[40:100], np.arange(60))
    shifted, expected = f16_keys(kv, 60), f16_keys(KVCache(fresh), 60)
    assert np.abs(shifted - expected).max() < 4e-3 * np.abs(expected).max()
    decode(ctx, tokens[100:], [60])
    decode(fresh, tokens[100:], [60])
    np.testing.assert_allclose(logits_of(ctx, model), logits_of(fresh, model), rtol=1e-2, atol=1e-2)


@FLASH
def test_eviction_on_the_gpu_equals_a_replay_with_seq_rm(make_ctx, small_gguf: str, flash_attn: bool) -> None:
    """InfMLLM without re-positioning, 10+ evictions on the GPU: the next logits equal those
    of a GPU context from which llama.cpp's seq_rm removed the same positions."""
    llm = Llama(
        small_gguf,
        n_ctx=256,
        n_gpu_layers=N_GPU_LAYERS,
        flash_attn=flash_attn,
        kv_policy=InfMLLM(budget=64, chunk=16, reposition=False),
        n_threads=N_THREADS,
        debug=True,
    )
    model, ref = make_ctx(flash_attn=flash_attn, n_ctx=1024)
    replay_evictions(llm, ref, _tokens(300))
    assert llm.kv_stats()["evictions"] >= 10
    np.testing.assert_allclose(llm.session.stream.last_logits, logits_of(ref, model), rtol=1e-2, atol=1e-2)
    llm.close()


@FLASH
def test_a_stream_on_the_gpu_keeps_what_the_cpu_keeps(gpu: str, small_gguf: str, flash_attn: bool) -> None:
    """InfMLLM re-positioning through 30+ evictions on the GPU and on the CPU: the cache
    invariants hold after every step (debug), and the kept stream tokens agree (>= 95 %:
    scores equal to rounding may order a tie differently)."""
    kept = []
    for layers in (N_GPU_LAYERS, 0):
        llm = Llama(
            small_gguf,
            n_ctx=256,
            n_gpu_layers=layers,
            flash_attn=flash_attn,
            kv_policy=InfMLLM(budget=96, chunk=16),
            n_threads=N_THREADS,
            debug=True,
        )
        llm.eval(_tokens(700, seed=1))
        assert llm.kv_stats()["evictions"] >= 30 and np.isfinite(llm.session.stream.last_logits).all()
        kept.append(llm.cached_stream_indices())
        llm.close()
    assert len(np.intersect1d(*kept)) >= 0.95 * len(kept[1])


def test_row_transfers_on_the_gpu_round_trip_and_the_recall_tier_recalls(make_ctx, small_gguf: str) -> None:
    """Rows copied off the GPU, evicted and written back at their positions are the same
    bytes; a stream with the recall tier on the GPU brings pages back for a repeated passage."""
    _, ctx = make_ctx()
    kv = KVCache(ctx)
    decode(ctx, _tokens(120), np.arange(120))
    layers = kv.layers()
    k_bytes, v_bytes = sum(x.k_row_bytes for x in layers), sum(x.v_row_bytes for x in layers)
    positions = np.arange(30, 50)
    k, v = kv.read_rows(positions, k_bytes, v_bytes)
    assert kv.evict(positions) == 20 and kv.n_cells() == 100
    kv.write_rows(positions, k, v)
    k2, v2 = kv.read_rows(positions, k_bytes, v_bytes)
    assert k.any() and np.array_equal(k, k2) and np.array_equal(v, v2)

    tokens = _tokens(600, seed=2)
    llm = Llama(
        small_gguf,
        n_ctx=256,
        n_gpu_layers=N_GPU_LAYERS,
        kv_policy=InfMLLM(budget=64, chunk=16),
        recall=Recall(),
        n_threads=N_THREADS,
        debug=True,
    )
    llm.eval(tokens)
    llm.eval(tokens[100:120])  # an early passage again: a turn whose queries find its pages
    llm.generate_text(max_tokens=4)
    stats = llm.kv_stats()
    assert stats["pages_stored"] > 0 and stats["recalls"] == 1 and stats["n_recalled"] > 0
    llm.close()


def _picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (56, 56, 3), dtype=np.uint8)


@FLASH
def test_image_cells_on_the_gpu(gpu: str, small_gguf: str, small_mmproj: str, flash_attn: bool) -> None:
    """A picture's cells decoded into the GPU cache give the CPU's next logits; pictures and
    text then stream through eviction (whole images evicted and compacted) with the
    invariants holding."""
    logits = []
    for layers in (N_GPU_LAYERS, 0):
        llm = Llama(
            small_gguf,
            mmproj_path=small_mmproj,
            n_ctx=512,
            n_gpu_layers=layers,
            flash_attn=flash_attn,
            kv_policy=InfMLLM(budget=128, chunk=16),
            n_threads=N_THREADS,
            debug=True,
        )
        llm.feed("A picture:")
        assert llm.feed_image(_picture(0)) == 16
        llm.feed("and after it.")
        logits.append(llm.session.stream.last_logits.copy())
        if layers == N_GPU_LAYERS:
            for i in range(12):
                llm.feed_image(_picture(i + 1), prompt=f"frame {i}")
            stats = llm.kv_stats()
            assert stats["evictions"] > 0 and 0 < stats["n_image_cells"] <= 128
        llm.close()
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-2, atol=1e-2)


_SCHED_PROBE = """
import sys
import numpy as np
from infmllm_gguf._llama_cpp import llama_cpp as lc
from infmllm_gguf.kv import KVCache, decode
path, n_gpu_layers, flash = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
lc.llama_backend_init()
mp = lc.llama_model_default_params()
mp.n_gpu_layers = n_gpu_layers
m = lc.llama_model_load_from_file(path.encode(), mp)
p = lc.llama_context_default_params()
p.n_ctx, p.n_batch, p.n_ubatch = 512, 512, 512
p.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
ctx = lc.llama_init_from_model(m, p)
kv = KVCache(ctx)
kv.set_scoring(8)
kv.set_query_capture(4)
decode(ctx, np.arange(300, 400), np.arange(100))
decode(ctx, [500], [100])
"""
# a node as ggml_backend_sched_print_assignments lists it (GGML_SCHED_DEBUG=2):
#   node # 12 (   MUL_MAT):         infmllm_kq-0 (  64K) [CUDA0         ] use=1,c=0: ...
_NODE = re.compile(r"node #\s*\d+ \(\s*([^)]*?)\): +(\S+) \([^)]*\) \[\s*(\S+)")


@FLASH
def test_the_scheduler_runs_every_scoring_op_on_the_gpu(gpu: str, small_gguf: str, flash_attn: bool) -> None:
    """In a scored prompt and a scored single-token decode, every node of the scoring and
    query capture (named infmllm_*) is assigned to the GPU's backend: none falls back to the
    CPU (read from the scheduler's own GGML_SCHED_DEBUG=2 listing)."""
    env = dict(os.environ, GGML_SCHED_DEBUG="2")
    run = subprocess.run(
        [sys.executable, "-c", _SCHED_PROBE, small_gguf, str(N_GPU_LAYERS), "1" if flash_attn else "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    nodes = [m.groups() for m in _NODE.finditer(run.stderr)]
    ours = [(op, name, backend) for op, name, backend in nodes if name.startswith("infmllm_")]
    ops = {op for op, _, _ in ours}
    # the listing cuts op names to 10 characters; with flash attention the probabilities are ours
    expected = {"REPEAT_BAC", "ADD", "CONT"} | ({"MUL_MAT", "SOFT_MAX"} if flash_attn else set())
    assert expected <= ops, sorted(ops)
    elsewhere = sorted({(op, name, backend) for op, name, backend in ours if backend != gpu})
    assert not elsewhere, f"scoring ops not on {gpu}: {elsewhere[:10]}"
    assert len(nodes) > len(ours) > 0
