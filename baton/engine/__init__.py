"""The engine: per-step scheduling of requests onto a KV block pool, and the timing models of
the simulated engine. The cores here are synchronous and clock-free; async engine shells drive
them (``schedule`` -> step -> ``update_from_output``).
"""

from __future__ import annotations

from baton.engine.request import Request, RequestStatus
from baton.engine.scheduler import (
    Scheduler,
    SchedulerOutput,
    StepResult,
)
from baton.engine.timing import PolynomialTiming, ProfileTiming, TimingModel, sleep_seconds

__all__ = [
    "PolynomialTiming",
    "ProfileTiming",
    "Request",
    "RequestStatus",
    "Scheduler",
    "SchedulerOutput",
    "StepResult",
    "TimingModel",
    "sleep_seconds",
]
