"""infmllm-gguf: endless streaming inference in a fixed-size llama.cpp KV cache.

Importing checks that the bundled libllama carries our patches (ImportError otherwise).
"""

from infmllm_gguf import _native  # noqa: F401  (refuses an unpatched libllama)
from infmllm_gguf.info import Device, build_info, devices
from infmllm_gguf.llama import ContextFullError, HistoryDivergedError, InvariantError, Llama, StopGeneration
from infmllm_gguf.models import default_model_path
from infmllm_gguf.policies import (
    H2O,
    POLICIES,
    EvictingPolicy,
    FullCache,
    InfMLLM,
    KVPolicy,
    SlidingWindow,
    SnapKV,
    StreamingLLM,
)
from infmllm_gguf.recall import Recall, RecallError
from infmllm_gguf.sampling import LlamaGrammar, SamplingParams
from infmllm_gguf.state import LlamaState, StateError

__version__ = "0.1.0"

__all__ = [
    "H2O",
    "POLICIES",
    "Recall",
    "RecallError",
    "ContextFullError",
    "Device",
    "EvictingPolicy",
    "FullCache",
    "HistoryDivergedError",
    "InfMLLM",
    "InvariantError",
    "KVPolicy",
    "Llama",
    "LlamaGrammar",
    "LlamaState",
    "SlidingWindow",
    "SamplingParams",
    "SnapKV",
    "StateError",
    "StopGeneration",
    "StreamingLLM",
    "__version__",
    "build_info",
    "default_model_path",
    "devices",
]
