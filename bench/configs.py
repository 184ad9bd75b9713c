"""Named configurations the benchmarks run: a cache policy and the recall tier's settings.

A benchmark takes these names (`--policies full infmllm infmllm+recall-text+half`) and builds
each one at its budget; the name is also the label of its rows in the results.  The names:

  NAME                     the policy alone (full, window, streamingllm, h2o, snapkv, infmllm)
  NAME+fixed               reposition=False: kept tokens keep their positions (at most the
                           model's trained context)
  NAME+recall              Recall(when="chunk"): a recall after every eviction (a text streamed
                           without questions)
  NAME+recall-attention    the same, score="attention"
  NAME+recall-both         the same, score="both"
  NAME+recall-text         the same, score="text"
  NAME+recall-text+half    the same, its reserve half the budget
  NAME+recall-text+every16 the same, also recalling every 16 tokens between evictions
  NAME+recall-turn         Recall(): one recall per question, before its answer
  NAME+recall-reencode     Recall(reencode=True): the cached text after the recalled pages is
                           decoded again
  NAME+recall-reencode-adjacent  Recall(reencode=True, adjacent=True): a chosen page brings the
                           adjacent pages that score above the median
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from infmllm_gguf import POLICIES, FullCache, KVPolicy, Recall
from infmllm_gguf.policies import make_policy


@dataclasses.dataclass(frozen=True)
class Config:
    """A policy by its name in POLICIES, with its repositioning, and the recall tier (None: off).
    `reserve_share` sets the recall's reserve to that share of the budget it is built at."""

    name: str
    policy: str
    reposition: bool = True
    recall: Recall | None = None
    reserve_share: float | None = None

    @property
    def full(self) -> bool:
        """Whether this is the full cache (it holds the whole stream: the benchmark sizes its n_ctx)."""
        return POLICIES[self.policy] is FullCache

    def build(self, budget: int | None) -> tuple[KVPolicy, Recall | None]:
        """The policy at `budget` (ignored by the full cache) and the Recall to stream with."""
        policy = make_policy(self.policy, budget=budget, reposition=self.reposition)
        recall = self.recall
        if recall is not None and self.reserve_share is not None:
            recall = dataclasses.replace(recall, reserve=int(policy.budget * self.reserve_share))
        return policy, recall

    def with_recall(self, **changes: Any) -> Config:
        """This configuration with some of its Recall's fields changed (e.g. score=...)."""
        if self.recall is None:
            raise ValueError(f"{self.name} has no recall tier to change")
        return dataclasses.replace(self, recall=dataclasses.replace(self.recall, **changes))


# the recall settings a policy's name is combined with (NAME+suffix)
RECALLS: dict[str, tuple[Recall, float | None]] = {
    "recall": (Recall(when="chunk"), None),
    "recall-attention": (Recall(when="chunk", score="attention"), None),
    "recall-both": (Recall(when="chunk", score="both"), None),
    "recall-text": (Recall(when="chunk", score="text"), None),
    "recall-text+half": (Recall(when="chunk", score="text"), 0.5),
    "recall-text+every16": (Recall(when="chunk", score="text", every=16), None),
    "recall-turn": (Recall(), None),
    "recall-reencode": (Recall(reencode=True), None),
    "recall-reencode-adjacent": (Recall(reencode=True, adjacent=True), None),
}


EVICTING = [name for name, cls in POLICIES.items() if cls is not FullCache]  # all policies but full


def _registry() -> dict[str, Config]:
    configs = {name: Config(name, name) for name in POLICIES}
    for name in EVICTING:
        configs[f"{name}+fixed"] = Config(f"{name}+fixed", name, reposition=False)
        for suffix, (recall, share) in RECALLS.items():
            label = f"{name}+{suffix}"
            configs[label] = Config(label, name, recall=recall, reserve_share=share)
    return configs


CONFIGS: dict[str, Config] = _registry()


def config_name(name: str) -> str:
    """A configuration's name, checked (an argparse type: an unknown name is a usage error)."""
    if name not in CONFIGS:
        raise argparse.ArgumentTypeError(f"unknown configuration {name!r}; {NAMES_HELP}")
    return name


NAMES_HELP = (
    f"a policy ({', '.join(POLICIES)}) alone or as NAME+SUFFIX, SUFFIX one of "
    f"{', '.join(['fixed', *RECALLS])} (bench/configs.py)"
)


def add_policies(parser: argparse.ArgumentParser, default: list[str]) -> None:
    """--policies: the configurations a benchmark runs, by name (checked against the registry)."""
    parser.add_argument("--policies", type=config_name, nargs="+", default=default, help=NAMES_HELP)
