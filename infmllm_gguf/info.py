"""What was built and what is loaded: llama.cpp commit, patch set, backends."""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Any

from infmllm_gguf import _native

_PKG_DIR = Path(__file__).resolve().parent


def _registered_backends(lib_dir: Path) -> list[str]:
    """Backends ggml actually registered at run time (e.g. CPU, CUDA)."""
    ggml = ctypes.CDLL(str(_native.shared_library_path(lib_dir, "ggml")))
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    ggml.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_reg_get.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_name.restype = ctypes.c_char_p
    return [
        ggml.ggml_backend_reg_name(ggml.ggml_backend_reg_get(i)).decode()
        for i in range(ggml.ggml_backend_reg_count())
    ]


def build_info() -> dict[str, Any]:
    """Describe the loaded native library (_native has already refused an unpatched one)."""
    config = json.loads((_PKG_DIR / "_build_config.json").read_text())
    lib_path = Path(_native._lib._name)
    return {
        "llama_cpp_commit": config["llama_cpp_commit"],
        "llama_cpp_python_version": config["llama_cpp_python_version"],
        "patchset_version": _native.infmllm_patchset_version().decode(),
        "abi_version": _native.infmllm_abi_version(),
        "patches": config["patches"],
        "backends_built": config["backends_built"],
        "backends": _registered_backends(lib_path.parent),
        "build_type": config["build_type"],
        "library": str(lib_path),
    }
