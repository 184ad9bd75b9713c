"""Shared fixtures: the real SmolLM2 GGUF, real KJV text, contexts on the patched libllama.

The native tests read tensor data through llama.cpp's eval callback as host memory, so their
model and contexts stay on the CPU even in a CUDA build (no offloaded layers, K/V or ops).
"""

from __future__ import annotations

import ctypes
import os
import signal

import numpy as np
import pytest
from infmllm_gguf._llama_cpp import llama_cpp as lc

from infmllm_gguf import default_model_path
from infmllm_gguf.kv import KVCache, decode
from infmllm_gguf.texts import genesis

N_THREADS = min(2, os.cpu_count() or 1)


@pytest.fixture
def sigint():
    """Python's Ctrl-C handler (a KeyboardInterrupt in the main thread) for the test, whatever
    the run started with: a process started with SIGINT ignored (a background job, some CI
    runners) gets no handler, and its children inherit the ignored signal.  While a handler is
    installed, a child started by exec begins with SIGINT at its default again."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def model_path() -> str:
    return str(default_model_path())


@lc.llama_log_callback
def _quiet(level, text, user_data):  # keep llama.cpp's logs out of test output
    pass


@pytest.fixture(scope="session")
def model(model_path):
    if not os.environ.get("INFMLLM_TEST_LOGS"):
        lc.llama_log_set(_quiet, None)
    lc.llama_backend_init()
    params = lc.llama_model_default_params()
    params.n_gpu_layers = 0
    m = lc.llama_model_load_from_file(model_path.encode(), params)
    assert m, "could not load the default model"
    yield m
    lc.llama_model_free(m)


@pytest.fixture(scope="session")
def text_tokens(model) -> np.ndarray:
    """Genesis tokenised once (~55K tokens)."""
    vocab = lc.llama_model_get_vocab(model)
    data = genesis().encode()
    buf = (lc.llama_token * (len(data) + 8))()
    n = lc.llama_tokenize(vocab, data, len(data), buf, len(buf), True, False)
    assert n > 0
    return np.array(buf[:n], dtype=np.int32)


@pytest.fixture
def make_ctx(model):
    """Factory for contexts; all are freed after the test."""
    made = []

    def make(
        n_ctx=1024,
        n_batch=512,
        n_ubatch=512,
        flash_attn=False,
        n_seq_max=1,
        kv_unified=True,
        cb_eval=None,
        type_k=None,
        type_v=None,
    ):
        p = lc.llama_context_default_params()
        if type_k is not None:  # a ggml_type; llama.cpp's default cache is F16
            p.type_k = type_k
        if type_v is not None:
            p.type_v = type_v
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = n_ubatch
        p.n_seq_max = n_seq_max
        p.kv_unified = kv_unified
        p.n_threads = p.n_threads_batch = N_THREADS
        p.flash_attn_type = (
            lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        p.no_perf = True
        p.offload_kqv = p.op_offload = False
        if cb_eval is not None:
            p.cb_eval = cb_eval
            p.cb_eval_user_data = None
        ctx = lc.llama_init_from_model(model, p)
        assert ctx, "could not create a context"
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        lc.llama_free(ctx)


@pytest.fixture
def open_gguf():
    """Factory: (model, context) on any GGUF, both freed after the test.  Everything stays on
    the CPU unless n_gpu_layers asks otherwise (then the K/V and ops follow the layers)."""
    made = []

    def make(
        path: str,
        n_ctx: int = 256,
        n_batch: int = 64,
        n_seq_max: int = 1,
        swa_full: bool = True,
        flash_attn: bool = False,  # off, as Llama's default, for comparisons
        n_gpu_layers: int = 0,
        n_threads: int = 1,
    ):
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        m = lc.llama_model_load_from_file(path.encode(), mp)
        assert m, f"could not load {path}"
        p = lc.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = p.n_ubatch = n_batch
        p.n_seq_max = n_seq_max
        p.swa_full = swa_full
        p.flash_attn_type = (
            lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        p.offload_kqv = p.op_offload = n_gpu_layers != 0
        p.n_threads = p.n_threads_batch = n_threads
        p.no_perf = True
        ctx = lc.llama_init_from_model(m, p)
        if not ctx:
            lc.llama_model_free(m)
        assert ctx, "could not create a context"
        made.append((m, ctx))
        return m, ctx

    yield make
    for m, ctx in made:
        lc.llama_free(ctx)
        lc.llama_model_free(m)


def f16_keys(kv: KVCache, n: int, first: int = 0) -> np.ndarray:
    """The F16 keys of the cells at positions first..first+n-1, every layer, as float32
    [layer, cell, dim]."""
    layers = kv.layers()
    k_bytes = sum(layer.k_row_bytes for layer in layers)
    k, _ = kv.read_rows(np.arange(first, first + n), k_bytes, sum(layer.v_row_bytes for layer in layers))
    return k.view(np.float16).astype(np.float32).reshape(len(layers), n, -1)


def logits_of(ctx, model, i: int = -1) -> np.ndarray:
    """Logits of the i-th token of the last batch (the last one that requested them by default)."""
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    ptr = lc.llama_get_logits_ith(ctx, i)
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)).copy()


@pytest.fixture(scope="session")
def codebook_mmproj(model_path, tmp_path_factory):
    """A codebook mmproj for the default model: default words, 4x4-word pictures (infmllm_gguf.codebook)."""
    from infmllm_gguf.codebook import write_codebook_mmproj

    return write_codebook_mmproj(model_path, tmp_path_factory.mktemp("codebook") / "mmproj-codebook.gguf")


def _runs(positions: np.ndarray) -> list[tuple[int, int]]:
    """Sorted positions as [start, end) runs."""
    if len(positions) == 0:
        return []
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(positions, breaks)]


def replay_evictions(llm, ref_ctx, tokens: np.ndarray) -> None:
    """Feed text tokens to `llm` (a fresh text stream under a policy with reposition=False) and
    the same to `ref_ctx`, a context that is never compacted, in the same pieces: before each
    piece the positions the stream evicted leave `ref_ctx` through llama.cpp's own seq_rm.  A
    piece is what fits before the cache is full, or one chunk once it is, so at most one
    eviction round comes before each piece is decoded, as in the reference."""
    mem = lc.llama_get_memory(ref_ctx)
    cached = np.zeros(0, np.int64)
    fed = 0
    while fed < len(tokens):
        take = min((llm.policy.capacity - llm.n_cached) or llm.policy.chunk, len(tokens) - fed)
        llm.eval(tokens[fed : fed + take])
        kept = llm.cached_stream_indices()
        for start, end in _runs(np.setdiff1d(cached, kept)):
            assert lc.llama_memory_seq_rm(mem, 0, start, end)
        decode(ref_ctx, tokens[fed : fed + take], np.arange(fed, fed + take))
        cached = kept
        fed += take
