"""Workers: an engine served on the request plane and registered in discovery.

Owns no routing or HTTP. ``build_worker`` makes a worker from its config section.
"""

from baton.worker.factory import build_engine, build_worker
from baton.worker.worker import Worker

__all__ = ["Worker", "build_engine", "build_worker"]
