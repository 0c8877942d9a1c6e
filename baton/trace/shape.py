"""Arrival shapes: re-time a trace so its request rate follows a curve (for the planner).

``reshape(requests, shape)`` keeps the requests, their order and their mean rate (count over
the trace's span) and moves their timestamps so the rate follows ``shape``'s relative
intensity ``f(t)``:

- ``step``: ``1`` before ``at_s``, ``ratio`` after;
- ``burst``: ``ratio`` for ``duration_s`` every ``period_s`` (from ``at_s``), ``1`` between;
- ``diurnal``: ``1 + (ratio - 1) (1 - cos(2 pi t / period_s)) / 2``, from 1 up to ``ratio``
  and back over each period.

Request ``i`` of ``n`` arrives at the time ``t`` where the intensity integrated from 0
(scaled so the whole span holds ``n``) reaches ``i``. Requests without a timestamp of their
own (a session's later turns) keep their ``delay``. Pure: no I/O, no clock.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import msgspec

from baton.trace.mooncake import TraceRequest

__all__ = ["ArrivalShape", "ShapeKind", "reshape"]

ShapeKind = Literal["source", "step", "burst", "diurnal"]
_GRID_S = 0.1


@dataclass(frozen=True, slots=True)
class ArrivalShape:
    kind: ShapeKind = "source"
    ratio: float = 4.0
    """The rate at its high over the rate at its low."""
    period_s: float = 3600.0
    at_s: float = 0.0
    duration_s: float = 60.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.ratio) and self.ratio > 0):
            raise ValueError(f"shape ratio must be > 0, got {self.ratio}")
        if self.period_s <= 0 or self.duration_s <= 0 or self.at_s < 0:
            raise ValueError("shape period and duration must be > 0, its start >= 0")

    def intensity(self) -> Callable[[float], float]:
        """``f(t)``, the relative request rate at ``t`` seconds."""
        ratio, period, at, duration = self.ratio, self.period_s, self.at_s, self.duration_s
        if self.kind == "step":
            return lambda t: ratio if t >= at else 1.0
        if self.kind == "burst":
            return lambda t: ratio if t >= at and (t - at) % period < duration else 1.0
        if self.kind == "diurnal":
            return lambda t: 1 + (ratio - 1) * (1 - math.cos(2 * math.pi * t / period)) / 2
        return lambda t: 1.0


def reshape(requests: list[TraceRequest], shape: ArrivalShape) -> list[TraceRequest]:
    """The requests re-timed to ``shape`` (see the module docstring)."""
    clocked = sorted((i for i, r in enumerate(requests) if r.delay is None),
                     key=lambda i: requests[i].timestamp)
    if shape.kind == "source" or len(clocked) < 2:
        return list(requests)
    first = requests[clocked[0]].timestamp
    span_s = max((requests[clocked[-1]].timestamp - first) / 1000, _GRID_S)
    f = shape.intensity()
    steps = math.ceil(span_s / _GRID_S)
    cumulative = [0.0]
    for k in range(steps):
        cumulative.append(cumulative[-1] + f((k + 0.5) * _GRID_S) * _GRID_S)
    scale = (len(clocked) - 1) / cumulative[-1]
    out = list(requests)
    for n, i in enumerate(clocked):
        target = n / scale
        k = min(max(bisect.bisect_left(cumulative, target) - 1, 0), steps - 1)
        within = (target - cumulative[k]) / max(cumulative[k + 1] - cumulative[k], 1e-12)
        at_s = (k + min(max(within, 0.0), 1.0)) * _GRID_S
        out[i] = msgspec.structs.replace(requests[i], timestamp=first + round(1000 * at_s))
    return out
