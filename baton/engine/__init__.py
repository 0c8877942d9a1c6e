"""Engines: the cores every engine shares, and the engines built on them.

Pure cores (synchronous, clock-free, no I/O): ``request.py`` (the scheduler's request),
``scheduler.py`` (continuous batching over a block pool), ``step.py`` (what one step computes),
``timing.py`` (the simulated engine's step-time models). The engine shell ``core.py``
(``EngineCore``: the step loop, per-request mailboxes, KV hold and load for disaggregation)
drives them over an executor: ``mock.py`` (the simulated engine) or ``hf/`` (a transformers
model). Every engine is an ``Engine`` (``base.py``). A vLLM backend goes in ``vllm/``.
"""

from __future__ import annotations

from baton.engine.request import Request, RequestStatus
from baton.engine.scheduler import Scheduler
from baton.engine.step import KvLoad, SchedulerOutput, StepResult
from baton.engine.timing import PolynomialTiming, ProfileTiming, TimingModel, sleep_seconds

__all__ = [
    "KvLoad",
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
