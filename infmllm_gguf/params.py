"""llama.cpp model and context parameters from llama-cpp-python's constructor arguments.

Each argument keeps llama-cpp-python's name and meaning; the checks run before anything is
loaded, so a bad value costs nothing.  The stream's context is one sequence, its logits come
from the last token of each batch, and its batch is split into ubatches as llama.cpp does.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

from infmllm_gguf._llama_cpp import _ggml
from infmllm_gguf._llama_cpp import llama_cpp as lc

__all__ = ["ContextOptions", "ModelOptions", "check_int", "ggml_type"]

CacheType = Union[int, str, None]

_ggml_type_name = _ggml.libggml.ggml_type_name
_ggml_type_name.argtypes, _ggml_type_name.restype = [ctypes.c_int], ctypes.c_char_p
_ggml_is_quantized = _ggml.libggml.ggml_is_quantized
_ggml_is_quantized.argtypes, _ggml_is_quantized.restype = [ctypes.c_int], ctypes.c_bool


def check_int(name: str, value: Any, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        floor = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an integer{floor}, got {value!r}")


def ggml_type(name: str, value: CacheType) -> int | None:
    """A K/V cache type as llama-cpp-python takes it (a GGML_TYPE_* int), or by ggml's name for it
    ("f16", "bf16", "q8_0", ...)."""
    if value is None:
        return None
    names = {(_ggml_type_name(t) or b"").decode(): t for t in range(lc.GGML_TYPE_COUNT)}
    if isinstance(value, str):
        if value.lower() not in names:
            raise ValueError(f"{name}: unknown ggml type {value!r} (e.g. 'f16', 'q8_0', 'q4_0')")
        return names[value.lower()]
    if isinstance(value, bool) or not isinstance(value, int) or value not in names.values():
        raise ValueError(f"{name} must be a ggml type (GGML_TYPE_* or its name), got {value!r}")
    return value


@dataclass
class ModelOptions:
    """How the weights are loaded.  n_gpu_layers None keeps llama.cpp's default: every layer on a
    GPU backend when the build has one, none on a CPU build; -1 means all, as in llama-cpp-python."""

    n_gpu_layers: int | None = None
    split_mode: int = lc.LLAMA_SPLIT_MODE_LAYER
    main_gpu: int = 0
    tensor_split: Sequence[float] | None = None
    use_mmap: bool = True
    use_mlock: bool = False

    def __post_init__(self) -> None:
        if self.n_gpu_layers is not None:
            check_int("n_gpu_layers", self.n_gpu_layers, -1)
        check_int("split_mode", self.split_mode, 0)
        check_int("main_gpu", self.main_gpu, 0)
        if self.tensor_split is not None and len(self.tensor_split) > lc.LLAMA_MAX_DEVICES:
            raise ValueError(f"tensor_split has more entries than devices ({lc.LLAMA_MAX_DEVICES})")

    def to_params(self) -> tuple[Any, Any]:
        """(llama_model_params, an object the params point into: keep it alive while loading)."""
        params = lc.llama_model_default_params()
        if self.n_gpu_layers is not None:
            params.n_gpu_layers = self.n_gpu_layers
        params.split_mode = self.split_mode
        params.main_gpu = self.main_gpu
        keep = None
        if self.tensor_split is not None:
            keep = (ctypes.c_float * lc.LLAMA_MAX_DEVICES)(*self.tensor_split)
            params.tensor_split = keep
        params.load_mode = {
            (True, True): lc.LLAMA_LOAD_MODE_MMAP_MLOCK,
            (False, True): lc.LLAMA_LOAD_MODE_MLOCK,
            (True, False): lc.LLAMA_LOAD_MODE_MMAP,
            (False, False): lc.LLAMA_LOAD_MODE_NONE,
        }[(bool(self.use_mmap), bool(self.use_mlock))]
        return params, keep


@dataclass
class ContextOptions:
    """The streams' llama_context.  n_ctx is the cache of one stream; n_slots > 1 gives each of that
    many sequences a KV stream of its own (n_ctx cells each, llama.cpp's non-unified cache), so
    that every slot is scored, evicted and compacted alone.  n_ubatch is capped by n_batch,
    n_batch by n_ctx; rope_freq_* 0 take the model's values; n_threads None means the physical
    cores this process may use."""

    n_ctx: int
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int | None = None
    n_threads_batch: int | None = None
    flash_attn: bool = False
    type_k: CacheType = None
    type_v: CacheType = None
    rope_freq_base: float = 0.0
    rope_freq_scale: float = 0.0
    offload_kqv: bool = True
    n_slots: int = 1
    swa_full: bool | None = None  # None: llama.cpp's default (a full-size sliding-window cache)

    def __post_init__(self) -> None:
        check_int("n_ctx", self.n_ctx, 0)
        if 0 < self.n_ctx < 16:
            raise ValueError(f"n_ctx must be 0 (the model's training context) or >= 16, got {self.n_ctx}")
        check_int("n_batch", self.n_batch, 1)
        check_int("n_slots", self.n_slots, 1)
        check_int("n_ubatch", self.n_ubatch, 1)
        for name in ("n_threads", "n_threads_batch"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        for name in ("rope_freq_base", "rope_freq_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0 (0 = the model's), got {value!r}")
        self.type_k = ggml_type("type_k", self.type_k)
        self.type_v = ggml_type("type_v", self.type_v)
        if self.type_v is not None and _ggml_is_quantized(self.type_v) and not self.flash_attn:
            raise ValueError("a quantized V cache (type_v) needs flash_attn=True, as in llama.cpp")

    @property
    def batch(self) -> int:
        return min(self.n_batch, self.n_ctx)

    @property
    def ubatch(self) -> int:
        return min(self.n_ubatch, self.batch)

    def to_params(self, default_threads: int) -> Any:
        params = lc.llama_context_default_params()
        # llama.cpp pads each sequence's share to 256 cells: ask for whole shares
        params.n_ctx = -(-self.n_ctx // 256) * 256 * self.n_slots if self.n_slots > 1 else self.n_ctx
        params.n_batch = self.batch
        params.n_ubatch = self.ubatch
        params.n_seq_max = self.n_slots
        params.kv_unified = self.n_slots == 1
        params.n_threads = self.n_threads or default_threads
        params.n_threads_batch = self.n_threads_batch or params.n_threads
        params.flash_attn_type = (
            lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        if self.type_k is not None:
            params.type_k = self.type_k
        if self.type_v is not None:
            params.type_v = self.type_v
        params.rope_freq_base = self.rope_freq_base
        params.rope_freq_scale = self.rope_freq_scale
        params.offload_kqv = self.offload_kqv
        if self.swa_full is not None:
            params.swa_full = self.swa_full
        params.no_perf = True
        return params
