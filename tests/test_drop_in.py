"""llama-cpp-python's own real-model scenarios (its tests/test_llama.py), run with our `Llama`.

The reference is llama-cpp-python's `Llama` itself, as vendored in this package, on the same
patched libllama and the same embedded model: where both see the same logits (a stream that has
not evicted yet) the tokens must be the same, greedy or seeded, for every sampler setting.
Expected texts are adapted to SmolLM2-135M; what each scenario asserts is kept.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from infmllm_gguf._llama_cpp import llama_cpp as lc
from infmllm_gguf._llama_cpp.llama import Llama as ReferenceLlama
from infmllm_gguf._llama_cpp.llama import LogitsProcessorList, StoppingCriteriaList

from infmllm_gguf import FullCache, InfMLLM, Llama, LlamaGrammar, Recall

# SmolLM2 copies the sentence once it has seen it twice (once: " is a classic example of a pun")
FOX = "The quick brown fox jumps over the lazy dog.\n" * 2 + "The quick brown fox"
NUMBER = LlamaGrammar.from_string('root ::= "1" | "2" | "3" | "4" | "5" | "6" | "7" | "8" | "9" | "10"')


@pytest.fixture(scope="module")
def ours(model_path):
    llm = Llama(model_path, n_ctx=512, kv_policy=FullCache(), n_threads=2)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def reference(model_path):
    llm = ReferenceLlama(model_path, n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    yield llm
    llm.close()


def text(out: dict) -> str:
    return out["choices"][0]["text"]


def fresh(*models: Llama | ReferenceLlama) -> None:
    """Start each model's next prompt from an empty stream: the logits then come from the same
    batches in both (a prompt's reused prefix changes how the rest is batched, which moves the
    logits by float rounding, enough to flip a sampled token now and then)."""
    for llm in models:
        llm.reset()


def test_greedy_completion_copies_the_sentence(ours):
    out = ours.create_completion(FOX, max_tokens=6, top_k=50, top_p=0.9, temperature=0.0, seed=1337)
    assert text(out) == " jumps over a lazy dog."
    again = ours.create_completion(FOX, max_tokens=6, temperature=0.0, seed=1337)  # repeated prompt
    assert text(again) == text(out)


SETTINGS = [
    {"temperature": 0.0},
    {"temperature": 0.8, "seed": 1337},
    {"temperature": 1.0, "seed": 5, "repeat_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": 0.4},
    {"temperature": 0.7, "seed": 3, "top_k": 10, "typical_p": 0.9, "min_p": 0.1},
    {"temperature": 1.2, "seed": 11, "top_k": 0, "top_p": 0.5},
    {"temperature": -1.0, "seed": 2},
    {"seed": 9, "mirostat_mode": 1},
    {"seed": 9, "mirostat_mode": 2, "mirostat_tau": 3.0},
    {"temperature": 0.0, "logit_bias": {"264": 4.0}},
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_same_tokens_as_llama_cpp_python(ours, reference, settings):
    fresh(ours, reference)
    prompt = "Once upon a time, in a small village,"
    mine = ours.create_completion(prompt, max_tokens=12, **settings)
    theirs = reference.create_completion(prompt, max_tokens=12, **settings)
    assert text(mine) == text(theirs)
    assert mine["usage"] == theirs["usage"]


def test_same_seed_same_text_in_a_session_of_seeds(ours, reference):
    """Without a per-call seed, both derive each call's seed from the session's."""
    fresh(ours, reference)
    ours.set_seed(42)
    reference.set_seed(42)
    for _ in range(3):
        mine = ours.create_completion("My favourite colour is", max_tokens=4)
        assert text(mine) == text(reference.create_completion("My favourite colour is", max_tokens=4))


def test_logit_bias_steers_greedy_choice(ours):
    plain = ours.tokenize(text(ours.create_completion(FOX, max_tokens=1, temperature=0.0)), add_bos=False)
    banned = ours.create_completion(FOX, max_tokens=1, temperature=0.0, logit_bias={plain[0]: -100.0})
    assert ours.tokenize(text(banned), add_bos=False)[0] != plain[0]


def test_grammar_constrains_the_answer(ours):
    out = ours.create_completion(
        "The capital of france is paris, 'true' or 'false'?:\n",
        max_tokens=4,
        top_k=50,
        top_p=0.9,
        temperature=0.8,
        seed=1337,
        grammar=LlamaGrammar.from_string('root ::= "true" | "false"'),
    )
    assert text(out) == "true"
    number = ours.create_completion(
        "Pick a number from 1 to 10?:\n", max_tokens=4, temperature=1.0, grammar=NUMBER
    )
    assert text(number) in {str(i) for i in range(1, 11)}


def test_logits_processor_forces_a_continuation(ours):
    forced = ours.tokenize(b"rot", add_bos=False)
    seen: list[np.ndarray] = []

    def boost(input_ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        seen.append(np.array(input_ids))
        logits[forced] = logits.max() + 100
        return logits

    out = ours.create_completion(
        "The capital of france is par", max_tokens=4, top_k=50, top_p=0.9, temperature=0.8, seed=1337,
        logits_processor=LogitsProcessorList([boost]),
    )  # fmt: skip
    assert text(out).lower().startswith("rot")
    assert seen[0].tolist() == ours.tokenize("The capital of france is par")  # the stream so far
    assert len(seen[1]) == len(seen[0]) + 1


def test_stopping_criteria_end_before_the_token(ours):
    def after_four(input_ids: np.ndarray, logits: np.ndarray) -> bool:
        return len(input_ids) >= n_prompt + 4

    n_prompt = len(ours.tokenize(FOX))
    out = ours.create_completion(
        FOX, max_tokens=20, temperature=0.0, stopping_criteria=StoppingCriteriaList([after_four])
    )
    assert out["usage"]["completion_tokens"] == 4
    assert out["choices"][0]["finish_reason"] == "stop"
    assert text(out) == " jumps over a lazy"


def test_logprobs_equal_llama_cpp_python(ours, reference):
    fresh(ours, reference)
    mine = ours.create_completion(FOX, max_tokens=6, logprobs=3, temperature=0.0)["choices"][0]["logprobs"]
    theirs = reference.create_completion(FOX, max_tokens=6, logprobs=3, temperature=0.0)["choices"][0][
        "logprobs"
    ]
    assert mine["tokens"] == theirs["tokens"]
    assert mine["text_offset"] == theirs["text_offset"]
    np.testing.assert_allclose(mine["token_logprobs"], theirs["token_logprobs"], atol=1e-5)
    for a, b in zip(mine["top_logprobs"], theirs["top_logprobs"]):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], atol=1e-5)
    json.dumps(mine)  # plain floats, ready for a JSON response


def test_streamed_logprobs_equal_the_whole(ours):
    whole = ours.create_completion(FOX, max_tokens=12, logprobs=2, temperature=0.0, stop=" dog")
    chunks = list(
        ours.create_completion(FOX, max_tokens=12, logprobs=2, temperature=0.0, stop=" dog", stream=True)
    )
    streamed = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    assert streamed == whole["choices"][0]["logprobs"]["tokens"] == [" jumps", " over", " a", " lazy"]
    assert "".join(text(c) for c in chunks) == text(whole) == " jumps over a lazy"


def test_chat_logprobs_in_openai_format(ours):
    messages = [{"role": "user", "content": "Say hello."}]
    out = ours.create_chat_completion(messages, max_tokens=6, temperature=0.0, logprobs=True, top_logprobs=2)
    content = out["choices"][0]["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == out["choices"][0]["message"]["content"]
    assert all(len(c["top_logprobs"]) in (2, 3) and c["logprob"] <= 0 for c in content)
    assert ours.create_chat_completion(messages, max_tokens=2)["choices"][0]["logprobs"] is None


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_object"},
        {"type": "json_object", "schema": {"type": "object", "properties": {"name": {"type": "string"}}}},
        {
            "type": "json_schema",
            "json_schema": {
                "name": "city",
                "schema": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "people": {"type": "integer"}},
                    "required": ["city", "people"],
                },
            },
        },
    ],
    ids=["json", "json+schema", "json_schema"],
)
def test_json_mode_replies_parse(ours, response_format):
    messages = [{"role": "user", "content": "Describe Paris as JSON."}]
    out = ours.create_chat_completion(
        messages, max_tokens=48, temperature=0.0, response_format=response_format
    )
    assert out["choices"][0]["finish_reason"] == "stop"  # the grammar closed the object
    reply = json.loads(out["choices"][0]["message"]["content"])
    assert isinstance(reply, dict)
    schema = response_format.get("schema") or response_format.get("json_schema", {}).get("schema")
    if schema and "required" in schema:
        assert set(reply) >= set(schema["required"]) and isinstance(reply["people"], int)


def test_sampling_on_an_evicting_stream_matches_until_the_first_eviction(model_path, reference):
    """InfMLLM's cache holds the same cells as a full one until it evicts: same seeded text."""
    llm = Llama(model_path, n_ctx=320, kv_policy=InfMLLM(budget=256, chunk=32), n_threads=2)
    settings = {"temperature": 0.9, "seed": 77, "repeat_penalty": 1.1}
    fresh(reference)
    mine = llm.create_completion(FOX, max_tokens=16, **settings)
    assert llm.kv_stats()["evictions"] == 0
    assert text(mine) == text(reference.create_completion(FOX, max_tokens=16, **settings))
    llm.close()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"grammar": "root ::= oops"}, "grammar"),
        ({"logit_bias": {10**7: 1.0}}, "logit_bias"),
        ({"top_p": 1.5}, "top_p"),
        ({"repeat_penalty": 0.0}, "repeat_penalty"),
        ({"mirostat_mode": 3}, "mirostat_mode"),
        ({"logprobs": -1}, "logprobs"),
        ({"suffix": "end"}, "suffix"),
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"stopping_criteria": [3]}, "stopping_criteria"),
    ],
)
def test_bad_sampling_input_changes_nothing(ours, kwargs, match):
    ours.create_completion("Hello there", max_tokens=2, temperature=0.0)
    before = ours.n_streamed
    with pytest.raises(ValueError, match=match):
        ours.create_completion("Hello there, friend", max_tokens=2, **kwargs)
    assert ours.n_streamed == before  # the prompt was not fed
    ours.check_invariants()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_object"}, "grammar": NUMBER}, "not both"),
        ({"top_logprobs": 2}, "logprobs"),
    ],
)
def test_bad_chat_input_is_refused(ours, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ours.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=2, **kwargs)


# --- constructor and accessors ------------------------------------------------------------
def test_accessors_equal_llama_cpp_python(ours, reference):
    for name in ("n_ctx", "n_vocab", "n_embd", "token_bos", "token_eos", "token_nl"):
        assert getattr(ours, name)() == getattr(reference, name)(), name
    assert ours.metadata == reference.metadata
    assert ours.tokenize(FOX) == reference.tokenize(FOX.encode())


def test_n_ctx_zero_takes_the_training_context(model_path):
    llm = Llama(model_path, n_ctx=0, kv_policy="streamingllm", n_threads=2)
    assert llm.n_ctx() == int(llm.metadata["llama.context_length"]) == 8192
    assert llm.kv_stats()["budget"] == 1024  # a named policy's budget: min(1024, n_ctx // 2)
    llm.close()


def test_ubatches_smaller_than_the_batch(model_path, text_tokens):
    """A batch of 128 computed as four ubatches of 32: the same logits as one of 128, and an
    evicting stream stays consistent (scores come from the batch's last ubatch)."""
    stream = text_tokens[:200]  # a whole batch of 128, then one of 72
    whole = Llama(model_path, n_ctx=512, kv_policy=FullCache(), n_batch=128, n_ubatch=128, n_threads=2)
    split = Llama(model_path, n_ctx=512, kv_policy=FullCache(), n_batch=128, n_ubatch=32, n_threads=2)
    assert (split.n_batch, split.n_ubatch) == (128, 32)
    np.testing.assert_allclose(split.stream_logprobs(stream), whole.stream_logprobs(stream), atol=2e-3)
    evicting = Llama(
        model_path, n_ctx=192, kv_policy=InfMLLM(budget=128, chunk=32), n_batch=128, n_ubatch=16, debug=True
    )
    evicting.eval(text_tokens[:300])  # several evictions past the 160-cell capacity
    assert evicting.kv_stats()["evictions"] > 1 and evicting.n_cached <= 160
    for llm in (whole, split, evicting):
        llm.close()


@pytest.mark.parametrize(
    "type_k, type_v, flash_attn",
    [("q8_0", None, False), pytest.param("q8_0", "q8_0", True, marks=pytest.mark.slow)],
)
def test_quantized_kv_cache_evicts(model_path, text_tokens, type_k, type_v, flash_attn):
    """K/V stored as q8_0 blocks: eviction, compaction (K-shift of quantized keys) and scoring
    run, and the stream's log-probs stay close to an f16 cache's."""
    kw = {"n_ctx": 192, "n_threads": 2, "flash_attn": flash_attn}
    f16 = Llama(model_path, kv_policy=InfMLLM(budget=128, chunk=32), **kw)
    quantized = {"type_k": type_k, "type_v": type_v}
    q8 = Llama(model_path, kv_policy=InfMLLM(budget=128, chunk=32), debug=True, **quantized, **kw)
    a, b = f16.stream_logprobs(text_tokens[:300]), q8.stream_logprobs(text_tokens[:300])
    assert q8.kv_stats()["evictions"] > 1  # several rounds past the 160-cell capacity
    assert abs(np.nanmean(a) - np.nanmean(b)) < 0.05
    with pytest.raises(ValueError, match="quantized"):  # the recall tier scores unquantized keys
        Llama(model_path, kv_policy=InfMLLM(budget=128, chunk=32), recall=Recall(), **quantized, **kw)
    for llm in (f16, q8):
        llm.close()


def test_named_chat_format(model_path):
    llm = Llama(model_path, n_ctx=512, kv_policy=FullCache(), chat_format="chatml", n_threads=2)
    out = llm.create_chat_completion([{"role": "user", "content": "Say hi."}], max_tokens=16, temperature=0)
    prompt = llm.detokenize(llm.history.tolist(), special=True).decode()
    assert prompt.startswith("<|im_start|>system\n") and "<|im_start|>assistant\n" in prompt
    assert out["choices"][0]["message"]["content"]
    llm.close()


def test_model_and_context_options_take_effect(model_path, text_tokens):
    base = Llama(model_path, n_ctx=256, kv_policy=FullCache(), n_gpu_layers=0, use_mmap=False)
    rope = Llama(model_path, n_ctx=256, kv_policy=FullCache(), rope_freq_base=5000.0, n_threads_batch=1)
    a, b = base.stream_logprobs(text_tokens[:64]), rope.stream_logprobs(text_tokens[:64])
    assert np.nanmean(np.abs(a - b)) > 0.01  # another RoPE base, other log-probs
    for llm in (base, rope):
        llm.close()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_ubatch": 0}, "n_ubatch"),
        ({"n_ctx": 8}, "n_ctx"),
        ({"type_k": "q9_9"}, "type_k"),
        ({"type_v": "q8_0"}, "flash_attn"),
        ({"n_gpu_layers": -2}, "n_gpu_layers"),
        ({"chat_format": "nope"}, "chat_format"),
        ({"rope_freq_base": -1.0}, "rope_freq_base"),
        ({"n_threads_batch": 0}, "n_threads_batch"),
        ({"seed": 1.5}, "seed"),
        ({"kv_policy": InfMLLM(budget=256, retrieval_window=64), "n_ubatch": 32}, "n_ubatch"),
    ],
)
def test_bad_options_are_refused_before_loading(model_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Llama(model_path, **{"n_ctx": 512, **kwargs})


# --- embeddings ---------------------------------------------------------------------------
TEXTS = ["In the beginning God created the heaven and the earth.", "And the earth was without form", "Light."]


@pytest.mark.parametrize("pooling", [lc.LLAMA_POOLING_TYPE_MEAN, lc.LLAMA_POOLING_TYPE_LAST])
def test_pooled_embeddings_equal_llama_cpp_python(model_path, pooling):
    ours = Llama(model_path, n_ctx=256, embedding=True, pooling_type=pooling, n_threads=2)
    theirs = ReferenceLlama(
        model_path, n_ctx=256, embedding=True, pooling_type=pooling, n_threads=2, verbose=False
    )
    assert ours.pooling_type() == theirs.pooling_type() == pooling
    np.testing.assert_allclose(ours.embed(TEXTS), theirs.embed(TEXTS), atol=1e-6)
    unit = ours.embed(TEXTS[0], normalize=True)
    assert abs(np.linalg.norm(unit) - 1) < 1e-6
    response = ours.create_embedding(TEXTS, model="smol")
    assert [d["index"] for d in response["data"]] == [0, 1, 2] and response["model"] == "smol"
    assert response["usage"]["prompt_tokens"] == sum(len(ours.tokenize(t)) for t in TEXTS)
    ours.close()
    theirs.close()


def test_token_embeddings_and_the_stream_untouched(model_path):
    """Pooling NONE (the default for this causal LM): one vector per token.  Compared one text at
    a time, since llama-cpp-python 0.3.36 reads later texts of a batch at a wrong offset."""
    ours = Llama(model_path, n_ctx=256, kv_policy=FullCache(), embedding=True, n_threads=2)
    theirs = ReferenceLlama(model_path, n_ctx=256, embedding=True, n_threads=2, verbose=False)
    assert ours.pooling_type() == lc.LLAMA_POOLING_TYPE_NONE
    ours.feed("The sea is")
    before = (ours.n_streamed, ours.generate_text(4))
    ours.reset()
    ours.feed("The sea is")
    batched = ours.embed(TEXTS)
    for text_, vectors in zip(TEXTS, batched):
        assert np.array(vectors).shape == (len(ours.tokenize(text_)), ours.n_embd())
        np.testing.assert_allclose(vectors, theirs.embed(text_), atol=1e-6)
    assert (ours.n_streamed, ours.generate_text(4)) == before  # the stream did not see the texts
    ours.close()
    theirs.close()


def test_embedding_errors(model_path, ours):
    with pytest.raises(RuntimeError, match="embedding=True"):
        ours.embed("hello")
    llm = Llama(model_path, n_ctx=64, embedding=True, pooling_type=lc.LLAMA_POOLING_TYPE_MEAN, n_threads=2)
    long_text = "word " * 200
    assert len(llm.embed(long_text)) == llm.n_embd()  # cut to n_batch tokens
    with pytest.raises(ValueError, match="exceeds n_batch"):
        llm.embed(long_text, truncate=False)
    with pytest.raises(ValueError, match="input"):
        llm.embed([])
    assert len(llm.embed("still works")) == llm.n_embd()
    llm.close()
