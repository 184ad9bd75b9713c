"""The recall tier: evicted K/V rows wait in host memory and come back when the stream needs them.

What a policy evicts is copied out first and kept in pages of `page` stream tokens, each with
the element-wise min and max of its keys (`store.py`); a recall ranks the pages by a scorer
(`scorers.py`: the peak q·k, the full-cache attention share, the new text's matches, or two of
them in turn), picks the pages that stand out with their neighbours (`selection.py`) and
writes them back into a reserve of the budget, in stream order; `tier.py` is the controller a
stream calls.  docs/recall.md describes the rules and what they were measured to do.
"""

from infmllm_gguf.recall.config import Recall, RecallError
from infmllm_gguf.recall.scorers import (
    SCORERS,
    TEXT_GRAMS,
    AttentionScorer,
    InTurn,
    PeakScorer,
    Probe,
    Ranking,
    Scorer,
    TextScorer,
    make_scorer,
    max_less_mean,
    text_matches,
)
from infmllm_gguf.recall.selection import select, standing_out, with_neighbours, with_runs
from infmllm_gguf.recall.store import (
    GGML_TYPE_BF16,
    GGML_TYPE_F16,
    GGML_TYPE_F32,
    PageStore,
    StoreStats,
    keys_as_float,
)
from infmllm_gguf.recall.tier import RecallTier, one_blas_thread

__all__ = [
    "GGML_TYPE_BF16",
    "GGML_TYPE_F16",
    "GGML_TYPE_F32",
    "SCORERS",
    "TEXT_GRAMS",
    "AttentionScorer",
    "InTurn",
    "PageStore",
    "PeakScorer",
    "Probe",
    "Ranking",
    "Recall",
    "RecallError",
    "RecallTier",
    "Scorer",
    "StoreStats",
    "TextScorer",
    "keys_as_float",
    "make_scorer",
    "max_less_mean",
    "one_blas_thread",
    "select",
    "standing_out",
    "text_matches",
    "with_neighbours",
    "with_runs",
]
