"""Disaggregated serving in the simulator: the KV transfer model, routes and statistics.

The event flow lives in ``cluster.py``; this module holds what it computes with:

- ``transfer_seconds``: a decode leg's KV load of ``n`` blocks takes
  ``n x block_size x kv_bytes_per_token / (kv_transfer_gbps x 1e9)`` virtual seconds, whole
  blocks (the last one may be partly filled), no latency term, no contention between
  concurrent transfers (each has the full bandwidth);
- ``held_kv_params``: the ``KvTransferParams`` a prefill worker hands out for a finished
  ``hold_kv`` request, as the live engine shell builds them (0-byte blocks, layout
  ``simulated``, like the mock engine);
- ``SimRoute``: how one request went (prefill local or remote and why, which workers, what
  moved), and ``DisaggStats``, their summary for reports.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import msgspec

from baton.engine.scheduler import Scheduler
from baton.protocol import KvTransferParams

SIM_KV_LAYOUT = "simulated"

RouteReason = Literal["remote", "short_prompt", "prefill_busy", "fallback"]
LOCAL_REASONS: tuple[RouteReason, ...] = ("short_prompt", "prefill_busy", "fallback")


@dataclass(slots=True)
class SimRoute:
    """How one request of a disaggregated deployment was served."""

    reason: RouteReason
    """``remote``: prefilled on a prefill worker; otherwise why it prefilled on its decode
    worker (``fallback``: the prefill leg could never fit a prefill worker)."""
    prompt_tokens: int
    prefill_worker_id: int | None = None
    decode_worker_id: int | None = None
    prefill_cached_tokens: int | None = None
    """Prompt tokens the prefill worker's prefix cache served (remote only)."""
    transfer_blocks: int = 0
    """Blocks copied to the decode worker: those its own prefix cache lacked."""
    transfer_s: float | None = None
    """Modelled duration of the KV load (None: no load)."""

    @property
    def remote(self) -> bool:
        return self.reason == "remote"


def transfer_seconds(
    num_blocks: int, block_size: int, kv_bytes_per_token: int, gbps: float
) -> float:
    """Virtual seconds a KV load of ``num_blocks`` whole blocks takes."""
    return num_blocks * block_size * kv_bytes_per_token / (gbps * 1e9)


def held_kv_params(scheduler: Scheduler, request_id: str) -> KvTransferParams:
    """Where a finished prefill leg's KV waits: its held blocks on ``scheduler``'s worker."""
    req = scheduler.held[request_id]
    return KvTransferParams(
        transfer_id=request_id, worker_id=scheduler.worker_id,
        address=f"sim://{scheduler.worker_id}", block_ids=[b.block_id for b in req.blocks],
        num_tokens=req.num_computed_tokens, block_size=scheduler.config.block_size,
        block_bytes=0, layout=SIM_KV_LAYOUT,
    )


class DisaggStats(msgspec.Struct, kw_only=True):
    """What the routes of one disaggregated run add up to."""

    num_remote: int
    num_local: dict[str, int]
    """By reason: short_prompt, prefill_busy, fallback."""
    num_transfers: int
    mean_transfer_ms: float | None
    transfer_gb: float
    """Bytes moved between the pools, in GB (1e9)."""
    prefill_cache_hit_rate: float | None
    """Prefix-cache hits on prefill workers / prompt tokens of remote prefills."""

    @classmethod
    def from_routes(
        cls, routes: Iterable[SimRoute], block_size: int, kv_bytes_per_token: int
    ) -> DisaggStats:
        local: dict[str, int] = dict.fromkeys(LOCAL_REASONS, 0)
        num_remote = blocks = prompt = cached = 0
        transfers: list[float] = []
        for route in routes:
            if not route.remote:
                local[route.reason] += 1
                continue
            num_remote += 1
            blocks += route.transfer_blocks
            if route.transfer_s is not None:
                transfers.append(route.transfer_s)
            if route.prefill_cached_tokens is not None:
                prompt += route.prompt_tokens
                cached += route.prefill_cached_tokens
        return cls(
            num_remote=num_remote, num_local=local, num_transfers=len(transfers),
            mean_transfer_ms=1000 * sum(transfers) / len(transfers) if transfers else None,
            transfer_gb=blocks * block_size * kv_bytes_per_token / 1e9,
            prefill_cache_hit_rate=cached / prompt if prompt else None,
        )

    def format(self) -> str:
        """One line for the simulator's stderr report."""
        local = ", ".join(f"{k} {v}" for k, v in self.num_local.items())
        mean = "n/a" if self.mean_transfer_ms is None else f"{self.mean_transfer_ms:.2f} ms"
        hits = ("n/a" if self.prefill_cache_hit_rate is None
                else f"{100 * self.prefill_cache_hit_rate:.1f}%")
        return (f"disagg: {self.num_remote} remote prefills, {sum(self.num_local.values())} "
                f"local ({local}); {self.num_transfers} KV transfers, mean {mean}, "
                f"{self.transfer_gb:.2f} GB; prefill cache hit rate {hits}")
