"""`Generation`: one reply being generated in a session, a piece of text at a time.

Each step samples a token from the session's latest logits, feeds it to the stream and turns
it into text: stop strings are matched on the text (held back while they could still begin),
end-of-generation tokens and llama-cpp-python's stopping criteria end the reply, and log-probs
are reported with the step whose text completes their token.  `sample` and `advance` are the
two halves of a step, so that a loop over several sessions can decode their tokens together.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from infmllm_gguf.responses import (
    StoppingCriterion,
    TokenLogprob,
    completion_head,
    completion_logprobs,
    criteria_list,
)
from infmllm_gguf.sampling import (
    LlamaGrammar,
    Sampler,
    SamplingParams,
    grammar_for_response_format,
    log_softmax,
    top_logprobs,
)
from infmllm_gguf.stops import StopMatcher
from infmllm_gguf.stream import StopGeneration
from infmllm_gguf.vision import Part

if TYPE_CHECKING:
    from infmllm_gguf.session import Session

__all__ = ["Completion", "Generation", "Step", "chat_grammar", "check_completion_args"]


@dataclass
class Step:
    """A piece of generated text, the finish reason once there is one, and the tokens (with
    log-probs, when asked for) whose text the pieces handed out so far complete."""

    text: str
    finish: str | None
    tokens: list[TokenLogprob]


class Generation:
    """Up to max_tokens more tokens of session's stream; iterating yields `Step`s and closes the
    sampler at the end, however the iteration ends."""

    def __init__(
        self,
        session: Session,
        sampler: Sampler,
        max_tokens: int,
        stops: list[str],
        n_logprobs: int | None = None,
        criteria: Sequence[StoppingCriterion] = (),
    ):
        self.session, self.sampler, self.max_tokens = session, sampler, max_tokens
        self.n_logprobs, self.criteria = n_logprobs, criteria
        self.matcher = StopMatcher(stops)
        self.records: list[TokenLogprob] = []
        self._released = 0  # records handed out with earlier steps
        self._pending = b""  # bytes of a character whose rest is still to come
        self._n_chars = 0

    def __iter__(self) -> Iterator[Step]:
        stream = self.session.stream
        try:
            if stream.last_logits is None:
                raise ValueError("nothing to continue from: feed text first")
            stream.recall_turn()
            for _ in range(self.max_tokens):
                if stream.poll is not None:
                    try:
                        stream.poll()
                    except StopGeneration:
                        break  # ends as "length", like max_tokens
                logits = stream.last_logits
                token = self.sample()
                if any(criterion(stream.history, logits) for criterion in self.criteria):
                    yield self._step(self.matcher.flush(), "stop")
                    return
                stream.feed(np.array([token], np.int32))
                step = self.advance(token, logits)
                if step is not None:
                    yield step
                    if step.finish:
                        return
            yield self._step(self.matcher.flush(), "length")
        finally:
            self.sampler.close()

    def sample(self) -> int:
        """The next token, from the stream's latest logits."""
        stream = self.session.stream
        return self.sampler.sample(stream.last_logits, stream.history)

    def advance(self, token: int, logits: np.ndarray) -> Step | None:
        """Account for token, now fed (sampled from logits): the step it completes, if any."""
        engine = self.session.engine
        if engine.is_eog(token):
            return self._step(self.matcher.flush(), "stop")
        raw = engine.piece(token)
        self._pending += raw
        try:
            piece = self._pending.decode("utf-8")
            self._pending = b""
        except UnicodeDecodeError:
            piece = ""  # the rest of a multi-byte character is still to come
        start = self._n_chars
        self._n_chars += len(piece)
        if self.n_logprobs is not None:
            self.records.append(self._logprob(token, raw, logits, start, self._n_chars))
        if not piece:
            return None
        safe, hit = self.matcher.push(piece)
        if hit:
            return self._step(safe, "stop")
        return self._step(safe, None) if safe else None

    def _step(self, text: str, finish: str | None) -> Step:
        start = self._released
        while self._released < len(self.records) and self.records[self._released].end <= self.matcher.emitted:
            self._released += 1
        return Step(text, finish, self.records[start : self._released])

    def _logprob(self, token: int, raw: bytes, logits: np.ndarray, start: int, end: int) -> TokenLogprob:
        """log p of the sampled token and of the n likeliest, from the raw logits (before any
        penalty, bias or grammar), as llama-cpp-python reports them."""
        piece = self.session.engine.piece
        logprobs = log_softmax(logits)
        text = raw.decode("utf-8", "ignore")
        top = {
            piece(t).decode("utf-8", "ignore"): float(logprobs[t])
            for t in top_logprobs(logprobs, self.n_logprobs)
        }
        top[text] = float(logprobs[token])
        return TokenLogprob(text, start, end, float(logprobs[token]), top)


@dataclass
class Completion:
    """A text completion: the prompt's parts fed, then the generation run, shaped as OpenAI's
    response (`result`) or its chunks (`chunks`).  Either is one member of the engine's steps from
    the prompt to the last token (`Session.generating`); a prompt that fails to feed leaves the
    session's seed at `seed`."""

    generation: Generation
    seed: int
    parts: list[Part]
    head: dict
    prefix: str = ""  # an echoed prompt
    text_offset: int = 0  # where the generated text starts, for log-probs' text_offset

    @classmethod
    def create(
        cls,
        session: Session,
        parts: list[Part],
        max_tokens: int | None,
        params: SamplingParams,
        stops: list[str],
        *,
        last_n_tokens: int,
        model: str,
        prefix: str = "",
        n_logprobs: int | None = None,
        text_offset: int = 0,
        stopping_criteria: StoppingCriterion | Iterable[StoppingCriterion] | None = None,
    ) -> Completion:
        """A completion with every argument checked (and the sampler made) before anything is
        fed; max_tokens None or <= 0: until the context is full, as llama-cpp-python has it."""
        if max_tokens is None or (isinstance(max_tokens, int) and max_tokens <= 0):
            max_tokens = session.engine.n_ctx
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise ValueError(f"max_tokens must be an integer or None, got {max_tokens!r}")
        n_vocab = session.engine.n_vocab
        if n_logprobs is not None and (
            isinstance(n_logprobs, bool) or not isinstance(n_logprobs, int) or not 0 <= n_logprobs <= n_vocab
        ):
            raise ValueError(f"logprobs must be an integer in [0, {n_vocab}], got {n_logprobs!r}")
        criteria = criteria_list(stopping_criteria)
        seed = session.seed
        sampler = session.sampler(params, last_n_tokens)
        generation = Generation(session, sampler, max_tokens, stops, n_logprobs, criteria)
        return cls(generation, seed, parts, completion_head(model), prefix, text_offset)

    def _logprobs(self, tokens: list[TokenLogprob]) -> dict | None:
        return None if self.generation.n_logprobs is None else completion_logprobs(tokens, self.text_offset)

    def result(self) -> dict:
        session = self.generation.session
        n_prompt = sum(len(p) for p in self.parts)
        with session.generating():
            session.begin(self.parts, self.generation.sampler, self.seed)
            n_before = session.stream.n_streamed
            pieces, tokens, finish = [], [], "length"
            for step in self.generation:
                pieces.append(step.text)
                tokens += step.tokens
                finish = step.finish or finish
            n_gen = session.stream.n_streamed - n_before
        choice = {"text": self.prefix + "".join(pieces), "index": 0, "logprobs": self._logprobs(tokens)}
        return {
            **self.head,
            "choices": [{**choice, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": n_prompt,
                "completion_tokens": n_gen,
                "total_tokens": n_prompt + n_gen,
            },
        }

    def chunks(self) -> Iterator[dict]:
        session = self.generation.session
        with session.generating():
            session.begin(self.parts, self.generation.sampler, self.seed)
            if self.prefix:
                choice = {"text": self.prefix, "index": 0, "logprobs": None, "finish_reason": None}
                yield {**self.head, "choices": [choice]}
            for step in self.generation:
                if step.text or step.finish:
                    choice = {"text": step.text, "index": 0, "finish_reason": step.finish}
                    yield {**self.head, "choices": [{**choice, "logprobs": self._logprobs(step.tokens)}]}


def check_completion_args(suffix: str | None, echo: bool, logprobs: int | None) -> None:
    """Refuse the llama-cpp-python completion arguments a stream cannot honour."""
    if suffix is not None:
        raise ValueError("suffix (fill-in-the-middle) is not supported: a stream only grows at its end")
    if echo and logprobs is not None:
        raise ValueError(
            "echo with logprobs is not supported: the prompt's earlier tokens may be evicted; "
            "stream_logprobs() gives log p of fed tokens"
        )


def chat_grammar(
    tool_calling: bool,
    logprobs: bool | None,
    top_logprobs: int | None,
    grammar: LlamaGrammar | str | None,
    response_format: dict | None,
) -> LlamaGrammar | str | None:
    """The grammar a chat completion samples under (given, or its JSON response_format's), after
    refusing the combinations of chat arguments that cannot be honoured."""
    if tool_calling:
        raise ValueError("tool and function calling is not supported; describe the tools in a message")
    if top_logprobs is not None and not logprobs:
        raise ValueError("top_logprobs needs logprobs=True")
    format_grammar = grammar_for_response_format(response_format)
    if format_grammar is not None and grammar is not None:
        raise ValueError("give grammar or a JSON response_format, not both")
    return grammar or format_grammar
