"""Whether a prefix found in the lower KV tiers is worth copying up or cheaper to recompute.

A run of blocks ``KvTiers.match`` found below the device pool can be onboarded (copied up at
its tiers' read speed) or recomputed (prefilled again). A slow tier loses: a block of
16 tokens x 128 KiB read from a disk at 3 GB/s takes 0.70 ms, while a full prefill step of
the default timing model computes it in 0.33 ms. ``OnboardCosts.blocks_worth_onboarding``
keeps the leading part of the run that saves the most time against recomputing it, which
is all of it when every tier reads faster than the engine computes, and none of it when
none does; blocks after a recomputed one cannot be used, so the choice is a prefix.

Times per block: ``read_ms[tier]`` (bytes over bandwidth), plus ``latency_ms[tier]`` once
per onboarding that reads that tier, against ``compute_ms`` (one block's share of a full
prefill step). ``credits`` turns the same times into what a router counts a lower tier's
block as (``KV_TIER_CREDITS_KEY``). Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from baton.kv.tiers import Tier, TierBlock

__all__ = ["OnboardCosts", "format_tier_credits", "parse_tier_credits"]


@dataclass(frozen=True, slots=True)
class OnboardCosts:
    read_ms: Mapping[Tier, float]
    """Milliseconds to copy one block up from each lower tier."""
    compute_ms: float
    """Milliseconds to prefill one block's tokens again."""
    latency_ms: Mapping[Tier, float] = field(default_factory=dict)
    """Milliseconds added once to an onboarding that reads the tier."""

    def __post_init__(self) -> None:
        values = [self.compute_ms, *self.read_ms.values(), *self.latency_ms.values()]
        if any(not v >= 0 for v in values):
            raise ValueError(f"onboarding costs must be >= 0, got {self}")

    def onboard_ms(self, counts: Mapping[Tier, int]) -> float:
        """Time to copy up ``counts[tier]`` blocks of each tier, one after the other."""
        return sum(n * self.read_ms.get(t, 0.0) + self.latency_ms.get(t, 0.0)
                   for t, n in counts.items() if n)

    def credits(self) -> dict[str, float]:
        """What a block held in host memory or on disk (the tiers KV events name) is worth to
        a router against one on the device, by tier name: the share of its compute time that
        reading it saves (0 when reading is no faster; per block, the once-per-onboarding
        latency left out). Empty without a compute time."""
        if self.compute_ms <= 0:
            return {}
        return {t.name.lower(): max(0.0, 1.0 - self.read_ms[t] / self.compute_ms)
                for t in (Tier.HOST, Tier.DISK) if t in self.read_ms}

    def blocks_worth_onboarding(self, run: Sequence[TierBlock]) -> int:
        """How many of ``run``'s leading blocks to copy up: the prefix saving the most time
        over recomputing it (0: recompute the whole run; the shortest such prefix on a tie)."""
        best, best_saving, saving = 0, 0.0, 0.0
        seen: set[Tier] = set()
        for i, block in enumerate(run, 1):
            saving += self.compute_ms - self.read_ms.get(block.tier, 0.0)
            if block.tier not in seen:
                seen.add(block.tier)
                saving -= self.latency_ms.get(block.tier, 0.0)
            if saving > best_saving:
                best, best_saving = i, saving
        return best


def format_tier_credits(credits: Mapping[str, float]) -> str:
    return ",".join(f"{tier}={credit:.3f}" for tier, credit in sorted(credits.items()))


def parse_tier_credits(text: str) -> dict[str, float]:
    """``format_tier_credits``'s text back; ValueError on a malformed one or a credit outside
    0..1."""
    out = {}
    for part in text.split(","):
        tier, _, value = part.partition("=")
        credit = float(value)
        if not tier or not 0 <= credit <= 1:
            raise ValueError(f"bad KV tier credit {part!r}")
        out[tier.strip()] = credit
    return out
