"""ctypes bindings of native/include/infmllm.h, one function per C function.

The library is checked for our ABI marker before the bundled llama-cpp-python layer loads
it, so an unpatched libllama fails with an ImportError that says what to do.  Both layers
then share the one libllama handle.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

ABI_VERSION = 7  # must equal INFMLLM_ABI_VERSION in native/include/infmllm.h

INFMLLM_OK = 0
INFMLLM_ERR_INVALID_ARG = -1
INFMLLM_ERR_UNSUPPORTED = -2
INFMLLM_ERR_INVALID_SEQ = -3
INFMLLM_ERR_POS_NOT_FOUND = -4
INFMLLM_ERR_SHARED_CELLS = -5
INFMLLM_ERR_BUFFER_TOO_SMALL = -6
INFMLLM_ERR_NO_FREE_CELLS = -7

INFMLLM_SCORE_OFF = 0
INFMLLM_SCORE_ALL_ROWS = -1

llama_context_p = ctypes.c_void_p
llama_seq_id = ctypes.c_int32
llama_pos = ctypes.c_int32


class infmllm_select_params(ctypes.Structure):  # noqa: N801 - mirrors the C name
    _fields_ = [
        ("budget", ctypes.c_int32),
        ("n_sink", ctypes.c_int32),
        ("n_recent", ctypes.c_int32),
        ("local_window", ctypes.c_int32),
        ("bias", ctypes.c_float),
    ]


class infmllm_kv_layer(ctypes.Structure):  # noqa: N801 - mirrors the C name
    _fields_ = [
        (name, ctypes.c_int32)
        for name in (
            "il",
            "type_k",
            "type_v",
            "n_head",
            "n_head_kv",
            "head_dim",
            "n_embd_k",
            "n_embd_v",
            "k_row_bytes",
            "v_row_bytes",
        )
    ]


class infmllm_rope(ctypes.Structure):  # noqa: N801 - mirrors the C name
    _fields_ = [
        ("rope_type", ctypes.c_int32),
        ("n_rot", ctypes.c_int32),
        ("freq_base", ctypes.c_float),
        ("freq_scale", ctypes.c_float),
    ]


def check_patched(lib: ctypes.CDLL, where: str) -> None:
    """Raise ImportError unless lib is a libllama built with our patches and ABI."""
    fix = (
        "Reinstall infmllm-gguf so that it builds its own patched libllama "
        "(pip install --force-reinstall . in its source tree), "
        "and unset INFMLLM_GGUF_LIB_PATH if it points elsewhere."
    )
    if not hasattr(lib, "infmllm_abi_version"):
        raise ImportError(f"{where} is not patched by infmllm-gguf (no infmllm_abi_version). {fix}")
    lib.infmllm_abi_version.restype = ctypes.c_int32
    lib.infmllm_abi_version.argtypes = []
    found = lib.infmllm_abi_version()
    if found != ABI_VERSION:
        raise ImportError(f"{where} has infmllm ABI {found}, this package needs {ABI_VERSION}. {fix}")


def shared_library_path(lib_dir: Path, base: str, platform: str = sys.platform) -> Path:
    """Library `base` in lib_dir under this platform's file name.

    The names and their order are those the vendored loader (_ctypes_extensions) tries, so
    the file checked here is the file it then loads; the first name when none exists.
    """
    if platform == "win32":
        names = [f"{base}.dll", f"lib{base}.dll"]
    elif platform == "darwin":
        names = [f"lib{base}.so", f"lib{base}.dylib"]
    else:
        names = [f"lib{base}.so"]
    return next((lib_dir / n for n in names if (lib_dir / n).is_file()), lib_dir / names[0])


_PKG_DIR = Path(__file__).resolve().parent


def library_path() -> Path:
    """The libllama the bundled layer will load (INFMLLM_GGUF_LIB_PATH overrides the dir)."""
    override = os.environ.get("INFMLLM_GGUF_LIB_PATH")
    lib_dir = Path(override) if override else _PKG_DIR / "_llama_cpp" / "lib"
    return shared_library_path(lib_dir, "llama")


def _check_built() -> None:
    """Explain a package without its build products; the likeliest cause is the source tree
    shadowing the installed package because Python was started in the repository root."""
    if (_PKG_DIR / "_llama_cpp" / "__init__.py").is_file():
        return
    checkout = _PKG_DIR.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "cmake" / "prepare_source.py").is_file():
        raise ImportError(
            f"infmllm_gguf was imported from the source checkout at {checkout}, which has no built "
            "library (the build puts it only into the installed package). Run Python from another "
            f"directory so the installed infmllm-gguf is found, or install it first (pip install {checkout})."
        )
    raise ImportError(
        f"{_PKG_DIR} has no bundled llama-cpp-python layer (_llama_cpp/): the install is incomplete. "
        "Reinstall infmllm-gguf (pip install --force-reinstall . in its source tree)."
    )


def _load_checked() -> ctypes.CDLL:
    _check_built()
    path = library_path()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise ImportError(f"cannot load {path}: {exc}. Reinstall infmllm-gguf (pip install .).") from exc
    check_patched(lib, str(path))
    return lib


_load_checked()
from infmllm_gguf._llama_cpp import llama_cpp as _lc  # noqa: E402  (after the check, on purpose)

_lib = _lc._lib


def _bind(name: str, argtypes: list, restype):
    fn = getattr(_lib, name)
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


infmllm_abi_version = _bind("infmllm_abi_version", [], ctypes.c_int32)
infmllm_patchset_version = _bind("infmllm_patchset_version", [], ctypes.c_char_p)
infmllm_status_str = _bind("infmllm_status_str", [ctypes.c_int32], ctypes.c_char_p)
infmllm_set_scoring = _bind("infmllm_set_scoring", [llama_context_p, ctypes.c_int32], ctypes.c_int32)
infmllm_get_scoring = _bind(
    "infmllm_get_scoring", [llama_context_p, ctypes.POINTER(ctypes.c_int32)], ctypes.c_int32
)
infmllm_kv_size = _bind("infmllm_kv_size", [llama_context_p], ctypes.c_int32)
infmllm_kv_seq_n_cells = _bind("infmllm_kv_seq_n_cells", [llama_context_p, llama_seq_id], ctypes.c_int32)
infmllm_kv_seq_scored_rows = _bind(
    "infmllm_kv_seq_scored_rows", [llama_context_p, llama_seq_id], ctypes.c_int32
)
infmllm_kv_seq_cells = _bind(
    "infmllm_kv_seq_cells",
    [
        llama_context_p,
        llama_seq_id,
        ctypes.POINTER(ctypes.c_int32),
        ctypes.POINTER(llama_pos),
        ctypes.POINTER(ctypes.c_float),
        ctypes.c_int32,
    ],
    ctypes.c_int32,
)
infmllm_kv_seq_evict = _bind(
    "infmllm_kv_seq_evict",
    [llama_context_p, llama_seq_id, ctypes.POINTER(llama_pos), ctypes.c_int32],
    ctypes.c_int32,
)
infmllm_kv_seq_evict_cells = _bind(
    "infmllm_kv_seq_evict_cells",
    [llama_context_p, llama_seq_id, ctypes.POINTER(ctypes.c_int32), ctypes.c_int32],
    ctypes.c_int32,
)
infmllm_kv_seq_compact = _bind("infmllm_kv_seq_compact", [llama_context_p, llama_seq_id], ctypes.c_int32)
infmllm_select_keep = _bind(
    "infmllm_select_keep",
    [
        ctypes.POINTER(ctypes.c_float),
        ctypes.c_int32,
        ctypes.POINTER(infmllm_select_params),
        ctypes.POINTER(ctypes.c_uint8),
    ],
    ctypes.c_int32,
)

infmllm_kv_rope = _bind("infmllm_kv_rope", [llama_context_p, ctypes.POINTER(infmllm_rope)], ctypes.c_int32)
infmllm_kv_layers = _bind(
    "infmllm_kv_layers", [llama_context_p, ctypes.POINTER(infmllm_kv_layer), ctypes.c_int32], ctypes.c_int32
)
infmllm_kv_seq_read = _bind(
    "infmllm_kv_seq_read",
    [
        llama_context_p,
        llama_seq_id,
        ctypes.POINTER(llama_pos),
        ctypes.c_int32,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_void_p,
        ctypes.c_size_t,
    ],
    ctypes.c_int32,
)
infmllm_kv_seq_write = _bind(
    "infmllm_kv_seq_write",
    [
        llama_context_p,
        llama_seq_id,
        ctypes.POINTER(llama_pos),
        ctypes.c_int32,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_int32),
    ],
    ctypes.c_int32,
)
infmllm_kv_seq_arrange = _bind(
    "infmllm_kv_seq_arrange",
    [llama_context_p, llama_seq_id, ctypes.POINTER(ctypes.c_int32), ctypes.c_int32],
    ctypes.c_int32,
)
infmllm_kv_seq_head = _bind("infmllm_kv_seq_head", [llama_context_p, llama_seq_id], ctypes.c_int32)
infmllm_kv_seq_place = _bind(
    "infmllm_kv_seq_place",
    [llama_context_p, llama_seq_id, ctypes.POINTER(ctypes.c_int32), ctypes.c_int32, ctypes.c_int32],
    ctypes.c_int32,
)
infmllm_set_query_capture = _bind(
    "infmllm_set_query_capture", [llama_context_p, ctypes.c_int32], ctypes.c_int32
)
infmllm_get_queries = _bind(
    "infmllm_get_queries",
    [llama_context_p, llama_seq_id, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t],
    ctypes.c_int32,
)
infmllm_clear_queries = _bind("infmllm_clear_queries", [llama_context_p, llama_seq_id], ctypes.c_int32)
infmllm_set_queries = _bind(
    "infmllm_set_queries",
    [llama_context_p, llama_seq_id, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t, ctypes.c_int32],
    ctypes.c_int32,
)
infmllm_kv_update = _bind("infmllm_kv_update", [llama_context_p], ctypes.c_int32)
infmllm_abort_on_fd = _bind("infmllm_abort_on_fd", [ctypes.c_void_p], ctypes.c_bool)


def infmllm_abort_on_fd_address() -> int:
    """The C function pointer of infmllm_abort_on_fd, to hand to llama_set_abort_callback."""
    return ctypes.cast(infmllm_abort_on_fd, ctypes.c_void_p).value


# A prototype of our own: the bundled layer's binding wants a Python callback object, and
# re-typing its shared function object would change it for the layer too.
llama_set_abort_callback = ctypes.CFUNCTYPE(None, llama_context_p, ctypes.c_void_p, ctypes.c_void_p)(
    ("llama_set_abort_callback", _lib)
)
