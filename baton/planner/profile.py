"""What one worker sustains within the SLA: the planner's throughput mode sizes pools by it.

``prefill_tokens_per_s``: prompt tokens per second a worker computes with its requests'
TTFT within target; ``decode_tokens_per_s``: output tokens per second it produces with ITL
within target. A prefill pool then serves ``prefill_tokens_per_s / ISL`` requests/s per
worker, a decode pool ``decode_tokens_per_s / OSL``, and an aggregated worker, which shares
its time between both, ``1 / (ISL / prefill_tokens_per_s + OSL / decode_tokens_per_s)``.

Pure: no I/O (a profile file is read by the caller).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["WorkerProfile"]


@dataclass(frozen=True, slots=True)
class WorkerProfile:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float

    def __post_init__(self) -> None:
        for name in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0, got {value!r}")

    def requests_per_s(self, pool: str, isl: float, osl: float) -> float:
        """Requests/s one worker of pool ``agg``, ``prefill`` or ``decode`` serves within the
        SLA at these mean lengths."""
        prefill_s = max(isl, 1.0) / self.prefill_tokens_per_s
        decode_s = max(osl, 1.0) / self.decode_tokens_per_s
        if pool == "prefill":
            return 1 / prefill_s
        if pool == "decode":
            return 1 / decode_s
        return 1 / (prefill_s + decode_s)
