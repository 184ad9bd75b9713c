"""Evaluations on a live stream, shared by the command line and the benchmarks: streaming
perplexity, passkey retrieval (haystacks, trials, answers), and a text streamed with questions
or planted facts asked along the way."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from infmllm_gguf.llama import Llama
from infmllm_gguf.system import current_rss_mb, peak_rss_mb
from infmllm_gguf.texts import kjv

# --- perplexity ------------------------------------------------------------------------


def run_ppl(
    llm: Llama,
    tokens: np.ndarray,
    piece: int = 512,
    bucket: int = 1000,
    desc: str = "ppl",
) -> dict:
    """Streaming perplexity: log p of every token as the stream goes, cache evicting, in
    pieces of `piece` tokens; the perplexity of every `bucket` tokens too."""
    logprobs = np.empty(len(tokens))
    start = time.perf_counter()
    with tqdm(total=len(tokens), desc=desc, unit="tok", file=sys.stderr) as bar:
        for i in range(0, len(tokens), piece):
            logprobs[i : i + piece] = llm.stream_logprobs(tokens[i : i + piece])
            bar.update(min(piece, len(tokens) - i))
            bar.set_postfix(cached=llm.n_cached, evicted=llm.kv_stats()["n_evicted"])
    elapsed = time.perf_counter() - start
    lp = logprobs[1:]  # the first token has no context
    buckets = [float(np.exp(-np.mean(lp[i : i + bucket]))) for i in range(0, len(lp) - bucket + 1, bucket)]
    return {
        "ppl": float(np.exp(-np.mean(lp))),
        "n_tokens": int(len(tokens)),
        "tokens_per_s": len(tokens) / elapsed,
        "buckets": buckets,
        "bucket_size": bucket,
        "kv": llm.kv_stats(),
        "peak_rss_mb": peak_rss_mb(),
    }


# --- passkey -------------------------------------------------------------------------


# the passkey test's usual opening (Mohtashami and Jaggi's landmark attention, and the long-context
# work after it): it tells the model that a key is coming and will be asked for
PASSKEY_PREAMBLE = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)


def passkey_tokens(
    llm: Llama,
    filler: list[int],
    length: int,
    depth: float,
    key: str,
    paragraphs: bool = False,
    start: int = 0,
    preamble: bool = False,
) -> tuple[list[int], range]:
    """A `length`-token haystack (filler from index `start` on, wrapping around) with `key`
    planted at `depth`, ending in the question; returns the tokens and the needle's token
    range.  With `paragraphs` the needle and the question each stand in a paragraph of their
    own, which the model reads as a break from the haystack: a full cache then answers 8 of 9
    keys at 2k tokens and 6 of 6 at 4k, against 3 of 9 at 2k with both inline, where it
    mostly continues the haystack's last sentence.  With `preamble` the stream opens with
    PASSKEY_PREAMBLE (within `length`): without it the model sometimes defines a pass key ("a
    key that is used to open doors") instead of copying the one it was given (a full cache:
    24 of 24 keys at 2k-4k tokens with it, 23 without), though at 16k tokens with a recalled
    needle it does so more often (7 of 12 keys against 3)."""
    sep = "\n\n" if paragraphs else " "
    needle = llm.tokenize(
        f"{sep}The pass key is {key}. Remember it. {key} is the pass key.{sep}", add_bos=False
    )
    question = llm.tokenize(f"{sep}What is the pass key? The pass key is", add_bos=False)
    opening = llm.tokenize("", add_bos=True)  # BOS where the model wants one
    if preamble:
        opening += llm.tokenize(PASSKEY_PREAMBLE, add_bos=False)
    n_hay = max(0, length - len(opening) - len(needle) - len(question))
    at = int(depth * n_hay)
    hay = [filler[(start + i) % len(filler)] for i in range(n_hay)]
    head = opening + hay[:at]
    return head + needle + hay[at:] + question, range(len(head), len(head) + len(needle))


def passkey_trial(
    llm: Llama,
    filler: list[int],
    length: int,
    depth: float,
    key: str,
    answer_tokens: int = 8,
    paragraphs: bool = False,
    start: int = 0,
    preamble: bool = False,
) -> dict:
    """Plant `key` at `depth` of a `length`-token haystack, stream it, ask for it; correct when
    the answer's first digits are the key.  With a recall tier, also whether a page of the
    needle was among the recalled ones when it answered, and whether all of the needle was in
    the cache then (a needle across a page boundary can come back in part)."""
    tokens, needle = passkey_tokens(llm, filler, length, depth, key, paragraphs, start, preamble)
    llm.reset()
    llm.eval(tokens)
    return {"depth": depth, **passkey_answer(llm, key, needle, answer_tokens)}


def passkey_answer(llm: Llama, key: str, needle: range, answer_tokens: int = 8) -> dict:
    """Answer the pass-key question the stream ends with, as passkey_trial does."""
    answer = llm.generate_text(max_tokens=answer_tokens, temperature=0.0)
    digits = "".join(ch for ch in answer if ch.isdigit())
    result = {"key": key, "answer": answer.strip(), "correct": digits.startswith(key)}
    if llm.recall is not None:
        result["needle_recalled"] = any(a < needle.stop and needle.start < b for a, b in llm.recalled())
        result["needle_whole"] = bool(np.isin(needle, llm.cached_stream_indices()).all())
    return result


def passkey_draws(
    rng: np.random.Generator, n_filler: int, depths: Sequence[float], trials: int, spread: bool
) -> Iterator[tuple[float, str, int]]:
    """(depth, key, haystack start) for `trials` keys per depth, in run_passkey's order: the same
    seed gives the same keys and haystacks wherever they are drawn."""
    for depth in depths:
        for _ in range(trials):
            key = str(rng.integers(10_000, 100_000))
            yield depth, key, int(rng.integers(n_filler)) if spread else 0


def passkey_filler(llm: Llama) -> list[int]:
    """The haystack text of every passkey stream: the first 200,000 characters of KJV, tokenised."""
    return llm.tokenize(kjv()[:200_000], add_bos=False)


def run_passkey(
    llm: Llama,
    length: int,
    depths: Sequence[float],
    trials: int,
    seed: int = 0,
    spread: bool = False,
    answer_tokens: int = 8,
    paragraphs: bool = False,
    preamble: bool = False,
) -> dict:
    """`trials` keys per depth in KJV haystacks: all from the text's start, or with `spread` each
    from its own random start (wrapping around), so that the keys do not share one ending;
    `answer_tokens`, `paragraphs` and `preamble` as in passkey_trial."""
    rng = np.random.default_rng(seed)
    filler = passkey_filler(llm)
    results = []
    with tqdm(total=len(depths) * trials, desc=f"passkey {llm.policy.name}", file=sys.stderr) as bar:
        for depth, key, start in passkey_draws(rng, len(filler), depths, trials, spread):
            results.append(
                passkey_trial(llm, filler, length, depth, key, answer_tokens, paragraphs, start, preamble)
            )
            bar.update(1)
    return {"accuracy": float(np.mean([r["correct"] for r in results])), "trials": results}


# --- a text streamed with questions --------------------------------------------------


def stream_and_ask(
    llm: Llama,
    text: str,
    questions: Sequence[str],
    every: int,
    max_tokens: int,
    limit: int | None = None,
    out=sys.stdout,
) -> list[dict]:
    """Feed text (its first `limit` tokens), asking the next question every `every` tokens."""
    tokens = llm.tokenize(text, add_bos=True)[:limit]
    answers = []
    q = 0
    start = time.perf_counter()
    fed = 0
    bar = tqdm(total=len(tokens), desc="streaming", unit="tok", file=sys.stderr)
    for i in range(0, len(tokens), every):
        piece = tokens[i : i + every]
        for j in range(0, len(piece), 256):
            llm.eval(piece[j : j + 256])
            fed += len(piece[j : j + 256])
            bar.update(len(piece[j : j + 256]))
            stats = llm.kv_stats()
            bar.set_postfix(
                cache=f"{stats['n_cached']}/{stats['capacity']}",
                evicted=stats["n_evicted"],
                rss=f"{current_rss_mb():.0f}MB",
            )
        if q < len(questions):
            answer = llm.ask(questions[q], max_tokens=max_tokens)
            stats = llm.kv_stats()
            rate = fed / (time.perf_counter() - start)
            tqdm.write(
                f"[{stats['n_streamed']:>7} tokens streamed "
                f"| cache {stats['n_cached']}/{stats['capacity']} | "
                f"{stats['evictions']} evictions | {rate:.0f} tok/s | RSS {current_rss_mb():.0f} MB]\n"
                f"  Q: {questions[q]}\n  A: {answer}",
                file=out,
            )
            answers.append({"question": questions[q], "answer": answer, "kv": stats})
            llm.feed("\n", add_bos=False)
            q += 1
    bar.close()
    return answers


def plant_facts(text: str, facts: Sequence[tuple[int, str, str]]) -> tuple[str, list[tuple[int, str, str]]]:
    """Insert each fact at the line break after its offset; returns the text and the facts
    that fitted in it."""
    planted = [f for f in facts if f[0] < len(text)]
    for offset, name, code in sorted(planted, reverse=True):
        cut = text.find("\n", offset) + 1 or offset
        fact = f"The pass key of the {name} is {code}. Remember it.\n"
        text = text[:cut] + fact + text[cut:]
    return text, planted


def ask_facts(llm: Llama, facts: Sequence[tuple[int, str, str]], out=sys.stdout) -> list[dict]:
    """Ask for each planted code in completion form, aside (rewound afterwards)."""
    results = []
    for _, name, code in facts:
        mark = llm.n_streamed
        llm.feed(f"\nWhat is the pass key of the {name}? The pass key of the {name} is", add_bos=False)
        answer = llm.generate_text(max_tokens=8, temperature=0.0).strip()
        pages = llm.recalled()
        llm.rewind(mark)
        found = answer.startswith(code)
        print(
            f"  Q: the pass key of the {name}?  A: {answer!r} {'(right)' if found else f'(wrong: {code})'}",
            file=out,
        )
        for a, b in pages:
            piece = llm.detokenize([t for t in llm.history[a:b] if t >= 0]).decode("utf-8", "replace")
            print(f"     recalled tokens {a}-{b}: {piece!r}", file=out)
        results.append({"name": name, "code": code, "answer": answer, "correct": found, "recalled": pages})
    return results
