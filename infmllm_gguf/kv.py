"""Pythonic face of the native KV-cache API: numpy in, numpy out, errors as exceptions.

Everything here is O(1) native calls per operation; no per-token loops cross ctypes.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import numpy as np

from infmllm_gguf import _native as N
from infmllm_gguf._llama_cpp import llama_cpp as lc

_I32P = ctypes.POINTER(ctypes.c_int32)
_F32P = ctypes.POINTER(ctypes.c_float)
_U8P = ctypes.POINTER(ctypes.c_uint8)


class NativeError(RuntimeError):
    """A native call refused its arguments; nothing was changed."""

    def __init__(self, call: str, status: int):
        self.status = status
        super().__init__(f"{call} failed: {N.infmllm_status_str(status).decode()} (status {status})")


def _check(call: str, rc: int) -> int:
    if rc < 0:
        raise NativeError(call, rc)
    return rc


@dataclass(frozen=True)
class CellView:
    """The cells of one sequence in stream order."""

    cells: np.ndarray  # int32 cell index in the KV buffer
    positions: np.ndarray  # int32 RoPE position
    scores: np.ndarray  # float32 attention mass from the latest scored decode
    # int32 per cell: 0 for text, else the image it belongs to (1, 2, ... in stream order);
    # the runtime fills it in (Stream.view), a bare read-back from the cache says all text
    media: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.media is None:
            object.__setattr__(self, "media", np.zeros(len(self.cells), np.int32))

    @property
    def is_image(self) -> np.ndarray:
        return self.media > 0


@dataclass(frozen=True)
class LayerLayout:
    """One layer of the KV cache as the row transfers lay it out (see `infmllm_kv_layer`)."""

    il: int
    type_k: int  # ggml_type
    type_v: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_embd_k: int
    n_embd_v: int
    k_row_bytes: int
    v_row_bytes: int


@dataclass(frozen=True)
class Rope:
    """The rotation a K-shift gives keys (`infmllm_kv_rope`), done in numpy: enough to score
    stored keys at another distance from a query.  Plain frequencies only (base, linear scale):
    YaRN's corrections and per-dimension factors are left out, so for such models the result
    approximates a K-shift."""

    rope_type: int  # LLAMA_ROPE_TYPE_NORM (pairs 2i, 2i+1) or _NEOX (pairs i, i + n_rot/2)
    n_rot: int
    freq_base: float
    freq_scale: float

    @property
    def rotates(self) -> bool:
        """Whether `rotate` can move these keys: 1-D RoPE of a kind it knows, or none."""
        return self.rope_type in (lc.LLAMA_ROPE_TYPE_NONE, lc.LLAMA_ROPE_TYPE_NORM, lc.LLAMA_ROPE_TYPE_NEOX)

    def rotate(self, keys: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """keys [tokens, ..., head_dim] (float32) rotated as if each token's position moved by
        delta[token]; a new array.  ValueError for a RoPE `rotates` does not know (M-RoPE)."""
        if not self.rotates:
            raise ValueError(f"RoPE type {self.rope_type} cannot be re-rotated on the host")
        if self.rope_type == lc.LLAMA_ROPE_TYPE_NONE or self.n_rot == 0:
            return keys.astype(np.float32, copy=True)
        half = self.n_rot // 2
        theta = self.freq_base ** (-np.arange(half, dtype=np.float64) * 2 / self.n_rot)
        angle = (np.asarray(delta, np.float64) * self.freq_scale)[:, None] * theta[None, :]
        shape = (len(angle),) + (1,) * (keys.ndim - 2) + (half,)
        out = keys.astype(np.float32, copy=True)
        if self.rope_type == lc.LLAMA_ROPE_TYPE_NORM:  # pairs side by side: one complex product
            pairs = out[..., : self.n_rot].view(np.complex64)
            pairs *= np.exp(1j * angle).astype(np.complex64).reshape(shape)
            return out
        cos = np.cos(angle).astype(np.float32).reshape(shape)  # NeoX: pairs (i, i + n_rot/2)
        sin = np.sin(angle).astype(np.float32).reshape(shape)
        x0, x1 = keys[..., :half], keys[..., half : self.n_rot]
        out[..., :half] = x0 * cos - x1 * sin
        out[..., half : self.n_rot] = x0 * sin + x1 * cos
        return out


class KVCache:
    """Scoring, read-back, eviction, compaction and row transfers on one llama_context: the one
    caller of llama.cpp's memory and state functions, shared by every sequence of the context."""

    def __init__(self, ctx: int):
        self.ctx = ctx

    def remove(self, seq_id: int, first_pos: int = -1, end_pos: int = -1) -> bool:
        """Remove the sequence's cells at positions [first_pos, end_pos) (-1: open-ended);
        False where llama.cpp cannot remove part of a sequence (a recurrent memory)."""
        return bool(lc.llama_memory_seq_rm(lc.llama_get_memory(self.ctx), seq_id, first_pos, end_pos))

    def save_sequence(self, seq_id: int) -> np.ndarray:
        """The sequence's cells as llama.cpp saves them (positions, K and V), as bytes."""
        size = lc.llama_state_seq_get_size(self.ctx, seq_id)
        data = np.empty(size, np.uint8)
        got = lc.llama_state_seq_get_data(self.ctx, data.ctypes.data_as(_U8P), size, seq_id)
        if got != size:
            raise RuntimeError(f"llama_state_seq_get_data wrote {got} of {size} bytes")
        return data

    def load_sequence(self, data: np.ndarray, seq_id: int) -> bool:
        """Load what save_sequence gave into the (empty) sequence; False where llama.cpp refused it."""
        data = np.ascontiguousarray(data, np.uint8)
        return lc.llama_state_seq_set_data(self.ctx, data.ctypes.data_as(_U8P), len(data), seq_id) != 0

    def set_scoring(self, n_score_queries: int) -> None:
        """0: off; n > 0: last n query rows of each ubatch; -1: all rows (accumulated per decode)."""
        _check("infmllm_set_scoring", N.infmllm_set_scoring(self.ctx, n_score_queries))

    @property
    def scoring(self) -> int:
        """The current mode; -1 (all rows) is a mode, not an error, hence the out-parameter."""
        mode = ctypes.c_int32()
        _check("infmllm_get_scoring", N.infmllm_get_scoring(self.ctx, ctypes.byref(mode)))
        return mode.value

    @property
    def size(self) -> int:
        """Cells in the KV buffer: llama.cpp pads n_ctx, so cell indices can reach past it."""
        return _check("infmllm_kv_size", N.infmllm_kv_size(self.ctx))

    def scored_rows(self, seq_id: int = 0) -> int:
        """The query rows the sequence's latest scores come from (`infmllm_kv_seq_scored_rows`)."""
        return _check("infmllm_kv_seq_scored_rows", N.infmllm_kv_seq_scored_rows(self.ctx, seq_id))

    def n_cells(self, seq_id: int = 0) -> int:
        return _check("infmllm_kv_seq_n_cells", N.infmllm_kv_seq_n_cells(self.ctx, seq_id))

    def cells(self, seq_id: int = 0) -> CellView:
        n = self.n_cells(seq_id)
        cells = np.empty(n, np.int32)
        pos = np.empty(n, np.int32)
        scores = np.empty(n, np.float32)
        got = N.infmllm_kv_seq_cells(
            self.ctx,
            seq_id,
            cells.ctypes.data_as(_I32P),
            pos.ctypes.data_as(_I32P),
            scores.ctypes.data_as(_F32P),
            n,
        )
        _check("infmllm_kv_seq_cells", got)
        return CellView(cells[:got], pos[:got], scores[:got])

    def evict(self, positions: np.ndarray, seq_id: int = 0) -> int:
        pos = np.ascontiguousarray(positions, dtype=np.int32)
        return _check(
            "infmllm_kv_seq_evict",
            N.infmllm_kv_seq_evict(self.ctx, seq_id, pos.ctypes.data_as(_I32P), len(pos)),
        )

    def evict_cells(self, cells: np.ndarray, seq_id: int = 0) -> int:
        """Evict by cell index: unambiguous where cells share a position (M-RoPE images)."""
        c = np.ascontiguousarray(cells, dtype=np.int32)
        return _check(
            "infmllm_kv_seq_evict_cells",
            N.infmllm_kv_seq_evict_cells(self.ctx, seq_id, c.ctypes.data_as(_I32P), len(c)),
        )

    def compact(self, seq_id: int = 0) -> int:
        """Renumber to 0..n-1; returns n, the position the next token takes."""
        return _check("infmllm_kv_seq_compact", N.infmllm_kv_seq_compact(self.ctx, seq_id))

    def arrange(self, cells: np.ndarray, seq_id: int = 0) -> int:
        """Give the sequence's cells positions 0..n-1 in the order listed (all of them, once each);
        the moved keys are re-rotated by the next `update`."""
        c = np.ascontiguousarray(cells, dtype=np.int32)
        return _check(
            "infmllm_kv_seq_arrange",
            N.infmllm_kv_seq_arrange(self.ctx, seq_id, c.ctypes.data_as(_I32P), len(c)),
        )

    def head(self, seq_id: int = 0) -> int:
        """The cell from which llama.cpp searches free cells for the next batch."""
        return _check("infmllm_kv_seq_head", N.infmllm_kv_seq_head(self.ctx, seq_id))

    def place(self, cells: np.ndarray, head: int = -1, seq_id: int = 0) -> int:
        """Move the sequence's cells, in position order, onto `cells` (rows move with them) and
        set the search head (-1: unchanged): a restored sequence back on the cells it had."""
        c = np.ascontiguousarray(cells, dtype=np.int32)
        return _check(
            "infmllm_kv_seq_place",
            N.infmllm_kv_seq_place(self.ctx, seq_id, c.ctypes.data_as(_I32P), len(c), head),
        )

    def layers(self) -> list[LayerLayout]:
        """The cache's layers in the order every row buffer uses."""
        n = _check("infmllm_kv_layers", N.infmllm_kv_layers(self.ctx, None, 0))
        out = (N.infmllm_kv_layer * n)()
        _check("infmllm_kv_layers", N.infmllm_kv_layers(self.ctx, out, n))
        return [LayerLayout(*(getattr(layer, f) for f, _ in N.infmllm_kv_layer._fields_)) for layer in out]

    def rope(self) -> Rope:
        """The context's RoPE as its K-shift applies it (see `Rope`)."""
        out = N.infmllm_rope()
        _check("infmllm_kv_rope", N.infmllm_kv_rope(self.ctx, ctypes.byref(out)))
        return Rope(out.rope_type, out.n_rot, out.freq_base, out.freq_scale)

    def read_rows(
        self, positions: np.ndarray, k_bytes: int, v_bytes: int, seq_id: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """K and V rows of the cells at positions, as uint8 [layer][i][row] (flat per layer),
        given the summed row bytes of all layers; the cache is unchanged."""
        pos = np.ascontiguousarray(positions, dtype=np.int32)
        n = len(pos)
        k = np.empty(n * k_bytes, np.uint8)
        v = np.empty(n * v_bytes, np.uint8)
        _check(
            "infmllm_kv_seq_read",
            N.infmllm_kv_seq_read(
                self.ctx,
                seq_id,
                pos.ctypes.data_as(_I32P),
                n,
                k.ctypes.data,
                k.nbytes,
                v.ctypes.data,
                v.nbytes,
            ),
        )
        return k, v

    def write_rows(self, positions: np.ndarray, k: np.ndarray, v: np.ndarray, seq_id: int = 0) -> np.ndarray:
        """Put rows laid out as `read_rows` gives them into free cells at positions (where their
        keys were rotated); returns the cells used."""
        pos = np.ascontiguousarray(positions, dtype=np.int32)
        k = np.ascontiguousarray(k, np.uint8)
        v = np.ascontiguousarray(v, np.uint8)
        cells = np.empty(len(pos), np.int32)
        _check(
            "infmllm_kv_seq_write",
            N.infmllm_kv_seq_write(
                self.ctx,
                seq_id,
                pos.ctypes.data_as(_I32P),
                len(pos),
                k.ctypes.data,
                k.nbytes,
                v.ctypes.data,
                v.nbytes,
                cells.ctypes.data_as(_I32P),
            ),
        )
        return cells

    def set_query_capture(self, n_rows: int) -> None:
        """Keep the newest n_rows query rows of every layer (0: off)."""
        _check("infmllm_set_query_capture", N.infmllm_set_query_capture(self.ctx, n_rows))

    def queries(self, n_floats: int, seq_id: int = 0) -> tuple[np.ndarray, int]:
        """The kept queries as a flat float32 array of n_floats ([layer][head][row][dim]) and the
        number of rows held (the newest ones, at the end of each window)."""
        out = np.zeros(n_floats, np.float32)
        held = _check(
            "infmllm_get_queries",
            N.infmllm_get_queries(self.ctx, seq_id, out.ctypes.data_as(_F32P), n_floats),
        )
        return out, held

    def clear_queries(self, seq_id: int = 0) -> None:
        _check("infmllm_clear_queries", N.infmllm_clear_queries(self.ctx, seq_id))

    def set_queries(self, queries: np.ndarray, held: int, seq_id: int = 0) -> None:
        """Put back what `queries` gave (flat floats and rows held), e.g. into a restored session."""
        flat = np.ascontiguousarray(queries, np.float32).ravel()
        _check(
            "infmllm_set_queries",
            N.infmllm_set_queries(self.ctx, seq_id, flat.ctypes.data_as(_F32P), flat.size, held),
        )

    def update(self) -> bool:
        """Re-rotate compacted keys now, uninterruptibly; True if there was a K-shift to apply."""
        return bool(_check("infmllm_kv_update", N.infmllm_kv_update(self.ctx)))


def select_keep(
    scores: np.ndarray, budget: int, n_sink: int, n_recent: int, local_window: int, bias: float
) -> np.ndarray:
    """Boolean keep-mask of the native InfMLLM rule over scores in stream order."""
    s = np.ascontiguousarray(scores, dtype=np.float32)
    keep = np.zeros(len(s), np.uint8)
    params = N.infmllm_select_params(budget, n_sink, n_recent, local_window, bias)
    _check(
        "infmllm_select_keep",
        N.infmllm_select_keep(
            s.ctypes.data_as(_F32P), len(s), ctypes.byref(params), keep.ctypes.data_as(_U8P)
        ),
    )
    return keep.astype(bool)


class Batch:
    """A reusable llama_batch filled with memmove, not per-token Python loops.

    n_embd = 0: it carries token ids; n_embd > 0: input embeddings of that width (images).
    n_pos > 1: each embedding has n_pos positions (M-RoPE's sections), passed section-major.
    Each token has one sequence id, from an array of ours that the batch's per-token
    pointers are aimed at once (their own buffers are put back before the batch is freed)."""

    def __init__(self, capacity: int, n_embd: int = 0, n_pos: int = 1):
        self.capacity = capacity
        self.n_embd = n_embd
        self.n_pos = n_pos
        self._batch = lc.llama_batch_init(capacity, n_embd, 1)
        self._n_seq = np.ones(capacity, np.int32)
        # pointers are kept as addresses: reading a ctypes pointer field gives a view of the
        # field, not a copy
        self._own_pos = ctypes.cast(self._batch.pos, ctypes.c_void_p).value
        self._pos_buf = np.zeros(capacity * n_pos, np.int32) if n_pos > 1 else None
        if self._pos_buf is not None:
            self._batch.pos = self._pos_buf.ctypes.data_as(_I32P)
        self._seq_buf = np.zeros(capacity, np.int32)
        ptrs = ctypes.cast(self._batch.seq_id, ctypes.POINTER(ctypes.c_void_p))
        self._own_seq = [ptrs[i] for i in range(capacity)]
        base = self._seq_buf.ctypes.data
        for i in range(capacity):
            ptrs[i] = base + 4 * i

    def close(self) -> None:
        if self._batch is not None:
            self._batch.pos = ctypes.cast(self._own_pos, _I32P)
            ptrs = ctypes.cast(self._batch.seq_id, ctypes.POINTER(ctypes.c_void_p))
            for i, own in enumerate(self._own_seq):
                ptrs[i] = own
            lc.llama_batch_free(self._batch)
            self._batch = None

    def __del__(self) -> None:
        self.close()

    def decode(
        self,
        ctx: int,
        inputs: np.ndarray,
        positions: np.ndarray,
        seq_id: int | np.ndarray,
        logits: np.ndarray,
    ) -> int:
        """llama_decode at most capacity tokens (ids, or n x n_embd embeddings) at `positions`
        (n, or n_pos x n for embeddings with several position sections) into sequence seq_id
        (one for all, or one per token); returns its status."""
        n = len(inputs)
        if n == 0 or n > self.capacity:
            raise ValueError(f"batch of {n} tokens, capacity {self.capacity}")
        n_pos = self.n_pos if self.n_embd else 1
        if np.shape(positions) != ((n,) if n_pos == 1 else (n_pos, n)):
            raise ValueError(f"positions of shape {np.shape(positions)} for {n} inputs of {n_pos} sections")
        b = self._batch
        self._seq_buf[:n] = seq_id
        # keep the converted arrays referenced until the copies are done
        pos = np.ascontiguousarray(positions, np.int32)
        out = np.ascontiguousarray(logits, np.int8)
        if self.n_embd:
            if inputs.ndim != 2 or inputs.shape[1] != self.n_embd:
                raise ValueError(f"embeddings must be n x {self.n_embd}, got {inputs.shape}")
            embd = np.ascontiguousarray(inputs, np.float32)
            ctypes.memmove(b.embd, embd.ctypes.data, embd.nbytes)
        else:
            tok = np.ascontiguousarray(inputs, np.int32)
            ctypes.memmove(b.token, tok.ctypes.data, 4 * n)
        b.n_tokens = n
        ctypes.memmove(b.pos, pos.ctypes.data, 4 * n * n_pos)
        ctypes.memmove(b.n_seq_id, self._n_seq.ctypes.data, 4 * n)
        ctypes.memmove(b.logits, out.ctypes.data, n)
        return lc.llama_decode(ctx, b)


def decode(
    ctx: int,
    inputs: np.ndarray | list[int],
    positions: np.ndarray | list[int],
    seq_id: int = 0,
    all_logits: bool = False,
) -> None:
    """llama_decode token ids (1-D) or input embeddings (n x n_embd) at explicit positions,
    logits for the last (or every) one."""
    inputs = np.asarray(inputs)
    inputs = inputs.astype(np.float32) if inputs.ndim == 2 else inputs.astype(np.int32)
    positions = np.asarray(positions, np.int32)
    if len(inputs) != len(positions):
        raise ValueError("inputs and positions differ in length")
    logits = np.zeros(len(inputs), np.int8)
    logits[-1:] = 1
    if all_logits:
        logits[:] = 1
    n_embd = inputs.shape[1] if inputs.ndim == 2 else 0
    batch = Batch(min(lc.llama_n_batch(ctx), max(len(inputs), 1)), n_embd)
    try:
        for start in range(0, len(inputs), batch.capacity):
            end = start + batch.capacity
            rc = batch.decode(ctx, inputs[start:end], positions[start:end], seq_id, logits[start:end])
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with status {rc}")
    finally:
        batch.close()
