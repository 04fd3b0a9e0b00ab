"""Stop strings: text is held back while it may be the start of one, and cut where one ends."""

from __future__ import annotations

from collections.abc import Sequence


class StopText:
    """Holds back text that may be the start of a stop string; finds complete ones."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; returns (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [(self.pending.find(s) + len(s), self.pending.find(s)) for s in self.stops if s in self.pending]
        if hits:
            # the stop string that ends first is the one a character-by-character stream meets
            # first (so the cut does not depend on how the text was split); then the longest
            _, at = min(hits)
            out, self.pending = self.pending[:at], ""
            return out, True
        keep = 0  # longest suffix of pending that is a prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
