"""The recall tier's configuration (`Recall`) and its one error (`RecallError`)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import ClassVar


class RecallError(RuntimeError):
    """The recall store cannot be used (e.g. a corrupt spill file); the stream goes on without it."""


@dataclasses.dataclass(frozen=True)
class Recall:
    """Configuration of the recall tier (one per `Llama`; the store and its
    controller, `RecallTier`, live in the stream).

    reserve: cells of the budget that recalled pages may occupy (default budget // 4); the
      policy keeps the rest, and the part recalled pages do not hold until a recall needs it
      (so "turn" costs a stream nothing between questions).  page: stream tokens per page.
      when: "turn" recalls once per question or prompt, before answering (the prompt's last
      `query_window` tokens are decoded again with the pages in place); "chunk" also recalls
      after every eviction, scored by the newest `query_window` query rows (by the text about
      to be decoded with score="text").  every: in chunk mode, also recall every `every`
      tokens fed between evictions (default None: once per eviction, i.e. per policy chunk);
      a text-scored recall then matches the next `every` tokens, a closer aim than a whole
      chunk's (docs/recall.md).  store_limit_mb:
      host memory for stored rows; past it the oldest pages are dropped, or spilled to a file
      in `spill_dir`.
      shortlist: pages each of the two summary rankings passes on to the exact re-rank with
      the stored keys (which bounds a recall's cost however large the store grows).
      reencode: after a turn's recall, decode the cached text from the first recalled cell on
      again, so that the recalled pages and what follows them are computed in the context
      they now sit in (their stored rows were computed in their original one); at most a
      budget of tokens per turn, text only, `when="turn"` only.
      adjacent: a chosen page also brings the adjacent pages that score above the shortlist's
      median, outwards, before any page's plain neighbours, so that a fact across page
      boundaries comes back whole (with `reencode` a fragment decoded again loses what its
      stored rows knew); they take room the neighbours of other chosen pages would have.
      score: "peak" ranks pages by their strongest standardised q·k less its mean over heads,
      among a shortlist (`PeakScorer`): what a question's answer stands out by.
      "attention" ranks them by their share of the queries' softmax attention over every
      stored key, each moved to the distance from the queries it would have had in a cache
      that never evicted (`AttentionScorer`): what a full cache would attend to,
      nearby text included, at a cost that grows with the store; pages holding control
      tokens (chat-template markers, attended to as sinks) are left out of it.  "both" takes
      the two rankings' standing-out pages in turn, the peak's first, each with the page
      after and before it: the answer's pages and what a full cache would attend to, at the
      cost of the two.  "text" reads no queries: the pages where the new text's runs of
      2 and 3 tokens occurred before, each ranked by the place that continued there
      (`text_matches`) — what a full cache would copy from; in chunk mode the new text is the
      piece about to be decoded (the stream knows it before decoding it), in turn mode the
      turn's newest `query_window` tokens.  `adjacent` leaves it as it is.  "peak-max" and
      "peak-max-half-mean" are "peak" with a page counting by its strongest one alone, or less
      half the mean: the variants the benchmarks compare the shipped rule with.
    """

    reserve: int | None = None
    page: int = 16
    when: str = "turn"
    store_limit_mb: float = 1024.0
    spill_dir: str | os.PathLike | None = None
    query_window: int = 8
    shortlist: int = 64
    reencode: bool = False
    adjacent: bool = False
    score: str = "peak"
    every: int | None = None

    WHEN: ClassVar[tuple[str, ...]] = ("turn", "chunk")
    # the names of scorers.SCORERS; "peak-max" and "peak-max-half-mean" are the peak score with
    # other page rules (`scorers.strongest`, `scorers.max_less_half_mean`), which benchmarks compare
    SCORES: ClassVar[tuple[str, ...]] = (
        "peak",
        "attention",
        "both",
        "text",
        "peak-max",
        "peak-max-half-mean",
    )

    def __post_init__(self) -> None:
        for name, minimum in (("page", 1), ("query_window", 1), ("shortlist", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        for name in ("reserve", "every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if self.every is not None and self.when != "chunk":
            raise ValueError('every sets how often chunk mode recalls: when="chunk" only')
        if self.when not in self.WHEN:
            raise ValueError(f"when must be one of {', '.join(self.WHEN)}, got {self.when!r}")
        if self.score not in self.SCORES:
            raise ValueError(f"score must be one of {', '.join(self.SCORES)}, got {self.score!r}")
        if self.reencode and self.when != "turn":
            raise ValueError('reencode decodes a budget of tokens again per recall: when="turn" only')
        limit = self.store_limit_mb
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
            raise ValueError(f"store_limit_mb must be a number > 0, got {limit!r}")
        if self.spill_dir is not None and not Path(self.spill_dir).is_dir():
            raise ValueError(f"spill_dir {self.spill_dir} is not a directory")

    def reserve_for(self, budget: int) -> int:
        return self.reserve if self.reserve is not None else max(self.page, budget // 4)
