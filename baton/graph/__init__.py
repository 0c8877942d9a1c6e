"""Graphs: a YAML description of a Baton deployment (``schema``), run as supervised local
processes (``supervisor``). ``baton serve -f FILE`` and ``python -m baton.graph FILE`` run one.
"""

from baton.graph.schema import (
    ENGINE_KEYS,
    FrontendSpec,
    GraphConfig,
    GraphStartError,
    NatsSpec,
    ProcessSpec,
    RouterSpec,
    SupervisionSpec,
    WorkerPoolSpec,
    load_graph,
    parse_graph,
    plan,
)
from baton.graph.supervisor import Graph, ManagedProcess, Supervisor, run_graph

__all__ = [
    "ENGINE_KEYS", "FrontendSpec", "Graph", "GraphConfig", "GraphStartError", "ManagedProcess",
    "NatsSpec", "ProcessSpec", "RouterSpec", "SupervisionSpec", "Supervisor", "WorkerPoolSpec",
    "load_graph", "parse_graph", "plan", "run_graph",
]
