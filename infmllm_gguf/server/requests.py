"""What a request body must be beyond its pydantic model (`schemas.py`): JSON that parses, the
model name where it is strict, and the limits that depend on the model or the configuration
(max_tokens, stop strings, logprobs, logit_bias token ids, grammars, the prompt's length).
These run in a worker thread, before the request reaches a session."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel

from infmllm_gguf.grammar import check_grammar
from infmllm_gguf.server.config import Limits
from infmllm_gguf.server.schemas import CHAT_ONLY, COMPLETION_ONLY, SAMPLING, ChatRequest, CompletionRequest

__all__ = ["BIAS_BOUND", "RequestChecks", "RequestError", "logit_bias"]

BIAS_BOUND = 100.0  # logit_bias values are clamped to [-100, 100], as OpenAI does
Body = TypeVar("Body", bound=BaseModel)


class RequestError(Exception):
    """A request refused with an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


@dataclass(frozen=True)
class RequestChecks:
    """The checks of one server: its limits, its model's name, context and vocabulary."""

    limits: Limits
    model_id: str
    strict_model_name: bool
    n_ctx: int
    n_vocab: int

    def parse(self, raw: bytes, model: type[Body]) -> Body:
        """The body as `model`: 400 for JSON that does not parse or is not an object (pydantic's
        ValidationError for fields), 404 for another model's name where names are strict."""
        try:
            body = json.loads(raw, parse_constant=_no_constant)
        except RecursionError:
            raise RequestError(400, "the JSON body nests too deeply") from None
        except ValueError as exc:
            raise RequestError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        request = model.model_validate(body)
        if request.model not in (None, self.model_id) and self.strict_model_name:
            message = f"model {request.model!r} does not exist; this server has {self.model_id!r}"
            raise RequestError(404, message, "model_not_found")
        return request

    def sampling(self, request: ChatRequest | CompletionRequest, chat: bool) -> dict[str, Any]:
        """The keyword arguments of create_chat_completion / create_completion, within the limits."""
        names = set(SAMPLING + (CHAT_ONLY if chat else COMPLETION_ONLY))
        kwargs = request.model_dump(include=names, exclude_none=True)
        if chat and request.max_completion_tokens is not None:
            kwargs["max_tokens"] = request.max_completion_tokens
        kwargs["max_tokens"] = self._max_tokens(kwargs.get("max_tokens") or 0)
        if "logit_bias" in kwargs:
            kwargs["logit_bias"] = logit_bias(kwargs["logit_bias"], self.n_vocab)
        self._check_stops(kwargs.get("stop", []))
        name = "top_logprobs" if chat else "logprobs"
        self._check_top_logprobs(name, kwargs.get(name))
        if "grammar" in kwargs:
            check_grammar(kwargs["grammar"])
        kwargs["model"] = self.model_id
        return kwargs

    def check_prompt(self, prompt: np.ndarray) -> np.ndarray:
        limit = self.limits.max_prompt_tokens
        if len(prompt) > limit:
            raise RequestError(400, f"the prompt has {len(prompt)} tokens; at most {limit} are taken")
        return prompt

    def _max_tokens(self, asked: int) -> int:
        """The tokens to generate: as asked (0: none said), at most the limit."""
        limit = self.limits.max_tokens
        if asked > limit:
            raise RequestError(400, f"max_tokens is {asked}; at most {limit} are generated")
        return asked or min(self.n_ctx, limit)

    def _check_stops(self, stop: str | list[str]) -> None:
        stops = [stop] if isinstance(stop, str) else stop
        n, chars = self.limits.max_stops, self.limits.max_stop_chars
        if len(stops) > n or any(len(s) > chars for s in stops):
            raise RequestError(400, f"at most {n} stop strings of {chars} characters each")

    def _check_top_logprobs(self, name: str, n_top: int | None) -> None:
        limit = self.limits.max_top_logprobs
        if n_top is not None and n_top > limit:
            raise RequestError(400, f"{name} must be at most {limit}, got {n_top}")


def logit_bias(bias: dict[str, float], n_vocab: int) -> dict[int, float]:
    """Token ids checked against the vocabulary, values clamped to [-100, 100] as OpenAI does."""
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise RequestError(400, f"logit_bias keys must be token ids, got {key!r}") from None
        if not 0 <= token < n_vocab:
            raise RequestError(400, f"logit_bias token ids must be in [0, {n_vocab}), got {token}")
        out[token] = min(BIAS_BOUND, max(-BIAS_BOUND, value))
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
