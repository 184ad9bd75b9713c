"""Hostile input at the library's native edges: grammars (the parser's bounds, ours and the
patched llama.cpp's), samplers left with no token, the embeddings batch, token ids.  Each case
is a clear ValueError and the session goes on; the sanitizer build runs this file too."""

from __future__ import annotations

import numpy as np
import pytest
from infmllm_gguf._llama_cpp import llama_cpp as lc

from infmllm_gguf import Llama
from infmllm_gguf.grammar import MAX_GRAMMAR_NESTING, MAX_SCHEMA_REPETITION, GrammarError, check_grammar
from infmllm_gguf.sampling import grammar_for_response_format


@pytest.fixture(scope="module")
def llm(model_path):
    llm = Llama(model_path, n_ctx=512, n_batch=256, kv_policy="infmllm", embedding=True, n_threads=2, seed=3)
    yield llm
    llm.close()


def nested(depth: int) -> str:
    return "root ::= " + "(" * depth + '"a"' + ")" * depth


def chain(n: int) -> str:
    return "root ::= r0\n" + "".join(f"r{i} ::= r{i + 1}\n" for i in range(n)) + f'r{n} ::= "a"\n'


@pytest.mark.parametrize("grammar", [nested(20_000), nested(1100), chain(20_000)])
def test_the_patched_parser_refuses_what_would_overflow_its_stack(llm, grammar):
    """Called directly, past our Python checks: llama.cpp refuses (NULL), it does not crash."""
    assert not lc.llama_sampler_init_grammar(llm.vocab, grammar.encode(), b"root")


def test_the_parser_still_takes_deep_but_bounded_grammars(llm):
    sampler = lc.llama_sampler_init_grammar(llm.vocab, nested(1000).encode(), b"root")
    assert sampler
    lc.llama_sampler_free(sampler)


def test_grammar_checks_come_before_any_native_call():
    check_grammar(nested(MAX_GRAMMAR_NESTING))
    check_grammar('root ::= "((((" [(] # ((((\n')  # parentheses in strings, classes, comments
    for bad in (nested(MAX_GRAMMAR_NESTING + 1), 'root ::= "a"\n' + "#\n" * 200_000, b"root"):
        with pytest.raises(GrammarError):
            check_grammar(bad)
    for schema in (
        {"type": "string", "maxLength": MAX_SCHEMA_REPETITION + 1},
        {"type": "array", "minItems": 10**12},
        {"type": "string", "pattern": "x{3,99999}"},
        {"type": "object", "properties": {"a": {"type": "string", "minLength": True}}},
    ):
        with pytest.raises(GrammarError):
            grammar_for_response_format({"type": "json_object", "schema": schema})
    ok = grammar_for_response_format({"type": "json_object", "schema": {"type": "string", "maxLength": 400}})
    check_grammar(ok._grammar)


def test_no_token_left_to_sample_is_a_value_error_not_an_abort(llm):
    bias = {t: -float("inf") for t in range(llm.n_vocab())}
    for kw in ({"grammar": 'root ::= "yes" | "no"'}, {}):
        with pytest.raises(ValueError, match="no token is left"):
            llm.create_completion("Yes or no?", max_tokens=3, logit_bias=bias, **kw)
    with pytest.raises(ValueError, match="logit_bias"):
        llm.create_completion("x", max_tokens=1, logit_bias={5: 1e39})  # +inf as a float32
    reply = llm.create_completion("Yes or no?", max_tokens=2, grammar='root ::= "yes" | "no"', temperature=0)
    assert reply["choices"][0]["text"] in ("yes", "no")


def test_refused_embedding_inputs_leave_the_batch_empty(llm):
    long = "word " * 300  # past n_batch (256)
    alone = llm.embed(["hello"])
    with pytest.raises(ValueError):
        llm.engine.embedder.embed([[1] * 10, []], False)  # the second is refused before the batch is touched
    with pytest.raises(ValueError):
        llm.engine.embedder.embed([[1] * 10, [1] * 10_000], False)
    assert llm.embed([long])  # truncated to n_batch
    assert np.allclose(llm.embed(["hello"]), alone)
    both = llm.embed(["hello", long, "hello"])
    assert np.allclose(both[0], alone[0]) and np.allclose(both[2], alone[0])


@pytest.mark.parametrize("tokens", [[2**32], [-1], [49152], [1, 2.5], [True], ["7"]])
def test_bad_token_ids_are_value_errors(llm, tokens):
    n = llm.n_streamed
    with pytest.raises(ValueError, match="token ids"):
        llm.create_completion(tokens, max_tokens=1)
    assert llm.n_streamed == n
    assert llm.create_completion([1, 504, 3037], max_tokens=1)["choices"]
