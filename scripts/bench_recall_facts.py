"""Multi-round facts with the recall tier: a fact told d rounds earlier (d = 5, 21, 61), asked
for in completion form, with and without recall, against the full cache.

One growing transcript, the same for every configuration.  Even rounds tell a fact:
  "User: Remember this: the code of Alice is 4821.\\nAssistant: Noted: the code of Alice is 4821.\\n"
odd rounds ask for the fact told d rounds earlier, d cycling over --distances:
  "User: What is the code of Alice?\\nAssistant: The code of Alice is"
and the answer is generated (greedy, a turn: one recall); then the stream is rewound and the
true code is fed, so that every configuration streams the same text.  Completion form,
because the 135M model copies from its context there and hardly at all in chat form (see
bench_multiround.py, where even the full cache finds a fact 5 rounds back 1 time in 10), and
each name is told once, so that the question's words point at one fact.

Each policy runs alone, with `Recall()`, with `Recall(reencode=True)` and with
`Recall(reencode=True, adjacent=True)` (each with `score=` --score).

    python scripts/bench_recall_facts.py --quick   # 80 rounds (minutes)
    python scripts/bench_recall_facts.py           # 180 rounds, budget 256
    python scripts/bench_recall_facts.py --sample 128 --out bench/results/recall_facts_sample128
                                                   # the scores standardised over 128 pages
    python scripts/bench_recall_facts.py --score attention --out bench/results/recall_facts_attention

Writes bench/results/recall_facts.json, .csv and .png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from results_io import RESULTS, write_results
from tqdm import tqdm

from infmllm_gguf import Llama, Recall
from infmllm_gguf.policies import FullCache, KVPolicy, make_policy
from infmllm_gguf.recall import PageStore

FULL_N_CTX = 8192  # the model's trained context
NAMES = """Alice Bruno Chen Dalia Emeka Farah Goran Hana Ivan Jun Kofi Lena Mateo Nadia Omar Priya
Quinn Rosa Sven Tomas Ursula Victor Wanda Xavier Yusuf Zora Arjun Bianca Carlos Dmitri Elena
Felix Greta Hugo Ingrid Jonas Kira Luca Maya Nikolai Olga Pablo Rania Stefan Tara Umar Vera
Walter Yara Zane Amir Beatrix Cyrus Daphne Elias Fiona Gideon Helga Isaac Julia Kenji Lorenzo
Mira Nils Oscar Petra Rafael Selma Theo Uma Viktor Wendy Yosef Zelda Anton Brigid Caspar Doris
Eamon Freya Gustav Hilda Igor Jasmine Klaus Leila Magnus Nora Otto Paloma Rupert Saskia Tobias
Ulrich Valeria Wilhelm Ximena Yvonne""".split()


def run_config(label: str, policy: KVPolicy, recall: Recall | None, args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    n_facts = (args.rounds + 1) // 2
    if n_facts > len(NAMES):
        raise SystemExit(f"--rounds {args.rounds} needs {n_facts} names, there are {len(NAMES)}")
    names = [str(n) for n in rng.permutation(NAMES)[:n_facts]]
    codes = [str(c) for c in rng.integers(1000, 10000, size=n_facts)]
    n_ctx = FULL_N_CTX if isinstance(policy, FullCache) else policy.capacity
    llm = Llama(n_ctx=n_ctx, kv_policy=policy, seed=0, recall=recall)
    llm.feed("A conversation. The assistant remembers every code it is told.\n", add_bos=True)
    log = []
    start = time.perf_counter()
    for r in tqdm(range(args.rounds), desc=label, file=sys.stderr):
        if r % 2 == 0:
            name, code = names[r // 2], codes[r // 2]
            llm.feed(
                f"User: Remember this: the code of {name} is {code}.\n"
                f"Assistant: Noted: the code of {name} is {code}.\n",
                add_bos=False,
            )
            continue
        d = args.distances[(r // 2) % len(args.distances)]
        if r - d < 0:
            continue
        name, code = names[(r - d) // 2], codes[(r - d) // 2]
        llm.feed(f"User: What is the code of {name}?\nAssistant: The code of {name} is", add_bos=False)
        mark = llm.n_streamed
        answer = llm.generate_text(max_tokens=6)
        recalled = len(llm.recalled())
        llm.rewind(mark)
        llm.feed(f" {code}.\n", add_bos=False)
        log.append(
            {
                "config": label,
                "round": r,
                "distance": d,
                "correct": "".join(c for c in answer if c.isdigit()).startswith(code),
                "answer": answer.strip(),
                "pages_recalled": recalled,
                "n_streamed": llm.n_streamed,
            }
        )
    seconds = time.perf_counter() - start
    stats = llm.kv_stats()
    llm.close()
    return {
        "config": label,
        "accuracy_by_distance": {
            str(d): float(np.mean([x["correct"] for x in log if x["distance"] == d])) for d in args.distances
        },
        "questions": len(log),
        "n_streamed": stats["n_streamed"],
        "seconds": seconds,
        "store_mb": stats.get("store_mb", 0.0),
        "rounds": log,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=180)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--distances", type=int, nargs="+", default=[5, 21, 61])
    ap.add_argument("--policies", nargs="+", default=["streamingllm", "infmllm"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--sample",
        type=int,
        default=PageStore.SAMPLE,
        help="pages whose exact scores set the standardisation (PageStore.SAMPLE)",
    )
    ap.add_argument("--score", default="peak", choices=Recall.SCORES, help="the recall's page score")
    ap.add_argument("--out", default=str(RESULTS / "recall_facts"))
    args = ap.parse_args()
    if args.quick:
        args.rounds = 80
    if any(d % 2 == 0 or d < 1 for d in args.distances):
        ap.error("--distances must be odd (a question round looks back to a fact round)")
    if args.sample < 1:
        ap.error("--sample must be >= 1")
    PageStore.SAMPLE = args.sample

    configs: list[tuple[str, KVPolicy, Recall | None]] = [("full", FullCache(), None)]
    for name in args.policies:
        configs.append((name, make_policy(name, budget=args.budget), None))
        for suffix, recall in (
            ("recall", Recall(score=args.score)),
            ("recall-reencode", Recall(reencode=True, score=args.score)),
            ("recall-reencode-adjacent", Recall(reencode=True, adjacent=True, score=args.score)),
        ):
            configs.append((f"{name}+{suffix}", make_policy(name, budget=args.budget), recall))
    results = [run_config(label, policy, recall, args) for label, policy, recall in configs]
    for res in results:
        by_d = ", ".join(f"d={d}: {a:.2f}" for d, a in res["accuracy_by_distance"].items())
        print(f"{res['config']:>20}: {by_d} ({res['questions']} questions, {res['seconds']:.0f} s)")

    rows = [x for res in results for x in res["rounds"]]
    summary = [{k: v for k, v in res.items() if k != "rounds"} for res in results]
    meta = {
        "budget": args.budget,
        "rounds": args.rounds,
        "distances": args.distances,
        "sample": args.sample,
        "score": args.score,
        "configs": summary,
    }
    columns = ["config", "round", "distance", "correct", "answer", "pages_recalled", "n_streamed"]
    out = write_results(args.out, meta, rows, columns)
    plot(results, out.with_suffix(".png"), args)
    print(f"wrote {out}.json/.csv/.png")
    return 0


def plot(results: list[dict], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(results)
    for i, res in enumerate(results):
        acc = [res["accuracy_by_distance"][str(d)] for d in args.distances]
        ax.bar(np.arange(len(acc)) + i * width, acc, width, label=res["config"])
    ax.set_xticks(np.arange(len(args.distances)) + 0.4 - width / 2)
    ax.set_xticklabels([f"told {d} rounds earlier" for d in args.distances])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("codes answered")
    ax.set_title(f"facts across rounds, budget {args.budget}, {args.rounds} rounds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
