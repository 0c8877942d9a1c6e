"""Stop strings on streamed text: decide what is safe to emit and when generation must stop.

Text arrives in arbitrary chunks, so a stop string can span many of them. ``StopChecker``
therefore holds back the longest tail of the stream that could still grow into a stop string
(at most ``max(len(stop)) - 1`` characters) and releases it once it cannot. Nothing at or after
a stop string is ever emitted, and the stop string itself is not emitted either, as in the
OpenAI API. The stream stops at the first chunk that completes a stop string, as generation
would; when that chunk completes several, the one that starts earliest wins. A longer stop
string that started earlier but is not yet complete does not delay the stop.
"""

from __future__ import annotations


class StopChecker:
    """Per-request stop-string filter; ``feed`` each decoded chunk, ``flush`` at the end."""

    __slots__ = ("_held", "_max_hold", "_prefixes", "_stops", "matched")

    # ---- configuration
    _stops: tuple[str, ...]
    _prefixes: frozenset[str]  # every proper prefix of every stop string
    _max_hold: int
    # ---- state
    _held: str  # withheld tail that may be the start of a stop string
    matched: str | None  # the stop string that ended the stream, once one has

    def __init__(self, stop: list[str] | tuple[str, ...] | None = None) -> None:
        self._stops = tuple(dict.fromkeys(s for s in stop or () if s))
        self._prefixes = frozenset(s[:i] for s in self._stops for i in range(1, len(s)))
        self._max_hold = max((len(s) - 1 for s in self._stops), default=0)
        self._held = ""
        self.matched = None

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop string has been hit)."""
        if not self._stops:
            return text, False
        if self.matched is not None:
            return "", True
        buffer = self._held + text
        cut = self._earliest_match(buffer)
        if cut is not None:
            self._held = ""
            return buffer[:cut], True
        hold = self._held_length(buffer)
        self._held = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        """Release held-back text at end of stream; "" once a stop string was hit."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held

    def _earliest_match(self, buffer: str) -> int | None:
        best: int | None = None
        for stop in self._stops:
            at = buffer.find(stop)
            if at != -1 and (best is None or at < best):
                best, self.matched = at, stop
        return best

    def _held_length(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop string."""
        for length in range(min(len(buffer), self._max_hold), 0, -1):
            if buffer[-length:] in self._prefixes:
                return length
        return 0
