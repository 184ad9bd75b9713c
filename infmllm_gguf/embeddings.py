"""Embeddings from a context of their own, so that embedding a text never touches the stream.

The context shares the stream's model (no second copy of the weights), has embeddings on and
one sequence per input of a batch, and is cleared after every batch, as llama-cpp-python's
`Llama.embed` does: with the same model and pooling the vectors are the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from infmllm_gguf._llama_cpp import llama_cpp as lc
from infmllm_gguf._llama_cpp._internals import LlamaBatch, LlamaContext, LlamaModel

__all__ = ["Embedder"]

Vector = list[float]


class Embedder:
    """Pooled vectors (one per input) or, for pooling NONE (most causal LMs), one per token."""

    def __init__(self, model: LlamaModel, like: Any, pooling_type: int, verbose: bool):
        """like: the stream's llama_context_params (batch, threads and flash attention are taken)."""
        # a whole number of 256-cell pages: llama.cpp's pooled graphs fail to reserve otherwise
        n_batch = -(-like.n_batch // 256) * 256
        params = lc.llama_context_default_params()
        params.flash_attn_type = like.flash_attn_type
        params.n_ctx = params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = min(n_batch, lc.llama_max_parallel_sequences())
        params.kv_unified = True
        params.n_threads, params.n_threads_batch = like.n_threads, like.n_threads_batch
        params.embeddings = True
        params.pooling_type = pooling_type
        params.no_perf = True
        self.n_batch = n_batch
        self.n_seq_max = params.n_seq_max
        self.n_embd = lc.llama_model_n_embd(model.model)
        self._ctx = LlamaContext(model=model, params=params, verbose=verbose)
        self._batch = LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=self.n_seq_max, verbose=verbose)
        self.pooling_type = lc.llama_pooling_type(self._ctx.ctx)

    def embed(self, inputs: list[list[int]], normalize: bool) -> list[Any]:
        """Vectors of token lists (each at most n_batch tokens), batched several inputs at a time.

        Every input is checked before the batch is touched, and the batch is emptied on every
        path: tokens of a refused or failed call never reach the next one."""
        for tokens in inputs:
            if not tokens:
                raise ValueError("an input tokenises to no tokens")
            if len(tokens) > self.n_batch:
                raise ValueError(f"an input of {len(tokens)} tokens exceeds n_batch ({self.n_batch})")
        out: list[Any] = []
        group: list[int] = []
        try:
            for tokens in inputs:
                if sum(group) + len(tokens) > self.n_batch or len(group) >= self.n_seq_max:
                    out += self._decode(group, normalize)
                    group = []
                self._batch.add_sequence(tokens, len(group), True)
                group.append(len(tokens))
            return out + self._decode(group, normalize)
        finally:
            self._batch.reset()

    def _decode(self, sizes: list[int], normalize: bool) -> list[Any]:
        if not sizes:
            return []
        try:
            self._ctx.kv_cache_clear()
            self._ctx.decode(self._batch)
        finally:
            self._batch.reset()
        ctx = self._ctx.ctx
        if self.pooling_type == lc.LLAMA_POOLING_TYPE_NONE:
            rows = np.ctypeslib.as_array(lc.llama_get_embeddings(ctx), shape=(sum(sizes), self.n_embd))
            ends = np.cumsum(sizes)
            return [[_vector(row, normalize) for row in rows[end - n : end]] for n, end in zip(sizes, ends)]
        pooled = [lc.llama_get_embeddings_seq(ctx, i) for i in range(len(sizes))]
        return [_vector(np.ctypeslib.as_array(p, shape=(self.n_embd,)), normalize) for p in pooled]

    def close(self) -> None:
        self._batch.close()
        self._ctx.close()


def _vector(row: np.ndarray, normalize: bool) -> Vector:
    v = row.astype(np.float64)
    if normalize:
        norm = np.linalg.norm(v)
        v = v / norm if norm > 0 else v
    return v.tolist()
