"""Stop strings over text that arrives token by token.

A stop string can span tokens ("\\n\\n" + "User" + ":"), so text that could still turn into
one is held back until it cannot; plain and streamed completions then both equal the text
cut at the first stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StopMatcher:
    """Feeds pieces of text, emits what is safe, stops at the earliest stop string."""

    stops: list[str]
    text: str = field(default="", init=False)
    emitted: int = field(default=0, init=False)  # characters of text handed out so far

    def __post_init__(self) -> None:
        self.stops = [s for s in self.stops if s]

    def push(self, piece: str) -> tuple[str, bool]:
        """Append piece; return (text safe to emit now, whether a stop string was reached)."""
        self.text += piece
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stops) if i >= 0]
        if hits:
            return self._emit(min(hits)), True
        return self._emit(len(self.text) - self._held_back()), False

    def flush(self) -> str:
        """The rest of the text, when generation ends without a stop string."""
        return self._emit(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of text that is a proper prefix of some stop string."""
        pending = len(self.text) - self.emitted
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, pending), longest, -1):
                if self.text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def _emit(self, end: int) -> str:
        out = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return out
