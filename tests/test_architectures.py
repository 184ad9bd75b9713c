"""Architectures beyond the plain 1-D RoPE cache, on tiny random-weight GGUFs written here
with the real SmolLM2 vocabulary (no extra download).

- 1-D RoPE families (Llama 3 / Mistral, Qwen2, Qwen3, Phi-3, Pythia's partial rotary): the
  K-shift of compaction gives each the keys a fresh context computes, and they stream with
  eviction, with and without re-positioning, and with the recall tier.
- iSWA (Gemma 2, Gemma 3): scored from the full-attention layers; eviction and compaction
  act on both halves of the cache alike; Gemma 3's non-causal images are scored both ways.
- M-RoPE (Qwen2-VL): its keys cannot be re-rotated, so it evicts without re-positioning
  (`reposition=False`), text and images (a tiny random Qwen2-VL projector, at the positions
  llama.cpp's own mtmd helper gives them), and is refused with the reason otherwise.
- Recurrent (Mamba): no per-token cache to evict; refused, runs with kv_policy='full'.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from conftest import f16_keys, logits_of, replay_evictions
from infmllm_gguf._llama_cpp import llama_cpp as lc

from infmllm_gguf import H2O, ContextFullError, InfMLLM, KVPolicy, Llama, Recall
from infmllm_gguf import _native as N
from infmllm_gguf.kv import KVCache, NativeError, decode
from infmllm_gguf.policies import make_policy
from infmllm_gguf.vision import ImagePart

N_EMBD = 64
N_LAYER = 2
N_HEAD, N_HEAD_KV, N_FF = 4, 2, 128  # the attention models: GQA, 2 query heads per KV head
N_KV = N_EMBD // N_HEAD * N_HEAD_KV
N_THREADS = 1  # models this small decode in microseconds; more threads only wait on each other


@pytest.fixture(scope="module")
def tokenizer_fields(model_path: str) -> list[gguf.ReaderField]:
    """The real model's tokenizer.ggml.* fields: llama.cpp only loads a model with a valid vocab."""
    reader = gguf.GGUFReader(model_path)
    return [field for name, field in reader.fields.items() if name.startswith("tokenizer.ggml.")]


def _n_vocab(tokenizer: list[gguf.ReaderField]) -> int:
    return next(len(field.data) for field in tokenizer if field.name == "tokenizer.ggml.tokens")


def _write_gguf(
    path: Path, arch: str, tensors: dict[str, np.ndarray], write_kv: Callable[[gguf.GGUFWriter], None]
) -> str:
    """A GGUF of `tensors` (numpy, i.e. reversed ggml, order); write_kv adds its metadata."""
    writer = gguf.GGUFWriter(str(path), arch)
    write_kv(writer)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def _model_kv(
    tokenizer: list[gguf.ReaderField], hparams: dict[str, Any]
) -> Callable[[gguf.GGUFWriter], None]:
    """A text model's metadata: the real tokenizer's fields, and hparams, which maps a
    GGUFWriter add_* method to its argument."""

    def write(writer: gguf.GGUFWriter) -> None:
        for field in tokenizer:
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type)
        for method, value in hparams.items():
            getattr(writer, method)(value)

    return write


def _random(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)


def _ones(n: int) -> np.ndarray:
    return np.ones(n, np.float32)


def _write_tiny(
    path: Path,
    arch: str,
    tokenizer: list[gguf.ReaderField],
    rng: np.random.Generator,
    layer: Callable[[int], dict[str, np.ndarray]],
    hparams: dict[str, Any],
    top: dict[str, np.ndarray] | None = None,
    extra_kv: Callable[[gguf.GGUFWriter], None] | None = None,
) -> str:
    """An N_LAYER-model of width N_EMBD: embeddings, output norm (and `top`), `layer(i)`'s
    tensors per block; `extra_kv` writes metadata that hparams' add_* methods cannot."""
    tensors = {
        "token_embd.weight": _random(rng, _n_vocab(tokenizer), N_EMBD),
        "output_norm.weight": _ones(N_EMBD),
    } | (top or {})
    for i in range(N_LAYER):
        tensors |= layer(i)
    shape = {"add_context_length": 1024, "add_embedding_length": N_EMBD, "add_block_count": N_LAYER}
    write_kv = _model_kv(tokenizer, {**shape, **hparams})

    def write_all(writer: gguf.GGUFWriter) -> None:
        write_kv(writer)
        if extra_kv is not None:
            extra_kv(writer)

    return _write_gguf(path, arch, tensors, write_all)


# the attention models' shared metadata (GQA; RMS norms)
ATTENTION_HPARAMS = {
    "add_feed_forward_length": N_FF,
    "add_head_count": N_HEAD,
    "add_head_count_kv": N_HEAD_KV,
    "add_layer_norm_rms_eps": 1e-6,
}


def _attention_block(rng: np.random.Generator, i: int, qkv_bias: bool = False) -> dict[str, np.ndarray]:
    """Block i of a llama-like transformer: norms, Q/K/V/output (biases optional), a gated FFN."""
    block = {
        f"blk.{i}.attn_norm.weight": _ones(N_EMBD),
        f"blk.{i}.attn_q.weight": _random(rng, N_EMBD, N_EMBD),
        f"blk.{i}.attn_k.weight": _random(rng, N_KV, N_EMBD),
        f"blk.{i}.attn_v.weight": _random(rng, N_KV, N_EMBD),
        f"blk.{i}.attn_output.weight": _random(rng, N_EMBD, N_EMBD),
        f"blk.{i}.ffn_norm.weight": _ones(N_EMBD),
        f"blk.{i}.ffn_gate.weight": _random(rng, N_FF, N_EMBD),
        f"blk.{i}.ffn_up.weight": _random(rng, N_FF, N_EMBD),
        f"blk.{i}.ffn_down.weight": _random(rng, N_EMBD, N_FF),
    }
    if qkv_bias:
        for name, width in (("q", N_EMBD), ("k", N_KV), ("v", N_KV)):
            block[f"blk.{i}.attn_{name}.bias"] = _random(rng, width)
    return block


@pytest.fixture(scope="module")
def mrope_gguf(tmp_path_factory: pytest.TempPathFactory, tokenizer_fields: list[gguf.ReaderField]) -> str:
    """A 2-layer qwen2vl (M-RoPE, GQA, q/k/v biases)."""
    rng = np.random.default_rng(0)

    def layer(i: int) -> dict[str, np.ndarray]:
        return _attention_block(rng, i, qkv_bias=True)

    hparams = ATTENTION_HPARAMS | {
        "add_rope_freq_base": 10000.0,
        # half the head dim, split temporal/height/width/extra like Qwen2-VL's [16, 24, 24, 0] of 64
        "add_rope_dimension_sections": [2, 3, 3, 0],
    }
    path = tmp_path_factory.mktemp("gguf") / "qwen2vl.gguf"
    return _write_tiny(path, "qwen2vl", tokenizer_fields, rng, layer, hparams)


def _tower_kv(
    projector: str, n_v: int, n_ff: int, extra: dict[str, int]
) -> Callable[[gguf.GGUFWriter], None]:
    """A 1-layer, 1-head CLIP-format vision tower's metadata: 56x56 pictures of 14x14 patches,
    width n_v, projected to the tiny models' N_EMBD; `extra` adds clip.vision.* integers."""

    def write(w: gguf.GGUFWriter) -> None:
        w.add_bool("clip.has_vision_encoder", True)
        w.add_string("clip.projector_type", projector)
        ints = {"image_size": 56, "patch_size": 14, "embedding_length": n_v, "feed_forward_length": n_ff}
        ints |= {"block_count": 1, "projection_dim": N_EMBD, "attention.head_count": 1} | extra
        for key, value in ints.items():
            w.add_uint32(f"clip.vision.{key}", value)
        w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
        w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
        w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])

    return write


def _vit_block(rng: np.random.Generator, n_v: int, n_ff: int) -> dict[str, np.ndarray]:
    """Block 0 of a CLIP-format vision tower: layer norms, attention and FFN, all with biases."""
    shapes = {"ln1": (n_v,), "ln2": (n_v,), "ffn_up": (n_ff, n_v), "ffn_down": (n_v, n_ff)}
    shapes |= {name: (n_v, n_v) for name in ("attn_q", "attn_k", "attn_v", "attn_out")}
    block = {}
    for name, shape in shapes.items():
        block[f"v.blk.0.{name}.weight"] = _ones(n_v) if name.startswith("ln") else _random(rng, *shape)
        block[f"v.blk.0.{name}.bias"] = _random(rng, shape[0])
    return block


@pytest.fixture(scope="module")
def mrope_mmproj(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 1-layer random Qwen2-VL vision tower for the qwen2vl model: its images take M-RoPE
    positions (t, y, x) and fewer positions than tokens."""
    rng = np.random.default_rng(3)
    n_v, n_ff, n_hidden = 16, 32, 64

    tensors = {
        "v.patch_embd.weight": _random(rng, n_v, 3, 14, 14).astype(np.float16),
        "v.patch_embd.weight.1": _random(rng, n_v, 3, 14, 14).astype(np.float16),
        "mm.0.weight": _random(rng, n_hidden, 4 * n_v),
        "mm.0.bias": _random(rng, n_hidden),
        "mm.2.weight": _random(rng, N_EMBD, n_hidden),
        "mm.2.bias": _random(rng, N_EMBD),
    } | _vit_block(rng, n_v, n_ff)
    path = tmp_path_factory.mktemp("gguf") / "mmproj-qwen2vl.gguf"
    return _write_gguf(path, "clip", tensors, _tower_kv("qwen2vl_merger", n_v, n_ff, {}))


@pytest.fixture(scope="module")
def gemma3_mmproj(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 1-layer random Gemma 3 (SigLIP) vision tower for the gemma2-shaped model: 4x4 patches
    average-pooled 2x2 into 4 image tokens, which mtmd decodes non-causally."""
    rng = np.random.default_rng(4)
    n_v, n_ff = 16, 32

    tensors = {
        "v.patch_embd.weight": _random(rng, n_v, 3, 14, 14).astype(np.float16),
        "v.patch_embd.bias": _random(rng, n_v),
        "v.position_embd.weight": _random(rng, 16, n_v),
        "v.post_ln.weight": _ones(n_v),
        "v.post_ln.bias": _random(rng, n_v),
        "mm.soft_emb_norm.weight": _ones(n_v),
        "mm.input_projection.weight": _random(rng, n_v, N_EMBD),
    } | _vit_block(rng, n_v, n_ff)
    path = tmp_path_factory.mktemp("gguf") / "mmproj-gemma3.gguf"
    return _write_gguf(path, "clip", tensors, _tower_kv("gemma3", n_v, n_ff, {"projector.scale_factor": 2}))


@pytest.fixture(scope="module")
def mamba_gguf(tmp_path_factory: pytest.TempPathFactory, tokenizer_fields: list[gguf.ReaderField]) -> str:
    """A 2-layer mamba (recurrent; llama.cpp only supports d_inner = 2 * n_embd)."""
    d_inner, d_state, d_conv, dt_rank = 2 * N_EMBD, 16, 4, 4
    rng = np.random.default_rng(1)

    def layer(i: int) -> dict[str, np.ndarray]:
        return {
            f"blk.{i}.attn_norm.weight": _ones(N_EMBD),
            f"blk.{i}.ssm_in.weight": _random(rng, 2 * d_inner, N_EMBD),
            f"blk.{i}.ssm_conv1d.weight": _random(rng, d_inner, d_conv),
            f"blk.{i}.ssm_conv1d.bias": _random(rng, d_inner),
            f"blk.{i}.ssm_x.weight": _random(rng, dt_rank + 2 * d_state, d_inner),
            f"blk.{i}.ssm_dt.weight": _random(rng, d_inner, dt_rank),
            f"blk.{i}.ssm_dt.bias": _random(rng, d_inner),
            f"blk.{i}.ssm_a": -np.abs(_random(rng, d_inner, d_state)) - 0.5,  # A < 0: a decaying state
            f"blk.{i}.ssm_d": _ones(d_inner),
            f"blk.{i}.ssm_out.weight": _random(rng, N_EMBD, d_inner),
        }

    hparams = {
        "add_layer_norm_rms_eps": 1e-5,
        "add_ssm_conv_kernel": d_conv,
        "add_ssm_inner_size": d_inner,
        "add_ssm_state_size": d_state,
        "add_ssm_time_step_rank": dt_rank,
    }
    path = tmp_path_factory.mktemp("gguf") / "mamba.gguf"
    return _write_tiny(path, "mamba", tokenizer_fields, rng, layer, hparams)


@pytest.fixture(scope="module")
def iswa_gguf(tmp_path_factory: pytest.TempPathFactory, tokenizer_fields: list[gguf.ReaderField]) -> str:
    """A 2-layer gemma2: sliding-window and full attention layers alternate (an iSWA cache)."""
    rng = np.random.default_rng(2)

    def layer(i: int) -> dict[str, np.ndarray]:
        return _gemma_block(rng, i)

    hparams = ATTENTION_HPARAMS | {
        "add_attn_logit_softcapping": 50.0,
        "add_final_logit_softcapping": 30.0,
        "add_sliding_window": 32,
    }
    path = tmp_path_factory.mktemp("gguf") / "gemma2.gguf"
    return _write_tiny(path, "gemma2", tokenizer_fields, rng, layer, hparams)


def _gemma_block(rng: np.random.Generator, i: int, qk_norm: bool = False) -> dict[str, np.ndarray]:
    """Block i of a Gemma: norms after each sublayer too; Q and K 8x larger than the other
    weights, so that attention is sharp and a key at a wrong position shows in the logits."""
    block = _attention_block(rng, i) | {
        f"blk.{i}.post_attention_norm.weight": _ones(N_EMBD),
        f"blk.{i}.post_ffw_norm.weight": _ones(N_EMBD),
    }
    block[f"blk.{i}.attn_q.weight"] *= 8
    block[f"blk.{i}.attn_k.weight"] *= 8
    if qk_norm:  # Gemma 3: per-head RMS norms of queries and keys
        block |= {f"blk.{i}.attn_{x}_norm.weight": _ones(N_EMBD // N_HEAD) for x in "qk"}
    return block


@pytest.fixture(scope="module")
def gemma3_gguf(tmp_path_factory: pytest.TempPathFactory, tokenizer_fields: list[gguf.ReaderField]) -> str:
    """A 2-layer gemma3 (Gemma 3 1B's shape): a sliding-window layer, then a full-attention one."""
    rng = np.random.default_rng(6)

    def layer(i: int) -> dict[str, np.ndarray]:
        return _gemma_block(rng, i, qk_norm=True)

    hparams = ATTENTION_HPARAMS | {
        "add_sliding_window": 32,
    }
    path = tmp_path_factory.mktemp("gguf") / "gemma3.gguf"

    def pattern(writer: gguf.GGUFWriter) -> None:
        writer.add_array("gemma3.attention.sliding_window_pattern", [True, False])

    return _write_tiny(path, "gemma3", tokenizer_fields, rng, layer, hparams, extra_kv=pattern)


def _plain_layer(rng: np.random.Generator, arch: str, i: int) -> dict[str, np.ndarray]:
    """Block i of a tiny 1-D RoPE model of `arch` (see TINY_ARCHS)."""
    if arch == "gptneox":  # Pythia: fused QKV, biases and LayerNorms everywhere, no GQA
        widths = {"attn_qkv": (3 * N_EMBD, N_EMBD), "attn_output": (N_EMBD, N_EMBD)}
        widths |= {"ffn_up": (N_FF, N_EMBD), "ffn_down": (N_EMBD, N_FF)}
        block = {}
        for name, shape in widths.items():
            block[f"blk.{i}.{name}.weight"] = _random(rng, *shape)
            block[f"blk.{i}.{name}.bias"] = _random(rng, shape[0])
        for norm in ("attn_norm", "ffn_norm"):
            block[f"blk.{i}.{norm}.weight"] = _ones(N_EMBD)
            block[f"blk.{i}.{norm}.bias"] = _random(rng, N_EMBD)
        return block
    block = _attention_block(rng, i, qkv_bias=arch == "qwen2")
    if arch == "qwen3":  # per-head RMS norms of queries and keys
        head_dim = N_EMBD // N_HEAD
        block |= {
            f"blk.{i}.attn_q_norm.weight": _ones(head_dim),
            f"blk.{i}.attn_k_norm.weight": _ones(head_dim),
        }
    if arch == "phi3":  # gate and up fused into one matrix
        del block[f"blk.{i}.ffn_gate.weight"]
        block[f"blk.{i}.ffn_up.weight"] = _random(rng, 2 * N_FF, N_EMBD)
    return block


# name: (llama.cpp architecture, its RoPE, extra hparams).  Mistral and Llama 3 GGUFs are "llama".
TINY_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3": ("llama", {"add_rope_freq_base": 500000.0}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "phi3": ("phi3", {}),
    # partial rotary: RoPE on 4 of each head's 16 dims, as Pythia's rotary_pct 0.25; no GQA
    "pythia": (
        "gptneox",
        {
            "add_rope_dimension_count": 4,
            "add_layer_norm_eps": 1e-5,
            "add_head_count_kv": N_HEAD,
            "add_parallel_residual": True,
        },
    ),
}


@pytest.fixture(scope="module", params=list(TINY_ARCHS))
def plain_gguf(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tokenizer_fields: list[gguf.ReaderField],
) -> str:
    """A 2-layer random model of each 1-D RoPE family in TINY_ARCHS."""
    arch, extra = TINY_ARCHS[request.param]
    rng = np.random.default_rng(5)
    hparams = ATTENTION_HPARAMS | {"add_rope_freq_base": 10000.0} | extra  # gptneox ignores the RMS eps
    path = tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf"
    top = {}
    if arch == "gptneox":  # an output matrix and a biased output norm of its own
        top = {
            "output.weight": _random(rng, _n_vocab(tokenizer_fields), N_EMBD),
            "output_norm.bias": _ones(N_EMBD),
        }
    return _write_tiny(path, arch, tokenizer_fields, rng, lambda i: _plain_layer(rng, arch, i), hparams, top)


@pytest.fixture
def make_tiny_ctx(model, open_gguf) -> Callable[..., tuple[Any, Any]]:
    """Factory: (model, context) on a GGUF, on the CPU, freed after the test.  Requesting
    conftest's `model` initialises the backend and silences llama.cpp's log the same way as the
    other native tests."""
    return functools.partial(open_gguf, n_threads=N_THREADS)


ARCHS = [("mrope_gguf", "M-RoPE"), ("mamba_gguf", "recurrent")]


@pytest.mark.parametrize(("gguf_fixture", "reason"), ARCHS, ids=["mrope", "mamba"])
@pytest.mark.parametrize("policy", ["infmllm", "window"])
def test_evicting_policy_is_refused_with_the_reason(
    request: pytest.FixtureRequest, gguf_fixture: str, reason: str, policy: str
) -> None:
    """'window' scores nothing, so the architecture check, not a scoring refusal, must catch it."""
    path = request.getfixturevalue(gguf_fixture)
    with pytest.raises(ValueError, match=reason):
        Llama(path, n_ctx=256, kv_policy=policy, n_threads=N_THREADS)


@pytest.mark.parametrize(
    "gguf_fixture", ["mrope_gguf", "mamba_gguf", "iswa_gguf"], ids=["mrope", "mamba", "iswa"]
)
def test_full_cache_still_runs(request: pytest.FixtureRequest, gguf_fixture: str) -> None:
    """Refusing eviction must not refuse the model: without eviction it streams as usual."""
    llm = Llama(request.getfixturevalue(gguf_fixture), n_ctx=256, kv_policy="full", n_threads=N_THREADS)
    try:
        tokens = llm.tokenize("In the beginning God created the heaven and the earth.")
        llm.eval(tokens)
        logprobs = llm.stream_logprobs(tokens[1:5])
        assert np.isfinite(logprobs).all() and (logprobs <= 0).all()
        assert llm.kv_stats()["n_cached"] == len(tokens) + 4
    finally:
        llm.close()


def test_native_calls_on_mrope_refuse_what_needs_a_k_shift(make_tiny_ctx, mrope_gguf: str) -> None:
    """Compaction needs a K-shift and is refused; scoring and eviction are not (eviction alone
    is llama.cpp's own seq_rm).  The context decodes on after every call."""
    model, ctx = make_tiny_ctx(mrope_gguf)
    kv = KVCache(ctx)
    decode(ctx, np.arange(100, 108), np.arange(8))

    def decodes_on(pos: int) -> None:
        decode(ctx, [200 + pos], [pos])
        assert np.isfinite(logits_of(ctx, model)).all()

    kv.set_scoring(1)
    decodes_on(8)
    scores = kv.cells().scores  # one query row's softmax mass, summed over layers and heads
    assert np.all(scores >= 0) and scores.sum() == pytest.approx(N_LAYER * N_HEAD, rel=1e-4)
    kv.set_scoring(0)

    with pytest.raises(NativeError) as err:
        kv.compact()
    assert err.value.status == N.INFMLLM_ERR_UNSUPPORTED
    assert np.array_equal(kv.cells().positions, np.arange(9))
    decodes_on(9)

    assert kv.evict(np.array([2, 3])) == 2
    assert np.array_equal(kv.cells().positions, [0, 1, *range(4, 10)])
    decodes_on(10)
    with pytest.raises(NativeError) as err:
        kv.compact()  # the hole stays: nothing was renumbered
    assert err.value.status == N.INFMLLM_ERR_UNSUPPORTED
    assert np.array_equal(kv.cells().positions, [0, 1, *range(4, 11)])
    decodes_on(11)
    assert kv.evict_cells(kv.cells().cells[:2]) == 2
    assert np.array_equal(kv.cells().positions, range(4, 12))
    decodes_on(12)


def test_native_calls_on_recurrent_memory_are_refused(make_tiny_ctx, mamba_gguf: str) -> None:
    """A recurrent state has no per-token cells: every cell call is refused, and the model runs on."""
    model, ctx = make_tiny_ctx(mamba_gguf)
    kv = KVCache(ctx)
    decode(ctx, np.arange(100, 108), np.arange(8))
    kv.set_scoring(0)
    calls = {
        "set_scoring": lambda: kv.set_scoring(8),
        "n_cells": kv.n_cells,
        "cells": kv.cells,
        "evict": lambda: kv.evict(np.array([2])),
        "compact": kv.compact,
    }
    for pos, (name, call) in enumerate(calls.items(), start=8):
        with pytest.raises(NativeError) as err:
            call()
        assert err.value.status == N.INFMLLM_ERR_UNSUPPORTED, name
        decode(ctx, [200 + pos], [pos])
        assert np.isfinite(logits_of(ctx, model)).all(), name


def test_a_projector_for_another_text_model_is_refused(iswa_gguf: str, codebook_mmproj) -> None:
    """The codebook projector outputs SmolLM2's 576-wide embeddings; this model takes 64."""
    with pytest.raises(ValueError, match="n_embd"):
        Llama(iswa_gguf, n_ctx=64, kv_policy="full", mmproj_path=codebook_mmproj)


def _picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (112, 84, 3), dtype=np.uint8)


def _vlm_pair(model: str, mmproj: str) -> tuple[Llama, Llama]:
    """Two full-cache sessions of one model and projector: ours, and a fresh reference."""
    kwargs = {"n_ctx": 512, "kv_policy": "full", "mmproj_path": mmproj, "n_threads": N_THREADS}
    return Llama(model, **kwargs), Llama(model, **kwargs)


def _mtmd_reference(ref: Llama, prompt: str, image: np.ndarray) -> tuple[np.ndarray, int]:
    """llama.cpp's own way: mtmd's tokenizer and mtmd_helper_eval_chunks on a fresh context;
    (the last logits, the next position)."""
    from infmllm_gguf.vision import mt

    mctx = ref.engine.projector._ctx
    chunks = mt.mtmd_input_chunks_init()
    try:
        with ref.engine.projector.bitmap(image) as bmp:
            data = prompt.encode()
            text = mt.mtmd_input_text(data, len(data), True, True)
            bitmaps = (mt.mtmd_bitmap_p_ctypes * 1)(bmp)
            assert mt.mtmd_tokenize(mctx, chunks, ctypes.byref(text), bitmaps, 1) == 0
        n_past = lc.llama_pos(0)
        assert (
            mt.mtmd_helper_eval_chunks(mctx, ref.engine.ctx, chunks, 0, 0, 512, True, ctypes.byref(n_past))
            == 0
        )
    finally:
        mt.mtmd_input_chunks_free(chunks)
    return logits_of(ref.engine.ctx, ref.engine.model.model), n_past.value


def test_mrope_images_stream_in_a_full_cache_as_mtmd_feeds_them(mrope_gguf: str, mrope_mmproj: str) -> None:
    """An M-RoPE model's image takes 2-D positions and fewer positions than cells; after it,
    text goes on from mtmd's position count.  The logits must equal those of llama.cpp's own
    mtmd helper on a fresh context given the same prompt."""
    llm, ref = _vlm_pair(mrope_gguf, mrope_mmproj)
    try:
        image = _picture(0)
        prompt = f"A picture: {ref.engine.projector.marker} and what it shows"
        parts = llm.engine.projector.tokenize(prompt, [image], add_special=True)
        (picture,) = [p for p in parts if not hasattr(p, "tokens")]
        assert picture.n_pos < picture.n_tokens  # the merger's grid: max(w, h) positions, w * h cells
        llm.session.feed_parts(parts)
        n_cells = sum(len(p) for p in parts)
        assert llm.n_cached == n_cells
        assert llm.session.stream.next_pos == n_cells - picture.n_tokens + picture.n_pos
        llm.check_invariants()
        expected, n_past = _mtmd_reference(ref, prompt, image)
        assert n_past == llm.session.stream.next_pos
        np.testing.assert_allclose(llm.session.stream.last_logits, expected, rtol=1e-4, atol=1e-4)

        # text goes on; a rewind to before the image gives its positions back, and feeding it
        # again gives the same logits
        llm.feed(" and more text", add_bos=False)
        assert llm.rewind(len(parts[0]))
        assert llm.session.stream.next_pos == llm.n_cached == len(parts[0])
        llm.check_invariants()
        llm.session.feed_parts(parts[1:])
        np.testing.assert_allclose(llm.session.stream.last_logits, expected, rtol=1e-4, atol=1e-4)
        assert llm.n_streamed == n_cells
    finally:
        llm.close()
        ref.close()


def test_gemma3_images_attend_non_causally_in_a_full_iswa_cache(iswa_gguf: str, gemma3_mmproj: str) -> None:
    """A Gemma 3 projector's image attends to itself both ways (mtmd says non-causal) and the
    model's cache is iSWA: under 'full' it streams, with the logits of llama.cpp's own helper."""
    llm, ref = _vlm_pair(iswa_gguf, gemma3_mmproj)
    try:
        image = _picture(1)
        prompt = f"A picture: {ref.engine.projector.marker} and what it shows"
        parts = llm.engine.projector.tokenize(prompt, [image], add_special=True)
        assert any(getattr(p, "non_causal", False) for p in parts)
        llm.session.feed_parts(parts)
        expected, n_past = _mtmd_reference(ref, prompt, image)
        assert n_past == llm.n_cached == sum(len(p) for p in parts)
        np.testing.assert_allclose(llm.session.stream.last_logits, expected, rtol=1e-4, atol=1e-4)
        llm.feed(" and more text", add_bos=False)
        assert np.isfinite(llm.session.stream.last_logits).all()
    finally:
        llm.close()
        ref.close()


def test_mrope_eviction_needs_reposition_false_and_no_recall(mrope_gguf: str, mrope_mmproj: str) -> None:
    with pytest.raises(ValueError, match="reposition=False"):
        Llama(mrope_gguf, n_ctx=512, kv_policy="infmllm", mmproj_path=mrope_mmproj, n_threads=N_THREADS)
    with pytest.raises(ValueError, match="without recall"):
        Llama(mrope_gguf, n_ctx=512, kv_policy=InfMLLM(budget=128, reposition=False), recall=Recall())


def _mrope_session(mrope_gguf: str, mrope_mmproj: str | None, policy: KVPolicy) -> Llama:
    return Llama(
        mrope_gguf, n_ctx=256, kv_policy=policy, mmproj_path=mrope_mmproj, n_threads=N_THREADS, debug=True
    )


@pytest.mark.parametrize("name", ["streamingllm", "infmllm", "h2o"])
def test_mrope_text_evicts_without_repositioning_like_a_replay(
    mrope_gguf: str, name: str, make_tiny_ctx
) -> None:
    """Kept cells stay where they were decoded; the logits equal those of a context never
    compacted, from which llama.cpp's own seq_rm removed the same positions before each batch."""
    llm = _mrope_session(mrope_gguf, None, make_policy(name, 96, reposition=False))
    model, ref = make_tiny_ctx(mrope_gguf, n_ctx=1024, n_batch=512)  # ubatches as the stream's
    tokens = np.resize(np.arange(300, 700), 900)
    replay_evictions(llm, ref, tokens)
    assert llm.kv_stats()["evictions"] >= 20 and llm.kv_stats()["max_pos"] == len(tokens) - 1
    np.testing.assert_allclose(llm.session.stream.last_logits, logits_of(ref, model), rtol=1e-4, atol=1e-4)
    llm.close()


def test_mrope_image_cells_evicted_together_equal_llama_cpps_seq_rm(
    mrope_gguf: str, mrope_mmproj: str
) -> None:
    """An image's cells share one position; evicted by cell, they leave the context as
    llama.cpp's seq_rm of that position leaves it."""
    llm, ref = _vlm_pair(mrope_gguf, mrope_mmproj)
    try:
        for session in (llm, ref):
            session.feed("Before the picture")
            session.feed_image(_picture(2))
            session.feed(" after it", add_bos=False)
        view = llm.session.stream.view()
        image = view.is_image
        p0 = int(view.positions[image][0])
        assert np.all(view.positions[image] == p0) and image.sum() == 12
        llm.session.stream.kv.evict_cells(view.cells[image])
        assert lc.llama_memory_seq_rm(lc.llama_get_memory(ref.engine.ctx), 0, p0, p0 + 1)
        logits = []
        for session in (llm, ref):
            decode(session.engine.ctx, [42], [session.session.stream.next_pos])
            logits.append(logits_of(session.engine.ctx, session.engine.model.model))
        np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    finally:
        llm.close()
        ref.close()


@pytest.mark.parametrize("name", ["streamingllm", "infmllm"])
def test_mrope_video_streams_far_past_the_cache_without_repositioning(
    mrope_gguf: str, mrope_mmproj: str, name: str
) -> None:
    """Frames and captions through a small cache: images advance positions by their grid side,
    not their cell count, partly evicted images included; the invariants hold after every step
    (debug), and the stream ends cleanly at the trained context (1024 positions)."""
    llm = _mrope_session(mrope_gguf, mrope_mmproj, make_policy(name, 64, reposition=False))
    try:
        frames = 0
        while True:
            before, streamed = llm.session.stream.next_pos, llm.n_streamed
            try:
                llm.feed_image(_picture(frames))
                # 12 cells (a 4 x 3 grid of merged patches) take 4 positions, its longer side
                assert (llm.n_streamed - streamed) - (llm.session.stream.next_pos - before) == 12 - 4
                frames += 1
                before, streamed = llm.session.stream.next_pos, llm.n_streamed
                llm.feed(f" frame {frames}.", add_bos=False)
            except ContextFullError as exc:
                assert "trained for 1024" in str(exc)
                assert (llm.session.stream.next_pos, llm.n_streamed) == (before, streamed)  # nothing fed
                break
        stats = llm.kv_stats()
        assert stats["images"] == frames >= 40 and stats["evictions"] >= 20
        assert stats["n_cached"] <= llm.policy.capacity and stats["max_pos"] > 1000
        assert stats["n_streamed"] - stats["max_pos"] > 8 * 40  # the cells images took beyond positions
        assert np.isfinite(llm.session.stream.last_logits).all()
        llm.reset()
        llm.feed("Again from the start")
        assert llm.kv_stats()["max_pos"] == llm.n_cached - 1
    finally:
        llm.close()


def test_an_mrope_image_larger_than_a_batch_is_refused(mrope_gguf: str, mrope_mmproj: str) -> None:
    """Its cells share one position, so a half-decoded image could not be taken back: it must
    fit in one batch, and the stream is unchanged when it does not."""
    llm = Llama(
        mrope_gguf, n_ctx=256, n_batch=8, kv_policy="full", mmproj_path=mrope_mmproj, n_threads=N_THREADS
    )
    try:
        llm.feed("Before the picture")
        before = llm.history.copy()
        with pytest.raises(ValueError, match="n_batch >= 12"):
            llm.feed_image(_picture(1))
        assert np.array_equal(llm.history, before) and llm.n_cached == len(before)
        llm.check_invariants()
    finally:
        llm.close()


def test_compaction_of_each_family_rotates_keys_like_fresh_positions(make_tiny_ctx, plain_gguf: str) -> None:
    """The K-shift of each RoPE flavour (normal, NeoX, partial rotary): kept tokens that never
    saw the evicted ones (another sequence) hold, once compacted, the keys of every layer that
    a fresh context computes for them at 0..n-1 (within F16 rounding; unshifted they are off by
    the rotation of 40 positions), and give its next logits."""
    model, ctx = make_tiny_ctx(plain_gguf, n_ctx=256, n_seq_max=2)
    kv = KVCache(ctx)
    tokens = np.arange(1000, 1101)
    decode(ctx, tokens[:40], np.arange(40), seq_id=1)
    decode(ctx, tokens[40:100], np.arange(40, 100))
    assert kv.evict(np.arange(40), seq_id=1) == 40
    assert kv.compact() == 60 and kv.update()
    _, fresh = make_tiny_ctx(plain_gguf, n_ctx=256)
    decode(fresh, tokens[40:100], np.arange(60))
    shifted, expected = f16_keys(kv, 60), f16_keys(KVCache(fresh), 60)
    scale = np.abs(expected).max()
    assert np.abs(shifted - expected).max() < 4e-3 * scale
    unshifted = make_tiny_ctx(plain_gguf, n_ctx=256)[1]
    decode(unshifted, tokens[40:100], np.arange(40, 100))
    # the check can fail: the same keys left at 40..99
    assert np.abs(f16_keys(KVCache(unshifted), 60, first=40) - expected).max() > 0.1 * scale
    decode(ctx, tokens[100:], [60])
    decode(fresh, tokens[100:], [60])
    np.testing.assert_allclose(logits_of(ctx, model), logits_of(fresh, model), rtol=5e-3, atol=5e-3)


def test_host_rotation_of_each_family_moves_keys_like_a_k_shift(make_tiny_ctx, plain_gguf: str) -> None:
    """`KVCache.rope().rotate` (what the recall tier's attention score moves stored keys with)
    turns keys computed at 40..99 into those a fresh context computes at 0..59, every layer,
    for each RoPE flavour (normal, NeoX, partial rotary, another base); the check can fail:
    rotated the other way they are off."""
    tokens = np.arange(1000, 1060)
    model, at40 = make_tiny_ctx(plain_gguf, n_ctx=256)
    decode(at40, tokens, np.arange(40, 100))
    _, at0 = make_tiny_ctx(plain_gguf, n_ctx=256)
    decode(at0, tokens, np.arange(60))
    kv = KVCache(at40)
    rope = kv.rope()
    head_dim = kv.layers()[0].head_dim
    assert rope.rotates and 0 < rope.n_rot <= head_dim
    keys = f16_keys(kv, 60, first=40)  # [layer, cell, dim]
    expected = f16_keys(KVCache(at0), 60)
    shape = (keys.shape[0], 60, -1, head_dim)
    moved = rope.rotate(keys.reshape(shape).transpose(1, 0, 2, 3), np.full(60, -40))
    moved = moved.transpose(1, 0, 2, 3).reshape(keys.shape)
    scale = np.abs(expected).max()
    assert np.abs(moved - expected).max() < 4e-3 * scale
    wrong = rope.rotate(keys.reshape(shape).transpose(1, 0, 2, 3), np.full(60, 40))
    assert np.abs(wrong.transpose(1, 0, 2, 3).reshape(keys.shape) - expected).max() > 0.1 * scale


def test_each_family_streams_with_eviction_both_ways(make_tiny_ctx, plain_gguf: str) -> None:
    """InfMLLM re-positioning through 15+ evictions, with a recall tier, keeps its invariants
    (debug) and brings pages back for a completion; without re-positioning the logits equal a
    replay of the evictions with llama.cpp's own seq_rm."""
    tokens = np.resize(np.arange(300, 800), 600)
    llm = Llama(
        plain_gguf,
        n_ctx=256,
        kv_policy=InfMLLM(budget=64, chunk=16),
        recall=Recall(),
        n_threads=N_THREADS,
        debug=True,
    )
    llm.eval(tokens)
    assert llm.kv_stats()["evictions"] >= 15 and np.isfinite(llm.session.stream.last_logits).all()
    llm.eval(tokens[100:120])  # an early passage again: a turn whose queries find its pages
    llm.generate_text(max_tokens=4)
    stats = llm.kv_stats()
    assert stats["pages_stored"] > 0 and stats["recalls"] == 1 and stats["n_recalled"] > 0
    llm.close()
    policy = InfMLLM(budget=64, chunk=16, reposition=False)
    llm = Llama(plain_gguf, n_ctx=256, kv_policy=policy, n_threads=N_THREADS, debug=True)
    model, ref = make_tiny_ctx(plain_gguf, n_ctx=1024, n_batch=512)
    replay_evictions(llm, ref, tokens)
    np.testing.assert_array_equal(llm.session.stream.last_logits, logits_of(ref, model))
    llm.close()


# --- iSWA: a full-attention cache and a sliding-window cache --------------------------------

ISWA = ["iswa_gguf", "gemma3_gguf"]


@pytest.mark.parametrize("swa_full", [True, False], ids=["swa-full", "swa-small"])
@pytest.mark.parametrize("gguf_fixture", ISWA, ids=["gemma2", "gemma3"])
def test_iswa_evicts_from_both_halves_like_a_replay(
    request: pytest.FixtureRequest, make_tiny_ctx, gguf_fixture: str, swa_full: bool
) -> None:
    """Without re-positioning, the logits equal those of a context from which llama.cpp's own
    seq_rm removed the same positions (from both halves) before each batch, whether the
    sliding-window half is full-size or llama.cpp reuses its cells past the window."""
    path = request.getfixturevalue(gguf_fixture)
    policy = InfMLLM(budget=64, chunk=16, reposition=False)
    llm = Llama(path, n_ctx=256, kv_policy=policy, swa_full=swa_full, n_threads=N_THREADS, debug=True)
    model, ref = make_tiny_ctx(path, n_ctx=1024, n_batch=512, swa_full=swa_full)
    replay_evictions(llm, ref, np.resize(np.arange(300, 800), 600))
    assert llm.kv_stats()["evictions"] >= 20
    np.testing.assert_array_equal(llm.session.stream.last_logits, logits_of(ref, model))
    llm.close()


@pytest.mark.parametrize("gguf_fixture", ISWA, ids=["gemma2", "gemma3"])
def test_iswa_compaction_closes_a_gap_in_both_halves(
    request: pytest.FixtureRequest, make_tiny_ctx, gguf_fixture: str
) -> None:
    """A gap opened by llama.cpp's own seq_add (positions 20..59 moved to 60..99, both halves
    re-rotated by it) is closed by compaction in both halves: the next logits are those of a
    fresh context that decoded the tokens at 0..59.  With the gap left open they are not (the
    sliding window then sees another set of tokens): the check can fail."""
    path = request.getfixturevalue(gguf_fixture)
    tokens = np.arange(1000, 1061)
    model, fresh = make_tiny_ctx(path)
    decode(fresh, tokens, np.arange(61))
    expected = logits_of(fresh, model)
    results = []
    for close in (True, False):
        _, ctx = make_tiny_ctx(path)
        kv = KVCache(ctx)
        decode(ctx, tokens[:60], np.arange(60))
        mem = lc.llama_get_memory(ctx)
        lc.llama_memory_seq_add(mem, 0, 20, 60, 40)
        assert lc.llama_memory_seq_pos_max(mem, 0) == 99
        if close:
            assert kv.compact() == 60 and kv.update()
            assert (lc.llama_memory_seq_pos_min(mem, 0), lc.llama_memory_seq_pos_max(mem, 0)) == (0, 59)
        decode(ctx, tokens[60:], [60 if close else 100])
        results.append(np.abs(logits_of(ctx, model) - expected).max())
    assert results[0] < 5e-3 < 0.1 < results[1], results


@pytest.mark.parametrize("name", ["infmllm", "h2o", "snapkv", "streamingllm"])
@pytest.mark.parametrize("gguf_fixture", ISWA, ids=["gemma2", "gemma3"])
def test_iswa_streams_with_every_policy(request: pytest.FixtureRequest, gguf_fixture: str, name: str) -> None:
    """Scored from the full-attention layers, evicted and compacted in both halves through 30+
    rounds: the invariants hold after each (debug), and both halves end at the same positions."""
    path = request.getfixturevalue(gguf_fixture)
    llm = Llama(
        path, n_ctx=256, kv_policy=make_policy(name, 64), swa_full=False, n_threads=N_THREADS, debug=True
    )
    llm.eval(np.resize(np.arange(300, 800), 600))
    stats = llm.kv_stats()
    assert stats["evictions"] >= 30 and stats["max_pos"] == stats["n_cached"] - 1
    mem = lc.llama_get_memory(llm.engine.ctx)
    assert lc.llama_memory_seq_pos_max(mem, 0) == stats["n_cached"] - 1  # the sliding-window half's
    if name == "h2o":  # scores every decode: the latest were read back from the full-attention layer
        scores = llm.session.stream.view().scores
        rows = (600 - llm.policy.capacity) % llm.policy.chunk or llm.policy.chunk  # the last decode's
        assert np.all(scores >= 0) and scores.sum() == pytest.approx(N_HEAD * rows, rel=1e-4)
    assert np.isfinite(llm.session.stream.last_logits).all()
    llm.close()


def test_iswa_refuses_the_recall_tier_and_the_row_calls(make_tiny_ctx, iswa_gguf: str) -> None:
    """The recall tier copies rows of a plain cache: refused at creation with the reason; the
    native row calls and query capture refuse an iSWA cache, and the context decodes on."""
    with pytest.raises(ValueError, match="without recall"):
        Llama(iswa_gguf, n_ctx=256, kv_policy=InfMLLM(budget=64), recall=Recall(), n_threads=N_THREADS)
    model, ctx = make_tiny_ctx(iswa_gguf)
    kv = KVCache(ctx)
    decode(ctx, np.arange(100, 108), np.arange(8))
    calls = {
        "layers": kv.layers,
        "read_rows": lambda: kv.read_rows(np.arange(2), 1, 1),
        "arrange": lambda: kv.arrange(kv.cells().cells),
        "place": lambda: kv.place(kv.cells().cells),
        "query_capture": lambda: kv.set_query_capture(4),
    }
    for pos, (name, call) in enumerate(calls.items(), start=8):
        with pytest.raises(NativeError) as err:
            call()
        assert err.value.status == N.INFMLLM_ERR_UNSUPPORTED, name
        decode(ctx, [200 + pos], [pos])
        assert np.isfinite(logits_of(ctx, model)).all(), name
    assert kv.head() >= 0 and kv.n_cells() == 13


def test_gemma3_images_stream_with_eviction_and_are_scored_both_ways(
    iswa_gguf: str, gemma3_mmproj: str
) -> None:
    """Non-causal images through an evicting iSWA stream: pictures and captions far past the
    cache, invariants after every step (debug).  Scored with every query row (H2O), an image's
    last cell receives attention from the image's other rows too, as its non-causal block
    attends: far more than its causal score, where only its own row reaches it."""
    kwargs = {"n_ctx": 256, "mmproj_path": gemma3_mmproj, "n_threads": N_THREADS, "debug": True}
    llm = Llama(iswa_gguf, kv_policy=InfMLLM(budget=64, chunk=16), **kwargs)
    for frame in range(30):
        llm.feed_image(_picture(frame))
        llm.feed(f" frame {frame}.", add_bos=False)
    stats = llm.kv_stats()
    assert stats["images"] == 30 and stats["evictions"] >= 10 and stats["n_cached"] <= llm.policy.capacity
    llm.close()

    last_image_cell = []
    for causal in (False, True):
        llm = Llama(iswa_gguf, kv_policy=H2O(budget=128), **kwargs)
        llm.feed("A picture:")
        parts = llm.engine.projector.tokenize(llm.engine.projector.marker, [_picture(0)], add_special=False)
        (part,) = [p for p in parts if isinstance(p, ImagePart)]
        llm.session.stream.feed_embeddings(llm.engine.projector.encode(part), part.key, non_causal=not causal)
        view = llm.session.stream.view()
        last_image_cell.append(float(view.scores[np.flatnonzero(view.is_image)[-1]]))
        llm.close()
    assert last_image_cell[0] > 2 * last_image_cell[1]


def test_iswa_session_saved_after_evictions_continues(gemma3_gguf: str) -> None:
    """llama.cpp saves and restores both halves; the restored cells land where it finds room
    (putting them back on their own cells is for plain caches), so later log-probs agree to
    float rounding rather than bit for bit."""
    kwargs = {"n_ctx": 256, "kv_policy": InfMLLM(budget=64, chunk=16), "n_threads": N_THREADS, "debug": True}
    a, b = Llama(gemma3_gguf, **kwargs), Llama(gemma3_gguf, **kwargs)
    a.eval(np.resize(np.arange(300, 800), 500))
    b.load_state(a.save_state())
    assert a.kv_stats() == b.kv_stats()
    later = np.arange(900, 1000)
    np.testing.assert_allclose(a.stream_logprobs(later), b.stream_logprobs(later), atol=2e-3)
    a.close()
    b.close()
