"""Independent references: the keep rule written plainly, and the native scores, for which
Q, K and the mask are captured through llama.cpp's eval callback (CPU backend, so tensor
data is host memory) and the attention probabilities are recomputed in numpy.
"""

from __future__ import annotations

import ctypes
import re
import struct

import numpy as np
from infmllm_gguf._llama_cpp import llama_cpp as lc

GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1


_NODE = re.compile(r"^(kq|kq_soft_max|kqv_out)-(\d+)$")


class GGMLTensor(ctypes.Structure):
    pass


GGMLTensor._fields_ = [  # struct ggml_tensor of the pinned ggml
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * 4),
    ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * 16),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GGMLTensor) * 10),
    ("view_src", ctypes.POINTER(GGMLTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * 64),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


def to_numpy(t: GGMLTensor) -> np.ndarray:
    """Copy a (possibly strided) F32/F16 host tensor; numpy axes are ggml dims reversed."""
    dtype = {GGML_TYPE_F32: np.float32, GGML_TYPE_F16: np.float16}[t.type]
    ne = list(t.ne)
    nb = list(t.nb)
    span = sum((n - 1) * s for n, s in zip(ne, nb)) + np.dtype(dtype).itemsize
    raw = (ctypes.c_char * span).from_address(t.data)
    flat = np.frombuffer(raw, dtype=np.uint8)
    arr = np.lib.stride_tricks.as_strided(flat.view(dtype), shape=ne[::-1], strides=nb[::-1])
    return np.array(arr, dtype=np.float32)


def _f32_param(t: GGMLTensor, i: int) -> float:
    return struct.unpack("f", struct.pack("i", t.op_params[i]))[0]


class AttentionCapture:
    """Eval callback keeping, per layer, the Q, K, mask and scale of the last ubatch."""

    def __init__(self, flash_attn: bool):
        self.flash_attn = flash_attn
        self.layers: dict[int, dict] = {}
        self.callback = lc.ggml_backend_sched_eval_callback(self._cb)

    def _wanted(self, name: str) -> bool:
        m = _NODE.match(name)
        if m is None:
            return False
        return (m.group(1) == "kqv_out") == self.flash_attn

    def _cb(self, tensor_p, ask, _user):
        t = ctypes.cast(tensor_p, ctypes.POINTER(GGMLTensor)).contents
        name = t.name.decode()
        if ask:
            return self._wanted(name)
        il = int(_NODE.match(name).group(2))
        entry = self.layers.setdefault(il, {})
        if self.flash_attn:
            node = t
            while node.src[0]:  # kqv_out is a reshape of the flash-attention node
                node = node.src[0].contents
                if node.src[3]:  # FLASH_ATTN_EXT(q, k, v, mask)
                    break
            entry["q"] = to_numpy(node.src[0].contents)
            entry["k"] = to_numpy(node.src[1].contents)
            entry["mask"] = to_numpy(node.src[3].contents)
            entry["scale"] = _f32_param(node, 0)
        elif name.startswith("kq-"):
            entry["k"] = to_numpy(t.src[0].contents)
            entry["q"] = to_numpy(t.src[1].contents)
        else:
            entry["mask"] = to_numpy(t.src[1].contents)
            entry["scale"] = _f32_param(t, 0)
        return True

    def reference_scores(self, n_rows: int) -> np.ndarray:
        """Per-cell attention mass of the last n_rows queries, summed over heads and layers.

        Shapes (numpy order): q [streams, heads, tokens, d], k [streams, kv_heads, n_kv, d],
        mask [streams, 1, tokens_padded, n_kv].  Returns [streams, n_kv].
        """
        total = None
        for il in sorted(self.layers):
            e = self.layers[il]
            q, k, mask, scale = e["q"], e["k"], e["mask"], e["scale"]
            n_tok = q.shape[2]
            rows = n_tok if n_rows < 0 else min(n_rows, n_tok)
            group = q.shape[1] // k.shape[1]
            k_full = np.repeat(k, group, axis=1)  # GQA: query head h uses kv head h // group
            qr = q[:, :, n_tok - rows :, :].astype(np.float64)
            logits = np.einsum("shtd,shkd->shtk", qr, k_full.astype(np.float64)) * scale
            logits = logits + mask[:, :, n_tok - rows : n_tok, :].astype(np.float64)
            logits -= logits.max(axis=-1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=-1, keepdims=True)
            per_cell = p.sum(axis=(1, 2))
            total = per_cell if total is None else total + per_cell
        return total


def reference_keep(scores, budget, n_sink, n_recent, w, bias):
    """The rule of SPEC section 1, written plainly (sums in float64, in stream order).

    A non-finite score adds nothing to the sums and ranks its own cell by itself: +inf
    above every finite rank, -inf below, NaN below everything.
    """
    n = len(scores)
    keep = np.zeros(n, bool)
    if n <= budget:
        keep[:] = True
        return keep
    keep[:n_sink] = True
    keep[n - n_recent :] = True
    if budget == n_sink + n_recent:
        return keep
    bias = float(np.float32(bias))  # the C API takes a float
    a = np.asarray(scores, np.float32).astype(np.float64)
    finite = np.where(np.isfinite(a), a, 0.0)
    prefix = np.concatenate([[0.0], np.cumsum(finite)])
    total = prefix[n] if prefix[n] > 0 else 1.0
    ranked = []
    for j in range(n_sink, n - n_recent):
        if np.isfinite(a[j]):
            lo, hi = max(0, j - w), min(n, j + w + 1)
            r = (prefix[hi] - prefix[lo]) / total + bias * (j / (n - 1))
        else:
            r = a[j]
        nan = bool(np.isnan(r))
        ranked.append((nan, 0.0 if nan else -r, -j, j))
    ranked.sort()  # not NaN first, then higher first, ties to the newer
    for *_, j in ranked[: budget - n_sink - n_recent]:
        keep[j] = True
    return keep
