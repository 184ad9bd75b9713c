"""What was built and what is loaded: llama.cpp commit, patch set, backends, devices."""

from __future__ import annotations

import ctypes
import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from infmllm_gguf import _native

_PKG_DIR = Path(__file__).resolve().parent
# ggml_backend_dev_type, in ggml-backend.h's order
_DEVICE_TYPES = ("cpu", "gpu", "igpu", "accel", "meta")


@functools.lru_cache(maxsize=1)
def _ggml() -> ctypes.CDLL:
    """libggml next to the loaded libllama, with the registry and device calls typed."""
    ggml = ctypes.CDLL(str(_native.shared_library_path(Path(_native._lib._name).parent, "ggml")))
    for name, args, res in (
        ("ggml_backend_reg_count", [], ctypes.c_size_t),
        ("ggml_backend_reg_get", [ctypes.c_size_t], ctypes.c_void_p),
        ("ggml_backend_reg_name", [ctypes.c_void_p], ctypes.c_char_p),
        ("ggml_backend_dev_count", [], ctypes.c_size_t),
        ("ggml_backend_dev_get", [ctypes.c_size_t], ctypes.c_void_p),
        ("ggml_backend_dev_name", [ctypes.c_void_p], ctypes.c_char_p),
        ("ggml_backend_dev_description", [ctypes.c_void_p], ctypes.c_char_p),
        ("ggml_backend_dev_type", [ctypes.c_void_p], ctypes.c_int),
        (
            "ggml_backend_dev_memory",
            [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)],
            None,
        ),
    ):
        fn = getattr(ggml, name)
        fn.argtypes, fn.restype = args, res
    return ggml


def _registered_backends() -> list[str]:
    """Backends ggml actually registered at run time (e.g. CPU, CUDA)."""
    ggml = _ggml()
    return [
        ggml.ggml_backend_reg_name(ggml.ggml_backend_reg_get(i)).decode()
        for i in range(ggml.ggml_backend_reg_count())
    ]


@dataclass(frozen=True)
class Device:
    """One ggml device as the loaded build sees it; memory in bytes, read when listed."""

    name: str  # "CPU", "CUDA0", ...
    description: str
    type: str  # cpu, gpu, igpu, accel or meta
    memory_free: int
    memory_total: int


def devices() -> list[Device]:
    """The devices of every registered backend, with their memory now: a CUDA build lists
    each visible GPU (type "gpu"); one without a GPU present lists the CPU alone."""
    ggml = _ggml()
    found = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        kind = ggml.ggml_backend_dev_type(dev)
        found.append(
            Device(
                name=ggml.ggml_backend_dev_name(dev).decode(),
                description=ggml.ggml_backend_dev_description(dev).decode(),
                type=_DEVICE_TYPES[kind] if 0 <= kind < len(_DEVICE_TYPES) else str(kind),
                memory_free=free.value,
                memory_total=total.value,
            )
        )
    return found


def build_info() -> dict[str, Any]:
    """Describe the loaded native library (_native has already refused an unpatched one)."""
    config = json.loads((_PKG_DIR / "_build_config.json").read_text())
    return {
        "llama_cpp_commit": config["llama_cpp_commit"],
        "llama_cpp_python_version": config["llama_cpp_python_version"],
        "patchset_version": _native.infmllm_patchset_version().decode(),
        "abi_version": _native.infmllm_abi_version(),
        "patches": config["patches"],
        "backends_built": config["backends_built"],
        "backends": _registered_backends(),
        "devices": [asdict(device) for device in devices()],
        "build_type": config["build_type"],
        "library": str(Path(_native._lib._name)),
    }
