"""Which candidates a KV-aware decision scores when a pool has many workers.

Scoring every worker makes a decision's cost grow with the pool. Both KV-aware modes score,
beyond ``2 × k`` workers (``k``: ``--router-latency-candidates``), only the candidates that
can win:

- ``latency_shortlist``: the ``k`` least loaded of the workers holding the longest part of
  the prompt (then the next longest), and the ``k`` least loaded of all;
- ``cost_shortlist`` (Dynamo's cost at temperature 0): every worker holding part of the prompt
  and one idle worker drawn at random. Every idle worker holding none of it costs the same,
  and one that is busy costs no less (each of its load terms is at least the idle one's); an
  idle candidate also keeps the candidates' least queued prefill at 0, which the overlap
  credit's decay is measured from, so the pick is one that scoring all of them could make.
  With no idle worker every candidate is scored.

Pure and synchronous; the idle workers among the least loaded are drawn without a scan while
most workers are idle (``ActiveSequences.least_loaded``).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Container, Mapping

from baton.router.sequences import ActiveSequences

__all__ = ["cost_shortlist", "latency_shortlist"]


def latency_shortlist(candidates: list[int], overlaps: Mapping[int, int],
                      sequences: ActiveSequences, k: int, rng: random.Random) -> list[int]:
    if len(candidates) <= 2 * k:
        return candidates
    holders = _holders(candidates, overlaps)
    if len(holders) > k:  # the least loaded of those holding the longest prefix first
        best = max(overlaps[w] for w in holders)
        longest = [w for w in holders if overlaps[w] == best]
        rest = [w for w in holders if overlaps[w] != best]
        picked = sequences.least_loaded(longest, min(k, len(longest)), rng)
        holders = picked + heapq.nlargest(k - len(picked), rest, key=overlaps.__getitem__)
    light = sequences.least_loaded(candidates, k, rng)
    return sorted(set(holders).union(light))


def cost_shortlist(candidates: list[int], overlaps: Mapping[int, int],
                   sequences: ActiveSequences, k: int, rng: random.Random) -> list[int]:
    if len(candidates) <= 2 * k:
        return candidates
    idle = sequences.least_loaded(candidates, 1, rng)
    if not idle or sequences.load(idle[0]).active_requests:
        return candidates
    return sorted(set(_holders(candidates, overlaps)).union(idle))


def _holders(candidates: list[int], overlaps: Mapping[int, int]) -> list[int]:
    """The candidates the index says hold part of the prompt."""
    if not overlaps:
        return []
    allowed: Container[int] = set(candidates) if len(overlaps) > 8 else candidates
    return [w for w in overlaps if w in allowed]
