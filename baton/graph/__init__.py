"""Graphs: deployments of Baton's components. ``embedded`` is the one-process graph
``baton serve`` runs; a YAML graph (``schema``) runs as supervised local processes on NATS
(``supervisor``; ``baton serve -f FILE``).
"""

from baton.graph.embedded import embedded, run_serve
from baton.graph.schema import (
    ENGINE_KEYS,
    EngineSection,
    FrontendSpec,
    GraphConfig,
    GraphStartError,
    NatsSpec,
    ProcessSpec,
    RouterSpec,
    SupervisionSpec,
    WorkerPoolSpec,
    engine_args,
    load_graph,
    parse_graph,
    plan,
)
from baton.graph.supervisor import Graph, ManagedProcess, Supervisor, run_graph

__all__ = [
    "ENGINE_KEYS", "EngineSection", "FrontendSpec", "Graph", "GraphConfig", "GraphStartError",
    "ManagedProcess", "NatsSpec", "ProcessSpec", "RouterSpec", "SupervisionSpec", "Supervisor",
    "WorkerPoolSpec", "embedded", "engine_args", "load_graph", "parse_graph", "plan",
    "run_graph", "run_serve",
]
