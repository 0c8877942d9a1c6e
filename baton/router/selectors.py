"""Load-balancing selectors: pure functions of the candidates and their in-flight counts.

A selector picks one worker among the eligible candidates. It does no I/O and keeps no
clock; the ``WorkerPool`` shell feeds it. The KV-aware selector plugs in behind the same
``WorkerSelector`` protocol.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Mapping, Sequence
from typing import Protocol


class WorkerSelector(Protocol):
    def select(self, candidates: Sequence[int], in_flight: Mapping[int, int]) -> int:
        """Returns one of ``candidates`` (never empty)."""
        ...


class RoundRobinSelector:
    """Cycles through the candidates in id order, skipping ones that left."""

    def __init__(self) -> None:
        self._last: int | None = None
        self._seen: tuple[int, ...] = ()
        self._ordered: list[int] = []
        """``_seen`` sorted: re-sorted only when the candidates change."""

    def select(self, candidates: Sequence[int], in_flight: Mapping[int, int]) -> int:
        seen = tuple(candidates)
        if seen != self._seen:
            self._seen, self._ordered = seen, sorted(seen)
        ordered = self._ordered
        i = 0 if self._last is None else bisect.bisect_right(ordered, self._last)
        choice = ordered[i if i < len(ordered) else 0]
        self._last = choice
        return choice


class RandomSelector:
    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def select(self, candidates: Sequence[int], in_flight: Mapping[int, int]) -> int:
        return candidates[self._rng.randrange(len(candidates))]


class LeastLoadedSelector:
    """Fewest requests in flight; ties broken at random."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def select(self, candidates: Sequence[int], in_flight: Mapping[int, int]) -> int:
        least = min(in_flight.get(c, 0) for c in candidates)
        tied = [c for c in candidates if in_flight.get(c, 0) == least]
        return tied[0] if len(tied) == 1 else tied[self._rng.randrange(len(tied))]


def make_selector(mode: str, seed: int | None = None) -> WorkerSelector:
    if mode == "round-robin":
        return RoundRobinSelector()
    if mode == "random":
        return RandomSelector(seed)
    if mode == "least-loaded":
        return LeastLoadedSelector(seed)
    raise ValueError(f"unknown router mode {mode!r}")
