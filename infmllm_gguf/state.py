"""Saved sessions: a stream's whole state as one self-checking blob, in memory or on disk.

The blob is an uncompressed NumPy .npz (a zip: every member carries a CRC-32, so a damaged or
truncated file fails to read) of the stream's arrays plus one JSON member with the facts and
a fingerprint of what the state belongs to (model, policy, recall tier, cache).  Nothing is
unpickled; a blob is checked whole before a session is changed.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["FORMAT", "LlamaState", "StateError", "pack", "read_file", "unpack", "write_file"]

FORMAT = "infmllm-gguf-session/1"
_FACTS = "__facts__"


class StateError(ValueError):
    """A saved state that cannot be loaded here: damaged, or made for another model or policy."""


@dataclass(frozen=True)
class LlamaState:
    """A saved stream (llama-cpp-python's name for what `save_state` returns)."""

    data: bytes
    n_streamed: int
    n_cached: int
    seed: int

    @property
    def nbytes(self) -> int:
        return len(self.data)


def pack(facts: dict, arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    blob = json.dumps({"format": FORMAT, **facts}).encode()
    np.savez(buf, **{_FACTS: np.frombuffer(blob, np.uint8)}, **arrays)
    return buf.getvalue()


def unpack(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """(facts, arrays) of a blob; StateError if it is not one of ours or is damaged."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        facts = json.loads(arrays.pop(_FACTS).tobytes())
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, UnicodeDecodeError) as exc:
        raise StateError(f"not a saved infmllm-gguf session, or a damaged one ({exc})") from None
    if not isinstance(facts, dict) or facts.get("format") != FORMAT:
        found = facts.get("format") if isinstance(facts, dict) else None
        raise StateError(f"a saved session of format {found!r}; this version reads {FORMAT!r}")
    return facts, arrays


def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Write atomically: the file is either the old one or the whole new one.  The new one is
    private to its owner (0600: a session is a conversation) and made afresh (mkstemp), so no
    existing file or link is written through."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_file(path: str | os.PathLike) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved session at {path}")
    return path.read_bytes()
