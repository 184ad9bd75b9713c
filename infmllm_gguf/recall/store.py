"""`PageStore`: the evicted rows of one stream, in pages, with per-page key bounds.

Storage only: adding, merging, dropping and spilling pages, exporting and loading them, and
reading their rows and keys back.  How pages are scored is `scorers.py`'s business, which of
them come back `selection.py`'s.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import tempfile
import zlib

import numpy as np

from infmllm_gguf.kv import LayerLayout
from infmllm_gguf.recall.config import RecallError

GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16 = 0, 1, 30


def keys_as_float(rows: np.ndarray, type_k: int) -> np.ndarray:
    """K rows (uint8, last axis the bytes of n_embd_k keys) as float32 keys."""
    if type_k == GGML_TYPE_F32:
        return rows.view(np.float32)
    if type_k == GGML_TYPE_F16:
        return rows.view(np.float16).astype(np.float32)
    if type_k == GGML_TYPE_BF16:
        return (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    raise ValueError(f"no float view of ggml type {type_k}")


@dataclasses.dataclass
class _Page:
    stream_index: np.ndarray  # int64, sorted
    rot_pos: np.ndarray  # int32: the position each key was rotated at
    k: np.ndarray | None  # uint8 [m, layers * k_row]; None once spilled
    v: np.ndarray | None
    spill: tuple[int, int, int] | None = None  # (offset, bytes, crc32) in the spill file

    @property
    def n(self) -> int:
        return len(self.stream_index)


@dataclasses.dataclass
class StoreStats:
    pages_dropped: int = 0
    pages_spilled: int = 0
    tokens_stored: int = 0  # ever added


class PageStore:
    """Evicted rows of one stream in pages of `page` stream tokens, with min/max key bounds."""

    def __init__(self, layers: list[LayerLayout], page: int, limit_mb: float, spill_dir: str | None):
        first = layers[0]
        shape = (first.n_head, first.n_head_kv, first.head_dim, first.k_row_bytes, first.v_row_bytes)
        if any(
            (la.n_head, la.n_head_kv, la.head_dim, la.k_row_bytes, la.v_row_bytes) != shape for la in layers
        ):
            raise ValueError("the recall tier needs layers of one shape (heads, head size, row bytes)")
        if first.type_k not in (GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16):
            raise ValueError("the recall tier scores F32, F16 or BF16 keys; this cache's keys are quantized")
        self.n_layer = len(layers)
        self.n_head, self.n_head_kv, self.head_dim = first.n_head, first.n_head_kv, first.head_dim
        self.type_k = first.type_k
        self.k_row, self.v_row = first.k_row_bytes, first.v_row_bytes
        self.k_bytes, self.v_bytes = self.n_layer * self.k_row, self.n_layer * self.v_row  # per cell
        self.page = page
        self.limit_bytes = int(limit_mb * 2**20)
        self.spill_dir = spill_dir
        self._spill_file = None
        self._spill_map: mmap.mmap | None = None
        self._spill_size = 0
        self.clear()

    # --- contents -------------------------------------------------------------------------
    def clear(self) -> None:
        self._pages: dict[int, _Page] = {}
        # bounds, dense over slots 0..n_pages-1: [layer, kv head, slot, dim]
        self._center = np.zeros((self.n_layer, self.n_head_kv, 0, self.head_dim), np.float32)
        self._radius = np.zeros_like(self._center)
        self._slot_page: list[int] = []  # slot -> page id
        self._page_slot: dict[int, int] = {}
        self._mem_bytes = 0
        self.stats = StoreStats()
        self._close_spill()

    def close(self) -> None:
        self._close_spill()

    @property
    def n_pages(self) -> int:
        return len(self._pages)

    @property
    def nbytes(self) -> int:
        """Host memory held: rows in memory plus the bounds of every page."""
        return self._mem_bytes + 2 * self._center[:, :, : self.n_pages].nbytes

    @property
    def spilled_bytes(self) -> int:
        return self._spill_size

    @property
    def spill_path(self) -> str | None:
        """The spill file's path, once a page was spilled."""
        return None if self._spill_file is None else self._spill_file.name

    def page_ids(self) -> np.ndarray:
        return np.fromiter(self._pages, np.int64, len(self._pages))

    def __contains__(self, pid: int) -> bool:
        return pid in self._pages

    def page_size(self, pid: int) -> int:
        """Cells stored in page pid."""
        return self._pages[pid].n

    def stream_indices(self, pid: int) -> np.ndarray:
        """Stream indices of the cells stored in page pid, in stream order."""
        return self._pages[pid].stream_index.copy()

    # --- reading by slot (the scorers' view: slots 0..n_pages-1 are dense) --------------------
    def slot_pages(self) -> np.ndarray:
        """The page id of each slot."""
        return np.array(self._slot_page, np.int64)

    def slot_of(self, pid: int) -> int | None:
        return self._page_slot.get(pid)

    def bounds(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(centre, radius) of every slot's keys in `layer`, [kv head, slot, dim]: (max + min) / 2
        and (max - min) / 2, element-wise over the page's keys."""
        n = self.n_pages
        return self._center[layer, :, :n], self._radius[layer, :, :n]

    def keys(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The stored keys of the slots' pages, in the given order: (keys as float32 [token,
        layer, kv head, dim], their stream indices, the positions they were rotated at, the
        number of tokens per page)."""
        pages = [self._pages[self._slot_page[s]] for s in slots]
        keys = keys_as_float(np.concatenate([self._rows(p)[0] for p in pages]), self.type_k)
        sidx = np.concatenate([p.stream_index for p in pages])
        pos = np.concatenate([p.rot_pos for p in pages])
        sizes = np.array([p.n for p in pages], np.int64)
        return keys.reshape(-1, self.n_layer, self.n_head_kv, self.head_dim), sidx, pos, sizes

    def add(self, stream_index: np.ndarray, rot_pos: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Store n evicted cells: stream indices, positions their keys were rotated at, and their
        rows as `KVCache.read_rows` gives them ([layer][i][row])."""
        n = len(stream_index)
        if n == 0:
            return
        k = k.reshape(self.n_layer, n, self.k_row).transpose(1, 0, 2).reshape(n, -1)
        v = v.reshape(self.n_layer, n, self.v_row).transpose(1, 0, 2).reshape(n, -1)
        page_of = np.asarray(stream_index, np.int64) // self.page
        for pid in np.unique(page_of):
            sel = page_of == pid
            self._merge(int(pid), stream_index[sel], rot_pos[sel], k[sel], v[sel])
        self.stats.tokens_stored += n
        self._enforce_limit()

    def _merge(self, pid: int, sidx: np.ndarray, pos: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        old = self._pages.get(pid)
        if old is not None:
            ok, ov = self._rows(old)
            fresh = ~np.isin(sidx, old.stream_index)  # a cell stored twice keeps its first copy
            sidx = np.concatenate([old.stream_index, sidx[fresh]])
            pos, k, v = (np.concatenate([a, b[fresh]]) for a, b in ((old.rot_pos, pos), (ok, k), (ov, v)))
            self._forget_rows(old)
        order = np.argsort(sidx, kind="stable")
        page = _Page(
            sidx[order].astype(np.int64), pos[order].astype(np.int32), k[order].copy(), v[order].copy()
        )
        self._pages[pid] = page
        self._mem_bytes += page.k.nbytes + page.v.nbytes
        keys = keys_as_float(page.k, self.type_k).reshape(page.n, self.n_layer, self.n_head_kv, self.head_dim)
        lo, hi = keys.min(axis=0), keys.max(axis=0)  # [layer, kv head, dim]
        slot = self._page_slot.get(pid)
        if slot is None:
            slot = self._new_slot(pid)
        self._center[:, :, slot] = (hi + lo) / 2
        self._radius[:, :, slot] = (hi - lo) / 2

    def _new_slot(self, pid: int) -> int:
        slot = len(self._slot_page)
        if slot == self._center.shape[2]:
            grow = max(64, slot)
            pad = np.zeros((self.n_layer, self.n_head_kv, grow, self.head_dim), np.float32)
            self._center = np.concatenate([self._center, pad], axis=2)
            self._radius = np.concatenate([self._radius, pad], axis=2)
        self._slot_page.append(pid)
        self._page_slot[pid] = slot
        return slot

    def _drop(self, pid: int) -> None:
        page = self._pages.pop(pid)
        self._forget_rows(page)
        slot = self._page_slot.pop(pid)
        last = len(self._slot_page) - 1
        if slot != last:  # keep the slots dense: the last one moves into the hole
            moved = self._slot_page[last]
            self._center[:, :, slot] = self._center[:, :, last]
            self._radius[:, :, slot] = self._radius[:, :, last]
            self._slot_page[slot] = moved
            self._page_slot[moved] = slot
        self._slot_page.pop()
        self.stats.pages_dropped += 1

    def _forget_rows(self, page: _Page) -> None:
        if page.k is not None:
            self._mem_bytes -= page.k.nbytes + page.v.nbytes

    # --- saving ------------------------------------------------------------------------------
    def export(self) -> dict[str, np.ndarray]:
        """Every stored cell, page by page in slot order: stream index, rotation position and rows
        ([n, layers * row]; spilled pages read back), so that `load` rebuilds the same store."""
        pages = [self._pages[pid] for pid in self._slot_page]
        rows = [self._rows(p) for p in pages]
        stats = self.stats
        return {
            "page_sizes": np.array([p.n for p in pages], np.int64),
            "stream_index": np.concatenate([p.stream_index for p in pages] or [np.zeros(0, np.int64)]),
            "rot_pos": np.concatenate([p.rot_pos for p in pages] or [np.zeros(0, np.int32)]),
            "k": np.concatenate([k for k, _ in rows] or [np.zeros((0, self.k_bytes), np.uint8)]),
            "v": np.concatenate([v for _, v in rows] or [np.zeros((0, self.v_bytes), np.uint8)]),
            "stats": np.array([stats.pages_dropped, stats.pages_spilled, stats.tokens_stored], np.int64),
        }

    def load(self, state: dict[str, np.ndarray]) -> None:
        """Replace the contents with what `export` gave; checked first, so a ValueError changes
        nothing."""
        sizes, sidx = state["page_sizes"], state["stream_index"]
        n = len(sidx)
        if (
            sizes.sum() != n
            or len(state["rot_pos"]) != n
            or state["k"].shape != (n, self.k_bytes)
            or state["v"].shape != (n, self.v_bytes)
            or state["stats"].shape != (3,)
        ):
            raise ValueError("the saved recall store does not fit this cache's rows")
        bounds = np.cumsum(sizes)[:-1]
        names = ("stream_index", "rot_pos", "k", "v")
        groups = [np.split(state[name], bounds) if len(sizes) else [] for name in names]
        if any(len(g) == 0 or len(np.unique(g // self.page)) != 1 for g in groups[0]):
            raise ValueError("the saved recall store has pages that span page boundaries")
        self.clear()
        for page_sidx, pos, k, v in zip(*groups):
            self._merge(int(page_sidx[0]) // self.page, page_sidx, pos, k, v)
        self.stats = StoreStats(*(int(x) for x in state["stats"]))
        self._enforce_limit()

    # --- bounded memory -----------------------------------------------------------------------
    def _enforce_limit(self) -> None:
        if self.nbytes <= self.limit_bytes:
            return
        for pid in sorted(self._pages):  # oldest first
            if self.nbytes <= self.limit_bytes:
                return
            page = self._pages[pid]
            if self.spill_dir is not None and page.k is not None:
                self._spill(page)
            elif self.spill_dir is None:
                self._drop(pid)
        # spilled pages still hold their bounds in memory: drop the oldest of them if need be
        for pid in sorted(self._pages):
            if self.nbytes <= self.limit_bytes:
                return
            self._drop(pid)

    def _spill(self, page: _Page) -> None:
        if self._spill_file is None:
            self._spill_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the store
                prefix="infmllm-recall-", suffix=".spill", dir=self.spill_dir
            )
        data = page.k.tobytes() + page.v.tobytes()
        self._spill_file.seek(self._spill_size)
        self._spill_file.write(data)
        self._spill_file.flush()
        page.spill = (self._spill_size, len(data), zlib.crc32(data))
        self._spill_size += len(data)
        self._forget_rows(page)
        page.k = page.v = None
        self.stats.pages_spilled += 1

    def _rows(self, page: _Page) -> tuple[np.ndarray, np.ndarray]:
        if page.k is not None:
            return page.k, page.v
        offset, size, crc = page.spill
        if self._spill_map is None or len(self._spill_map) < offset + size:
            if self._spill_map is not None:
                self._spill_map.close()
            if os.fstat(self._spill_file.fileno()).st_size < offset + size:
                raise RecallError(f"the spill file {self._spill_file.name} is truncated")
            self._spill_map = mmap.mmap(self._spill_file.fileno(), 0, access=mmap.ACCESS_READ)
        data = self._spill_map[offset : offset + size]
        if zlib.crc32(data) != crc:
            raise RecallError(
                f"the spill file {self._spill_file.name} is corrupt (a page fails its checksum)"
            )
        kb = page.n * self.n_layer * self.k_row
        k = np.frombuffer(data[:kb], np.uint8).reshape(page.n, -1)
        v = np.frombuffer(data[kb:], np.uint8).reshape(page.n, -1)
        return k, v

    def _close_spill(self) -> None:
        if self._spill_map is not None:
            self._spill_map.close()
            self._spill_map = None
        if self._spill_file is not None:
            self._spill_file.close()  # a NamedTemporaryFile: deleted on close
            self._spill_file = None
        self._spill_size = 0

    def rows(
        self, pids: list[int], exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(stream index, rotation position, K, V) of the pages' cells in stream order, less those
        whose stream index is in `exclude`; K and V in `KVCache.write_rows`' layout
        ([layer][i][row])."""
        pages = sorted((self._pages[p] for p in pids), key=lambda p: p.stream_index[0])
        if not pages:
            empty = np.zeros(0, np.uint8)
            return np.zeros(0, np.int64), np.zeros(0, np.int32), empty, empty
        kv = [self._rows(p) for p in pages]
        sidx = np.concatenate([p.stream_index for p in pages])
        take = np.ones(len(sidx), bool) if exclude is None else ~np.isin(sidx, exclude)
        pos = np.concatenate([p.rot_pos for p in pages])[take]
        n = int(take.sum())
        k = np.concatenate([k for k, _ in kv])[take].reshape(n, self.n_layer, self.k_row).transpose(1, 0, 2)
        v = np.concatenate([v for _, v in kv])[take].reshape(n, self.n_layer, self.v_row).transpose(1, 0, 2)
        return sidx[take], pos, np.ascontiguousarray(k).ravel(), np.ascontiguousarray(v).ravel()
