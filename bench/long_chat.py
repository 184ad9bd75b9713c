"""A scripted multi-round chat (hundreds of rounds) through one bounded cache: soak and demo.

Facts are told in early rounds and asked about later; the full history is passed every
round (never truncated by hand) and the cache policy keeps it bounded.

    python -m bench long-chat --rounds 300 --policy infmllm --budget 512 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import Stopwatch, current_rss_mb, progress
from bench.configs import CONFIGS, NAMES_HELP, config_name
from infmllm_gguf import Llama

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


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--policy", type=config_name, default="infmllm", help=NAMES_HELP)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--json", default=None, help="write the results here")


def run(args: argparse.Namespace) -> int:
    config = CONFIGS[args.policy]
    policy, recall = config.build(args.budget)
    llm = Llama(n_ctx=4096 if config.full else policy.capacity, kv_policy=policy, recall=recall, seed=0)
    messages = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."}]
    log = []
    clock = Stopwatch()
    with progress(args.rounds, "rounds") as bar:
        for r in range(args.rounds):
            if r < len(FACTS):
                what, value = FACTS[r]
                user, expect = f"Remember: the name of {what} is {value}.", None
            elif r % 10 == 0:
                what, value = FACTS[(r // 10) % len(FACTS)]
                user, expect = f"What is the name of {what}?", value
            else:
                user, expect = SMALL_TALK[r % len(SMALL_TALK)], None
            messages.append({"role": "user", "content": user})
            turn_clock = Stopwatch()
            reply = llm.create_chat_completion(messages, max_tokens=args.max_tokens, temperature=0.0)
            text = reply["choices"][0]["message"]["content"]
            messages.append({"role": "assistant", "content": text})
            stats = llm.kv_stats()
            entry = {
                "round": r,
                "user": user,
                "reply": text,
                "seconds": turn_clock.seconds,
                "n_streamed": stats["n_streamed"],
                "n_cached": stats["n_cached"],
                "rss_mb": current_rss_mb(),
            }
            if expect is not None:
                entry["expected"] = expect
                entry["correct"] = expect.lower() in text.lower()
            log.append(entry)
            bar.update()
    asked = [e for e in log if "correct" in e]
    result = {
        "policy": llm.policy.name,
        "budget": args.budget,
        "rounds": args.rounds,
        "seconds": clock.seconds,
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
