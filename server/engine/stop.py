"""Stop strings: cut the output before the first match and never leak a partial match.

Text that could be the start of a stop string is held back until the next token decides it;
at the end of generation whatever is held back is released.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]):
        self._stops = tuple(s for s in stops if s)
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Return the text that is safe to emit now; sets `stopped` on a match."""
        if not self._stops:
            return text
        window = self._pending + text
        cut = min((i for i in (window.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            return window[:cut]
        hold = self._longest_partial_suffix(window)
        self._pending = window[len(window) - hold :] if hold else ""
        return window[: len(window) - hold]

    def flush(self) -> str:
        pending, self._pending = self._pending, ""
        return pending

    def _longest_partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:length]):
                    best = length
                    break
        return best
