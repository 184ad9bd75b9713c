"""A short soak (`python -m bench soak`): every policy's session through feeds, generations, chats,
asks, resets and real SIGINTs, with the cache invariants checked after every native state change."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the benchmark harness, bench/
from bench import soak  # noqa: E402


@pytest.mark.slow
@pytest.mark.usefixtures("sigint")
def test_short_soak_keeps_every_session_consistent():
    # short feeds and many interrupts: a few minutes see every operation and many SIGINTs
    args = argparse.Namespace(
        tokens=15_000, budget=128, n_batch=128, seed=0, max_feed=1024, interrupt_rate=0.3
    )
    result = soak.soak(args)  # raises InvariantError on the first violation
    assert result["tokens"] >= 15_000
    rows = {r["policy"]: r for r in result["rows"]}
    assert set(rows) == {"infmllm", "streamingllm", "h2o", "snapkv", "window"}
    assert all(r["tokens"] > 0 for r in rows.values())
    assert sum(r["evictions"] for r in rows.values()) >= 10  # a session that only chatted may not evict
    assert sum(r["interrupted"] for r in rows.values()) >= 1
    assert sum(r["chat"] + r["ask"] + r["generate"] for r in rows.values()) >= 5
    # memory: the full run holds RSS to +2 % after warm-up; a run this short still warms allocators
    assert result["rss_growth"] < 1.10
