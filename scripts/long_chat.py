"""A scripted multi-round chat (hundreds of rounds) through one bounded cache: soak and demo.

Facts are told in early rounds and asked about later; the full history is passed every
round (never truncated by hand) and the cache policy keeps it bounded.

    python scripts/long_chat.py --rounds 300 --policy infmllm --budget 512 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from infmllm_gguf import Llama
from infmllm_gguf.cli import current_rss_mb
from infmllm_gguf.policies import POLICIES, make_policy

FACTS = [
    ("my dog", "Rex"),
    ("my sister", "Anna"),
    ("my city", "Lyon"),
    ("my car", "a red Fiat"),
    ("my favourite fruit", "mango"),
]
SMALL_TALK = [
    "Tell me one short fact about the sea.",
    "Name a colour of the sky at sunset.",
    "Give me a word that rhymes with cat.",
    "What is two plus three?",
    "Say hello in French.",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--policy", default="infmllm", choices=list(POLICIES))
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    policy = make_policy(args.policy, budget=args.budget)
    n_ctx = 4096 if args.policy == "full" else policy.capacity
    llm = Llama(n_ctx=n_ctx, kv_policy=policy, seed=0)
    messages = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."}]
    log = []
    start = time.perf_counter()
    for r in tqdm(range(args.rounds), desc="rounds", file=sys.stderr):
        if r < len(FACTS):
            what, value = FACTS[r]
            user, expect = f"Remember: the name of {what} is {value}.", None
        elif r % 10 == 0:
            what, value = FACTS[(r // 10) % len(FACTS)]
            user, expect = f"What is the name of {what}?", value
        else:
            user, expect = SMALL_TALK[r % len(SMALL_TALK)], None
        messages.append({"role": "user", "content": user})
        t0 = time.perf_counter()
        reply = llm.create_chat_completion(messages, max_tokens=args.max_tokens, temperature=0.0)
        text = reply["choices"][0]["message"]["content"]
        messages.append({"role": "assistant", "content": text})
        stats = llm.kv_stats()
        entry = {
            "round": r,
            "user": user,
            "reply": text,
            "seconds": time.perf_counter() - t0,
            "n_streamed": stats["n_streamed"],
            "n_cached": stats["n_cached"],
            "rss_mb": current_rss_mb(),
        }
        if expect is not None:
            entry["expected"] = expect
            entry["correct"] = expect.lower() in text.lower()
        log.append(entry)
    asked = [e for e in log if "correct" in e]
    result = {
        "policy": llm.policy.name,
        "budget": args.budget,
        "rounds": args.rounds,
        "seconds": time.perf_counter() - start,
        "recall_accuracy": sum(e["correct"] for e in asked) / max(1, len(asked)),
        "empty_replies": sum(not e["reply"].strip() for e in log),
        "kv": llm.kv_stats(),
        "log": log,
    }
    kv = result["kv"]
    print(
        f"{args.rounds} rounds, {kv['n_streamed']} tokens streamed, cache {kv['n_cached']}/{kv['capacity']}, "
        f"recall {result['recall_accuracy']:.2f}, "
        f"empty replies {result['empty_replies']}, RSS {current_rss_mb():.0f} MB"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
