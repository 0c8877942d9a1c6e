"""Load-balancing selectors: pure functions of the candidates and their in-flight counts.

A selector picks one worker among the eligible candidates. It does no I/O and keeps no
clock; the ``WorkerPool`` shell feeds it. The KV-aware selector plugs in behind the same
``WorkerSelector`` protocol.
"""

from __future__ import annotations

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

    def select(self, candidates: Sequence[int], in_flight: Mapping[int, int]) -> int:
        ordered = sorted(candidates)
        if self._last is None:
            choice = ordered[0]
        else:
            choice = next((c for c in ordered if c > self._last), ordered[0])
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
