"""Routing: which worker serves a request.

Pure cores: ``indexer`` (the KV index), ``sequences`` (active load per worker),
``kv_selector`` (Dynamo's cost function and the picker), ``selectors`` (round-robin, random,
least-loaded), ``disagg`` (conditional disaggregation). On the runtime: ``policy`` (the
``RoutingPolicy`` protocol), ``kv_router`` (the KV-aware policy fed by workers' feeds),
``factory`` (``make_policy``: one factory for live serving and the simulator), ``pool`` (a
model's workers, their feeds, health and in-flight counts, opening the stream), ``registry``
(the models served, followed from discovery) and ``service`` (the standalone ``baton
router``). A router decides; it never forwards a request itself.
"""

from baton.router.factory import make_policy
from baton.router.pool import WorkerPool
from baton.router.registry import ModelEntry, ModelRegistry
from baton.router.selectors import (
    LeastLoadedSelector,
    RandomSelector,
    RoundRobinSelector,
    WorkerSelector,
    make_selector,
)

__all__ = [
    "LeastLoadedSelector",
    "ModelEntry",
    "ModelRegistry",
    "RandomSelector",
    "RoundRobinSelector",
    "WorkerPool",
    "WorkerSelector",
    "make_policy",
    "make_selector",
]
