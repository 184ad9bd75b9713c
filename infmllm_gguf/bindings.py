"""The bundled llama-cpp-python layer under public names, for tools that drive llama.cpp
directly or measure against llama-cpp-python itself (the benchmarks' plain baseline):
`llama_cpp`, its ctypes binding of libllama, and `LlamaCppPython`, its own `Llama`."""

from infmllm_gguf._llama_cpp import llama_cpp
from infmllm_gguf._llama_cpp.llama import Llama as LlamaCppPython

__all__ = ["LlamaCppPython", "llama_cpp"]
