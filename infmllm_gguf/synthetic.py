"""Random-weight GGUFs of a real model's shape: speed and memory can be measured where real
weights cannot travel (an air-gapped GPU machine), and one model can be run on every backend.

The text model is a Llama; its vocabulary is SentencePiece-style (`<unk>`, `<s>`, `</s>`, the
256 byte tokens, so any text tokenizes by byte fallback, then filler pieces up to `n_vocab`,
so the output layer is as wide as a real model's).  The projector is a LLaVA-style "mlp"
mmproj whose tower runs no layer (as the codebook mmproj), so images go through libmtmd's
real preprocessing and projection.  Needs the `gguf` package (the `vision` extra).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from infmllm_gguf._llama_cpp import llama_cpp as lc

if TYPE_CHECKING:
    import gguf

N_SPECIAL = 3  # <unk>, <s>, </s>
N_BYTES = 256


@dataclass(frozen=True)
class LlamaShape:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int = 8192
    rope_freq_base: float = 10000.0

    def __post_init__(self) -> None:
        if self.n_vocab < N_SPECIAL + N_BYTES:
            raise ValueError(f"n_vocab {self.n_vocab}: the byte vocabulary alone takes {N_SPECIAL + N_BYTES}")
        if self.n_embd % self.n_head or self.n_head % self.n_head_kv:
            raise ValueError("n_embd must be a multiple of n_head, and n_head of n_head_kv")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_params(self) -> int:
        n_kv = self.head_dim * self.n_head_kv
        block = 2 * self.n_embd * (self.n_embd + n_kv) + 3 * self.n_embd * self.n_ff + 2 * self.n_embd
        return 2 * self.n_vocab * self.n_embd + self.n_layer * block + self.n_embd


# TinyLlama-1.1B's shape (22 layers, GQA 32/4, 32k vocabulary), with 8k trained positions
TINYLLAMA_1B = LlamaShape(n_vocab=32000, n_embd=2048, n_layer=22, n_head=32, n_head_kv=4, n_ff=5632)
# small enough for tests on any backend; head_dim 64, which CUDA's flash attention supports
SMALL = LlamaShape(n_vocab=512, n_embd=256, n_layer=4, n_head=4, n_head_kv=2, n_ff=512)


def _vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(N_BYTES)]
    types = [
        int(lc.LLAMA_TOKEN_TYPE_UNKNOWN),
        int(lc.LLAMA_TOKEN_TYPE_CONTROL),
        int(lc.LLAMA_TOKEN_TYPE_CONTROL),
    ] + [int(lc.LLAMA_TOKEN_TYPE_BYTE)] * N_BYTES
    n_fill = n_vocab - len(tokens)
    tokens += [f"\u2581w{i}" for i in range(n_fill)]
    types += [int(lc.LLAMA_TOKEN_TYPE_NORMAL)] * n_fill
    scores = [0.0] * (N_SPECIAL + N_BYTES) + [-float(i) for i in range(n_fill)]
    return tokens, scores, types


def write_llama(path: str | Path, shape: LlamaShape, seed: int = 0) -> Path:
    """Write a Llama of `shape` with N(0, 0.02) F16 weights (norms 1) to `path`."""
    import gguf

    path = Path(path)
    rng = np.random.default_rng(seed)
    n_kv = shape.head_dim * shape.n_head_kv

    def weight(*dims: int) -> np.ndarray:  # numpy order: [rows (out), cols (in)]
        return (0.02 * rng.standard_normal(dims, dtype=np.float32)).astype(np.float16)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, np.float32)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"random llama {shape.n_params / 1e9:.2f}B")
    w.add_context_length(shape.n_ctx_train)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(shape.rope_freq_base)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(int(lc.LLAMA_FTYPE_MOSTLY_F16))
    tokens, scores, types = _vocab(shape.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_tensor("token_embd.weight", weight(shape.n_vocab, shape.n_embd))
    for i in range(shape.n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones(shape.n_embd))
        w.add_tensor(f"blk.{i}.attn_q.weight", weight(shape.n_embd, shape.n_embd))
        w.add_tensor(f"blk.{i}.attn_k.weight", weight(n_kv, shape.n_embd))
        w.add_tensor(f"blk.{i}.attn_v.weight", weight(n_kv, shape.n_embd))
        w.add_tensor(f"blk.{i}.attn_output.weight", weight(shape.n_embd, shape.n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones(shape.n_embd))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", weight(shape.n_ff, shape.n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", weight(shape.n_ff, shape.n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", weight(shape.n_embd, shape.n_ff))
    w.add_tensor("output_norm.weight", ones(shape.n_embd))
    w.add_tensor("output.weight", weight(shape.n_vocab, shape.n_embd))
    finish(w)
    return path


def quantize(
    src: str | Path, dst: str | Path, ftype: int = lc.LLAMA_FTYPE_MOSTLY_Q4_K_M, n_threads: int = 0
) -> Path:
    """llama.cpp's own quantizer (`llama_model_quantize`): `src` to `dst` as `ftype` (a
    LLAMA_FTYPE_*; default Q4_K_M); n_threads 0 = all cores.  OSError if llama.cpp refuses."""
    params = lc.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads
    rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise OSError(f"llama_model_quantize({src} -> {dst}, ftype {ftype}) failed with {rc}")
    return Path(dst)


def mlp_projector(
    path: str | Path, name: str, n_v: int, n_embd: int, grid: int, patch: int
) -> gguf.GGUFWriter:
    """A GGUFWriter for libmtmd's LLaVA-1.5 "mlp" projector whose tower runs no layer: the
    header, an identity pre-norm and the one block the loader requires and the graph never
    runs (it runs block_count - 1).  The caller adds v.patch_embd, v.position_embd and the
    mm.0 / mm.2 projection (and metadata of its own), then `finish(writer)`."""
    import gguf

    w = gguf.GGUFWriter(str(path), "clip")
    w.add_name(name)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", "mlp")
    w.add_uint32("clip.vision.image_size", patch * grid)
    w.add_uint32("clip.vision.patch_size", patch)
    w.add_uint32("clip.vision.embedding_length", n_v)
    w.add_uint32("clip.vision.feed_forward_length", 2 * n_v)
    w.add_uint32("clip.vision.block_count", 1)
    w.add_uint32("clip.vision.projection_dim", n_embd)
    w.add_uint32("clip.vision.attention.head_count", 1)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-9)  # 1 + eps == 1 in f32
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    w.add_tensor("v.pre_ln.weight", np.ones(n_v, np.float32))
    w.add_tensor("v.pre_ln.bias", np.zeros(n_v, np.float32))
    # required by the loader, never run; ffn shapes as a real tower's (n_ff != n_embd), else
    # the loader takes them for swapped and says so
    w.add_tensor("v.blk.0.attn_out.weight", np.zeros((n_v, n_v), np.float32))
    w.add_tensor("v.blk.0.ffn_up.weight", np.zeros((2 * n_v, n_v), np.float32))
    w.add_tensor("v.blk.0.ffn_down.weight", np.zeros((n_v, 2 * n_v), np.float32))
    return w


def finish(w: gguf.GGUFWriter) -> None:
    """Write a GGUFWriter's header, metadata and tensors, and close it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_mmproj(path: str | Path, n_embd: int, grid: int = 4, patch: int = 14, seed: int = 0) -> Path:
    """A random "mlp" projector for a text model of width n_embd (random patch embedding and
    projection, no tower layer); an image gives grid x grid cells."""
    rng = np.random.default_rng(seed)
    n_v = 64  # vision width

    def weight(*dims: int) -> np.ndarray:
        return 0.05 * rng.standard_normal(dims, dtype=np.float32)

    w = mlp_projector(path, "random mlp projector", n_v, n_embd, grid, patch)
    w.add_tensor("v.patch_embd.weight", weight(n_v, 3, patch, patch).astype(np.float16))
    w.add_tensor("v.position_embd.weight", weight(grid * grid, n_v))
    w.add_tensor("mm.0.weight", weight(2 * n_v, n_v))
    w.add_tensor("mm.0.bias", np.zeros(2 * n_v, np.float32))
    w.add_tensor("mm.2.weight", weight(n_embd, 2 * n_v))
    w.add_tensor("mm.2.bias", np.zeros(n_embd, np.float32))
    finish(w)
    return Path(path)
