"""Token sampling through llama.cpp's sampler chain, configured as llama-cpp-python configures it.

A `Sampler` is built once per generation, so the penalties see the tokens generated in it and
the distribution sampler's RNG runs on from one token to the next; it is applied to the
stream's logits rather than to a context's output row, because after an eviction the logits
that matter are the stream's.  With the same logits, parameters and seed it picks the tokens
llama-cpp-python's `Llama` picks.
"""

from __future__ import annotations

import ctypes
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from infmllm_gguf._llama_cpp import llama_cpp as lc
from infmllm_gguf._llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar, json_schema_to_gbnf
from infmllm_gguf.grammar import check_grammar, check_schema
from infmllm_gguf.params import check_int

__all__ = [
    "LlamaGrammar",
    "LogitsProcessor",
    "Sampler",
    "SamplingParams",
    "grammar_for_response_format",
    "log_softmax",
    "top_logprobs",
]

# (input_ids, scores) -> scores, as llama-cpp-python's LogitsProcessorList items
LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]
GrammarLike = Union[LlamaGrammar, str]

# llama_token_data {int32 id; float logit; float p}, laid out as the C struct
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
assert _TOKEN_DATA.itemsize == ctypes.sizeof(lc.llama_token_data)

MIROSTAT_M = 100  # candidates mirostat v1 estimates s_hat from (llama-cpp-python's value)
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class SamplingParams:
    """What picks the next token.  temperature 0 is greedy, below 0 samples the raw
    distribution; mirostat_mode 1 or 2 replaces the top-k/typical/top-p/min-p/temperature
    stage.  Penalties apply to the tokens generated in the same call, as in llama-cpp-python."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    mirostat_mode: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    logit_bias: dict[int, float] | None = None
    grammar: GrammarLike | None = None
    logits_processor: Sequence[LogitsProcessor] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "frequency_penalty", "presence_penalty", "mirostat_tau", "mirostat_eta"):
            _check_finite(name, getattr(self, name))
        for name in ("top_p", "min_p", "typical_p"):
            value = getattr(self, name)
            _check_finite(name, value)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        _check_finite("repeat_penalty", self.repeat_penalty)
        if self.repeat_penalty <= 0:
            raise ValueError(f"repeat_penalty must be > 0 (1 = off), got {self.repeat_penalty!r}")
        check_int("top_k", self.top_k, 0)
        if self.mirostat_mode not in (0, 1, 2):
            raise ValueError(f"mirostat_mode must be 0, 1 or 2, got {self.mirostat_mode!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.grammar is not None and not isinstance(self.grammar, (LlamaGrammar, str)):
            raise ValueError(f"grammar must be a LlamaGrammar or a GBNF string, got {type(self.grammar)}")
        if self.logits_processor is not None and not all(callable(p) for p in self.logits_processor):
            raise ValueError("logits_processor must be a list of callables (input_ids, scores) -> scores")
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (AttributeError, TypeError, ValueError) as exc:
                raise ValueError(f"logit_bias must map token ids to numbers: {exc}") from exc
            if any(math.isnan(v) or v > FLOAT32_MAX for v in self.logit_bias.values()):
                # +inf would make every probability NaN; -inf bans a token, as in llama-cpp-python
                raise ValueError(f"logit_bias values must be numbers up to {FLOAT32_MAX:.3g} (or -inf)")


def _check_finite(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


class Sampler:
    """One generation's llama.cpp sampler chain; `close()` frees it (also on garbage collection).

    Chain order is llama-cpp-python's: logits processors (in Python, on a copy of the logits),
    logit bias, penalties, grammar, then greedy (temperature 0), the raw distribution
    (temperature < 0), mirostat, or top-k → typical → top-p → min-p → temperature → dist."""

    def __init__(self, params: SamplingParams, vocab: Any, n_vocab: int, seed: int, penalty_last_n: int):
        self.params = params
        self.n_vocab = n_vocab
        self._chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        self._data = np.empty(n_vocab, _TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        try:
            self._build(params, vocab, seed & 0xFFFFFFFF, penalty_last_n)
        except BaseException:
            self.close()
            raise

    def _add(self, sampler: Any, what: str) -> None:
        if not sampler:
            raise ValueError(f"llama.cpp refused the {what} sampler")
        lc.llama_sampler_chain_add(self._chain, sampler)

    def _build(self, p: SamplingParams, vocab: Any, seed: int, penalty_last_n: int) -> None:
        if p.logit_bias:
            bad = [t for t in p.logit_bias if not 0 <= t < self.n_vocab]
            if bad:
                raise ValueError(f"logit_bias token ids must be in [0, {self.n_vocab}), got {bad[:5]}")
            bias = (lc.llama_logit_bias * len(p.logit_bias))()
            for i, (token, value) in enumerate(p.logit_bias.items()):
                bias[i].token, bias[i].bias = token, value
            self._add(lc.llama_sampler_init_logit_bias(self.n_vocab, len(bias), bias), "logit_bias")
        self._add(
            lc.llama_sampler_init_penalties(
                self.n_vocab, penalty_last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty
            ),
            "penalties",
        )
        if p.grammar is not None:
            grammar = p.grammar
            if isinstance(grammar, str):
                grammar = LlamaGrammar.from_string(grammar)
            check_grammar(grammar._grammar)
            sampler = lc.llama_sampler_init_grammar(
                vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
            )
            if not sampler:
                raise ValueError("the grammar does not parse (llama.cpp's log names the error)")
            self._add(sampler, "grammar")
        if p.temperature < 0:
            self._add(lc.llama_sampler_init_dist(seed), "dist")
        elif p.temperature == 0:
            self._add(lc.llama_sampler_init_greedy(), "greedy")
        elif p.mirostat_mode == 1:
            self._add(
                lc.llama_sampler_init_mirostat(
                    self.n_vocab, seed, p.mirostat_tau, p.mirostat_eta, MIROSTAT_M
                ),
                "mirostat",
            )
        elif p.mirostat_mode == 2:
            self._add(lc.llama_sampler_init_mirostat_v2(seed, p.mirostat_tau, p.mirostat_eta), "mirostat_v2")
        else:
            self._add(lc.llama_sampler_init_top_k(p.top_k), "top_k")
            self._add(lc.llama_sampler_init_typical(p.typical_p, 1), "typical")
            self._add(lc.llama_sampler_init_top_p(p.top_p, 1), "top_p")
            self._add(lc.llama_sampler_init_min_p(p.min_p, 1), "min_p")
            self._add(lc.llama_sampler_init_temp(p.temperature), "temp")
            self._add(lc.llama_sampler_init_dist(seed), "dist")

    def sample(self, logits: np.ndarray, input_ids: np.ndarray) -> int:
        """The next token from one row of logits; input_ids (the stream so far) go to the
        logits processors.  The chain then accepts the token (penalties, grammar, mirostat)."""
        scores = logits
        for processor in self.params.logits_processor or ():
            scores = np.asarray(processor(input_ids, scores.copy()), np.float32)
            if scores.shape != (self.n_vocab,):
                raise ValueError(f"a logits processor returned shape {scores.shape}, not ({self.n_vocab},)")
        data = self._data
        data["id"] = self._ids  # the chain reorders the array in place: every step starts afresh
        data["logit"] = scores
        data["p"] = 0.0
        cur = lc.llama_token_data_array(
            data=data.ctypes.data_as(lc.llama_token_data_p), size=self.n_vocab, selected=-1, sorted=False
        )
        lc.llama_sampler_apply(self._chain, ctypes.byref(cur))
        # a chain whose grammar or bias excluded every token still selects one, at -inf (or NaN):
        # refuse it here, before the grammar is asked to accept a token it forbids (an abort)
        if not 0 <= cur.selected < cur.size or not cur.data[cur.selected].logit > -math.inf:
            raise ValueError("no token is left to sample (a grammar or logit bias excludes them all)")
        token = int(cur.data[cur.selected].id)
        lc.llama_sampler_accept(self._chain, token)
        return token

    def close(self) -> None:
        if getattr(self, "_chain", None):
            lc.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self) -> None:
        self.close()


def grammar_for_response_format(response_format: dict | None) -> LlamaGrammar | None:
    """The grammar of an OpenAI `response_format`: {"type": "json_object"} (any JSON, or the
    given "schema"), {"type": "json_schema", "json_schema": {"schema": ...}}, or {"type": "text"}."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise ValueError(f"response_format must be a dict with a 'type', got {response_format!r}")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError("response_format json_schema needs {'json_schema': {'schema': {...}}}")
        schema = spec["schema"]
    else:
        raise ValueError(f"response_format type must be text, json_object or json_schema, got {kind!r}")
    if schema is None:
        return LlamaGrammar.from_string(JSON_GBNF)
    check_schema(schema)
    try:
        text = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises bare Exceptions on schemas it cannot express
        raise ValueError(f"cannot turn this JSON schema into a grammar: {exc}") from exc
    check_grammar(text)
    return LlamaGrammar.from_string(text)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the vocabulary from one row of raw logits (float64)."""
    x = logits.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def top_logprobs(logprobs: np.ndarray, n: int) -> list[int]:
    """The n most likely token ids, most likely first."""
    if n <= 0:
        return []
    top = np.argpartition(-logprobs, n - 1)[:n]
    return [int(t) for t in top[np.argsort(-logprobs[top], kind="stable")]]
