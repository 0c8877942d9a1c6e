"""Workers: an engine served on the request plane and registered in discovery.

Owns no routing or HTTP. ``build_worker`` makes a worker from its config section;
``run_worker`` is ``baton worker``.
"""

from baton.worker.factory import build_engine, build_worker
from baton.worker.run import run_worker
from baton.worker.worker import SUBJECT_KINDS, Worker

__all__ = ["SUBJECT_KINDS", "Worker", "build_engine", "build_worker", "run_worker"]
