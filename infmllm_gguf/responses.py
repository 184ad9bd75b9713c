"""OpenAI's (and llama-cpp-python's) response shapes: completions, chat completions, their
streamed chunks and log-probs, the named chat formats, and the small argument conversions
the completion calls share.  Nothing here touches a model."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from infmllm_gguf._llama_cpp import llama_chat_format
from infmllm_gguf._llama_cpp.llama_chat_format import ChatFormatter, _convert_text_completion_logprobs_to_chat

__all__ = [
    "CHAT_FORMATS",
    "StoppingCriterion",
    "TokenLogprob",
    "chat_chunks",
    "chat_response",
    "completion_head",
    "completion_logprobs",
    "criteria_list",
    "stop_list",
]

# llama-cpp-python's named chat formats ("chatml", "llama-2", ...): each registered name whose
# formatter function (format_chatml, format_llama2, ...) the vendored module has
CHAT_FORMATS: dict[str, ChatFormatter] = {
    name: formatter
    for name in llama_chat_format.LlamaChatCompletionHandlerRegistry()._chat_handlers
    for fname, formatter in vars(llama_chat_format).items()
    if fname.startswith("format_") and fname[7:].replace("_", "") == name.replace("-", "").replace("_", "")
}

# (input_ids, logits) -> True to stop before the sampled token, as llama-cpp-python's StoppingCriteria
StoppingCriterion = Callable[[np.ndarray, np.ndarray], bool]


@dataclass
class TokenLogprob:
    """One generated token's log-probabilities: chars [start, end) of the generated text."""

    text: str
    start: int
    end: int
    logprob: float
    top: dict[str, float]


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def criteria_list(
    stopping_criteria: StoppingCriterion | Iterable[StoppingCriterion] | None,
) -> list[StoppingCriterion]:
    """One criterion (llama-cpp-python's StoppingCriteriaList is one) or several, as a list."""
    if stopping_criteria is None:
        return []
    criteria = [stopping_criteria] if callable(stopping_criteria) else list(stopping_criteria)
    if not all(callable(c) for c in criteria):
        raise ValueError("stopping_criteria must be callables (input_ids, logits) -> bool")
    return criteria


def completion_head(model: str) -> dict[str, Any]:
    """The fields every chunk of one completion shares."""
    return {
        "id": f"cmpl-{uuid.uuid4()}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
    }


def completion_logprobs(tokens: list[TokenLogprob], text_offset: int) -> dict:
    """llama-cpp-python's (and OpenAI's legacy completions') logprobs object."""
    return {
        "tokens": [t.text for t in tokens],
        "text_offset": [text_offset + t.start for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [t.top for t in tokens],
    }


def chat_response(result: dict) -> dict:
    """A chat completion from the text completion of its rendered prompt."""
    choice = result["choices"][0]
    return {
        "id": "chat" + result["id"],
        "object": "chat.completion",
        "created": result["created"],
        "model": result["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": choice["text"]},
                "logprobs": _convert_text_completion_logprobs_to_chat(choice["logprobs"]),
                "finish_reason": choice["finish_reason"],
            }
        ],
        "usage": result["usage"],
    }


def chat_chunks(chunks: Iterator[dict]) -> Iterator[dict]:
    """Chat completion chunks from a streamed text completion's: the first carries the role."""
    first = True
    for chunk in chunks:
        choice = chunk["choices"][0]
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        first = False
        if choice["text"]:
            delta["content"] = choice["text"]
        yield {
            "id": "chat" + chunk["id"],
            "object": "chat.completion.chunk",
            "created": chunk["created"],
            "model": chunk["model"],
            "choices": [
                {
                    "index": 0,
                    "delta": delta,
                    "logprobs": _convert_text_completion_logprobs_to_chat(choice["logprobs"]),
                    "finish_reason": choice["finish_reason"],
                }
            ],
        }


def embedding_response(vectors: list, n_tokens: int, model: str) -> dict[str, Any]:
    """OpenAI's embeddings response, as llama-cpp-python's `create_embedding` gives it."""
    return {
        "object": "list",
        "data": [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }
