"""Traffic over some seconds, as the planner adds it up: requests, their prompt and output
tokens, and the spread of their prompt lengths (windows add, so a mean over many windows is
their sum's); and the lengths to expect of the next requests (``expected_lengths``).

Pure: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["LENGTH_T", "Window", "expected_lengths", "length_cv"]

LENGTH_T = 3.0
"""The recent mean prompt stands for the next requests' only when it is this many standard
errors from the typical one; nearer, it differs by chance."""


def length_cv(count: float, total: float, squares: float) -> float:
    """The coefficient of variation of ``count`` lengths from their sum and the sum of their
    squares (> 0 each)."""
    mean = total / count
    return math.sqrt(max(squares / count / mean**2 - 1, 0.0))


@dataclass(frozen=True, slots=True)
class Window:
    """Traffic over some seconds: requests, and their prompt and output tokens together."""

    seconds: float = 0.0
    requests: int = 0
    prompt_tokens: float = 0.0
    output_tokens: float = 0.0
    prompt_squares: float = 0.0
    """The sum of the squared prompt lengths of ``spread`` of the requests."""
    spread: int = 0

    def __add__(self, other: Window) -> Window:
        return Window(self.seconds + other.seconds, self.requests + other.requests,
                      self.prompt_tokens + other.prompt_tokens,
                      self.output_tokens + other.output_tokens,
                      self.prompt_squares + other.prompt_squares, self.spread + other.spread)

    @property
    def isl_cv(self) -> float | None:
        """The prompt lengths' coefficient of variation, if known for every request."""
        if not self.requests or self.spread < self.requests:
            return None
        return length_cv(self.requests, self.prompt_tokens, self.prompt_squares)


def expected_lengths(recent: Window, typical: Window) -> tuple[float, float]:
    """The mean prompt and output lengths to expect of the next requests: the ``typical``
    window's (a longer stretch of traffic, ``recent`` included), unless the ``recent`` mean
    prompt is more than ``LENGTH_T`` standard errors from it (the lengths changed), or the
    spread of the prompts is not known (no standard error): then ``recent``'s. A few
    intervals' mean of heavy-tailed lengths moves by a tenth by chance."""
    chosen, cv = recent, typical.isl_cv
    if cv is not None and recent.requests:
        mean = typical.prompt_tokens / typical.requests
        error = mean * cv / math.sqrt(recent.requests)
        if abs(recent.prompt_tokens / recent.requests - mean) <= LENGTH_T * error:
            chosen = typical
    return chosen.prompt_tokens / chosen.requests, chosen.output_tokens / chosen.requests
