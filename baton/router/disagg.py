"""Conditional disaggregation: does this request's prefill go to a prefill worker?

Pure and synchronous. The frontend asks ``decide`` once per request, before any prefill,
with what it knows: the prompt length, how much of the prompt the decode worker the router
would pick already caches, and the prefill pool's lightest load. Remote prefill pays a KV
transfer and an extra hop; it is worth it for long uncached prompts on an idle prefill pool.

- ``isl``: local when ``eff_isl = prompt - cached`` is below ``max_local_prefill_tokens`` and
  ``eff_isl / prompt`` below ``max_local_prefill_ratio`` (both strict, as Dynamo's
  ``isl_bounding``);
- ``load``: local when every prefill worker is busy: more active prefill tokens than
  ``prefill_busy_tokens`` or more waiting requests than ``prefill_busy_waiting`` (a worker
  with no load signal yet is not busy);
- ``isl_or_load``: local when either says so; ``always``: never local.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from baton.config import DisaggConfig
from baton.protocol import LoadMetrics

Reason = Literal["remote", "short_prompt", "prefill_busy"]


@dataclass(frozen=True, slots=True)
class DisaggDecision:
    remote: bool
    reason: Reason
    eff_isl: int
    """Prompt tokens the prefill would compute (prompt minus the decode worker's cache)."""


def decide(
    config: DisaggConfig,
    *,
    prompt_tokens: int,
    cached_tokens: int,
    prefill_loads: Iterable[LoadMetrics | None],
) -> DisaggDecision:
    eff_isl = max(0, prompt_tokens - cached_tokens)
    policy = config.policy
    if policy in ("isl", "isl_or_load") and _short(config, eff_isl, prompt_tokens):
        return DisaggDecision(False, "short_prompt", eff_isl)
    if policy in ("load", "isl_or_load") and _busy(config, prefill_loads):
        return DisaggDecision(False, "prefill_busy", eff_isl)
    return DisaggDecision(True, "remote", eff_isl)


def _short(config: DisaggConfig, eff_isl: int, prompt_tokens: int) -> bool:
    ratio = eff_isl / max(prompt_tokens, 1)
    return eff_isl < config.max_local_prefill_tokens and ratio < config.max_local_prefill_ratio


def _busy(config: DisaggConfig, loads: Iterable[LoadMetrics | None]) -> bool:
    def busy(m: LoadMetrics | None) -> bool:
        return m is not None and (
            m.active_prefill_tokens > config.prefill_busy_tokens
            or m.num_waiting > config.prefill_busy_waiting
        )

    loads = list(loads)
    return bool(loads) and all(busy(m) for m in loads)
