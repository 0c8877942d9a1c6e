"""Routing: which worker serves a request.

``selectors`` holds the pure choice functions (round-robin, random, least-loaded; the
KV-aware selector joins them behind the same protocol); ``pool`` is the shell that tracks a
model's workers, in-flight counts and health, and opens the stream to the chosen one.
"""

from baton.router.pool import WorkerPool
from baton.router.selectors import (
    LeastLoadedSelector,
    RandomSelector,
    RoundRobinSelector,
    WorkerSelector,
    make_selector,
)

__all__ = [
    "LeastLoadedSelector",
    "RandomSelector",
    "RoundRobinSelector",
    "WorkerPool",
    "WorkerSelector",
    "make_selector",
]
