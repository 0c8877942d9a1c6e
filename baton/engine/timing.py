"""Timing models for the simulated engine: how long one scheduler step would take on a GPU.

A model maps a step's shape (new prefill tokens, decoding requests, KV cache occupancy) to
milliseconds. ``PolynomialTiming`` is Dynamo's mocker default; ``ProfileTiming`` interpolates a
measured profile (format in ``docs/timing-model.md``). Pure functions of their inputs: the
engine shell divides by its speedup ratio (``sleep_seconds``) and does the sleeping.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from baton.kv.onboard_choice import OnboardCosts
from baton.kv.tiers import Tier

if TYPE_CHECKING:
    from baton.config import SchedulerConfig, TimingConfig
    from baton.engine.step import KvLoad, StepShape


class TimingModel(Protocol):
    """Duration of one step in milliseconds. ``prefill_pairs`` and ``decode_context`` are the
    step's attention work (``SchedulerOutput.prefill_attention_pairs``,
    ``decode_context_tokens``; 0: not known); models that do not weigh attention ignore them."""

    def step_ms(
        self,
        num_prefill_tokens: int,
        num_decode_requests: int,
        kv_tokens_in_use: int,
        kv_tokens_total: int,
        prefill_pairs: int = 0,
        decode_context: int = 0,
    ) -> float: ...


def lockstep_ms(model: TimingModel) -> Callable[[Sequence[StepShape]], float]:
    """A step of ranks in lockstep: the model's own rule when it has one, else the slowest
    rank's time (every rank waits for it)."""
    own = getattr(model, "lockstep_ms", None)
    if own is not None:
        return own  # type: ignore[no-any-return]

    def slowest(ranks: Sequence[StepShape]) -> float:
        return max(model.step_ms(*shape) for shape in ranks)

    return slowest


def kv_usage(kv_tokens_in_use: int, kv_tokens_total: int) -> float:
    """Fraction of KV capacity in use; 1.0 when there is no capacity (as Dynamo does)."""
    return kv_tokens_in_use / kv_tokens_total if kv_tokens_total > 0 else 1.0


class _PhaseTiming:
    """A step costs its prefill time plus, when any request decodes, its decode time."""

    __slots__ = ()

    def prefill_ms(self, num_prefill_tokens: int) -> float:
        raise NotImplementedError

    def decode_ms(self, usage: float) -> float:
        raise NotImplementedError

    def step_ms(
        self,
        num_prefill_tokens: int,
        num_decode_requests: int,
        kv_tokens_in_use: int,
        kv_tokens_total: int,
        prefill_pairs: int = 0,
        decode_context: int = 0,
    ) -> float:
        decode = 0.0
        if num_decode_requests > 0:
            decode = self.decode_ms(kv_usage(kv_tokens_in_use, kv_tokens_total))
        return self.prefill_ms(num_prefill_tokens) + decode


@dataclass(frozen=True, slots=True)
class PolynomialTiming(_PhaseTiming):
    """Dynamo mocker's default model.

    prefill_ms = a2*T^2 + a1*T + a0 for T > 0 new tokens (0 otherwise);
    decode_ms = max(min_decode_ms, b2*p^2 + b1*p + b0) with p the KV usage, when any request
    decodes; step = prefill + decode.
    """

    prefill_a2: float = 4.209989e-07
    prefill_a1: float = 1.518344e-02
    prefill_a0: float = 16.50142
    decode_b2: float = -25.74
    decode_b1: float = 54.01
    decode_b0: float = 5.74
    min_decode_ms: float = 1.0

    def prefill_ms(self, num_prefill_tokens: int) -> float:
        t = num_prefill_tokens
        if t <= 0:
            return 0.0
        return self.prefill_a2 * t * t + self.prefill_a1 * t + self.prefill_a0

    def decode_ms(self, usage: float) -> float:
        raw = self.decode_b2 * usage * usage + self.decode_b1 * usage + self.decode_b0
        return max(self.min_decode_ms, raw)

    def step_ms(
        self,
        num_prefill_tokens: int,
        num_decode_requests: int,
        kv_tokens_in_use: int,
        kv_tokens_total: int,
        prefill_pairs: int = 0,
        decode_context: int = 0,
    ) -> float:
        """``_PhaseTiming.step_ms`` with ``prefill_ms``, ``decode_ms`` and ``kv_usage``
        inlined, the same operations in the same order: the simulator calls it every step."""
        decode = 0.0
        if num_decode_requests > 0:
            p = kv_tokens_in_use / kv_tokens_total if kv_tokens_total > 0 else 1.0
            decode = max(self.min_decode_ms,
                         self.decode_b2 * p * p + self.decode_b1 * p + self.decode_b0)
        t = num_prefill_tokens
        prefill = self.prefill_a2 * t * t + self.prefill_a1 * t + self.prefill_a0 if t > 0 else 0.0
        return prefill + decode


@dataclass(frozen=True, slots=True)
class ProfileTiming(_PhaseTiming):
    """Piecewise-linear interpolation of a measured profile.

    Prefill is interpolated over new tokens and extrapolated linearly past both ends (never
    below 0 ms); decode is interpolated over KV usage and clamped to the end points.
    """

    prefill_tokens: tuple[float, ...]
    prefill_ms_points: tuple[float, ...]
    decode_kv_usage: tuple[float, ...]
    decode_ms_points: tuple[float, ...]

    def __post_init__(self) -> None:
        _validate_curve("prefill", "tokens", self.prefill_tokens, self.prefill_ms_points)
        _validate_curve("decode", "kv_usage", self.decode_kv_usage, self.decode_ms_points)
        if self.prefill_tokens[0] < 0:
            raise ValueError("profile prefill.tokens must be >= 0")
        if self.decode_kv_usage[0] < 0 or self.decode_kv_usage[-1] > 1:
            raise ValueError("profile decode.kv_usage must lie within [0, 1]")

    @classmethod
    def from_file(cls, path: str | Path) -> ProfileTiming:
        return cls.from_dict(_read_json(Path(path)))

    @classmethod
    def from_dict(cls, data: Any) -> ProfileTiming:
        prefill = _section(data, "prefill")
        decode = _section(data, "decode")
        return cls(
            prefill_tokens=_numbers(prefill, "prefill", "tokens"),
            prefill_ms_points=_numbers(prefill, "prefill", "ms"),
            decode_kv_usage=_numbers(decode, "decode", "kv_usage"),
            decode_ms_points=_numbers(decode, "decode", "ms"),
        )

    def prefill_ms(self, num_prefill_tokens: int) -> float:
        if num_prefill_tokens <= 0:
            return 0.0
        ms = _interpolate(self.prefill_tokens, self.prefill_ms_points, num_prefill_tokens, True)
        return max(0.0, ms)

    def decode_ms(self, usage: float) -> float:
        return _interpolate(self.decode_kv_usage, self.decode_ms_points, usage, False)


def timing_model(timing: TimingConfig, attention_dp: int = 1) -> TimingModel:
    """The roofline model of ``timing.roofline_model`` (an HF ``config.json``; a worker of
    ``attention_dp`` data-parallel ranks), else the profile in the JSON file
    ``timing.profile``, else the polynomial."""
    if timing.roofline_model:
        return _roofline(timing.roofline_model, timing.hardware, timing.tp, timing.ep,
                         attention_dp)
    return ProfileTiming.from_file(timing.profile) if timing.profile else PolynomialTiming()


@functools.lru_cache(maxsize=16)
def _roofline(path: str, hardware: str, tp: int, ep: int, dp: int) -> TimingModel:
    """A roofline model, built once per file and shape (the simulator asks often)."""
    from baton.engine.roofline import HARDWARE, ModelShape, Parallelism, RooflineTiming

    try:
        model = ModelShape.from_hf_config(_read_json(Path(path)))
    except KeyError as exc:
        raise ValueError(f"{path}: an HF config.json needs {exc.args[0]!r}") from None
    return RooflineTiming(model, HARDWARE[hardware], Parallelism(tp=tp, ep=ep, dp=dp))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def onboard_ms(load: KvLoad, costs: OnboardCosts) -> float:
    """Modelled milliseconds to copy a prefix's blocks up from the KV tiers, one after the
    other, at the read times of ``costs`` (``tier_costs``)."""
    return costs.onboard_ms({Tier.HOST: load.num_host_blocks, Tier.DISK: load.num_disk_blocks,
                             Tier.SHARED: load.num_shared_blocks})


def tier_costs(timing: TimingConfig, scheduler: SchedulerConfig, block_bytes: int,
               model: TimingModel) -> OnboardCosts:
    """The modelled costs of one block: read from the host tier at ``host_kv_gbps``, from disk
    at ``disk_kv_gbps`` plus ``disk_kv_latency_ms`` once per onboarding, from the shared store
    at ``shared_kv_gbps`` plus ``shared_kv_latency_ms``; and recomputed, its ``block_size``
    tokens' share of a prefill-only step of ``max_num_batched_tokens`` in ``model``."""
    step_tokens = scheduler.max_num_batched_tokens
    return OnboardCosts(
        read_ms={Tier.HOST: block_bytes / (timing.host_kv_gbps * 1e6),
                 Tier.DISK: block_bytes / (timing.disk_kv_gbps * 1e6),
                 Tier.SHARED: block_bytes / (timing.shared_kv_gbps * 1e6)},
        compute_ms=model.step_ms(step_tokens, 0, 0, 1) / step_tokens * scheduler.block_size,
        latency_ms={Tier.DISK: timing.disk_kv_latency_ms,
                    Tier.SHARED: timing.shared_kv_latency_ms})


def onboard_choice(timing: TimingConfig, scheduler: SchedulerConfig,
                   costs: OnboardCosts) -> OnboardCosts | None:
    """``costs`` for a scheduler with KV tiers to choose between onboarding and recomputing
    with (``recompute_slow_tiers``; ``OnboardCosts.blocks_worth_onboarding``), else None: it
    onboards whatever its tiers hold."""
    return costs if timing.recompute_slow_tiers and scheduler.kv_tiers else None


def sleep_seconds(step_ms: float, speedup_ratio: float) -> float:
    """Wall-clock seconds to sleep for a step; 0 when ``speedup_ratio`` is 0 (no delay)."""
    if speedup_ratio < 0:
        raise ValueError(f"speedup_ratio must be >= 0, got {speedup_ratio}")
    if speedup_ratio == 0:
        return 0.0
    return step_ms / 1000.0 / speedup_ratio


def _interpolate(xs: Sequence[float], ys: Sequence[float], x: float, extrapolate: bool) -> float:
    if x <= xs[0] and not extrapolate:
        return ys[0]
    if x >= xs[-1] and not extrapolate:
        return ys[-1]
    i = min(max(bisect.bisect_right(xs, x), 1), len(xs) - 1)  # segment [i-1, i]
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _section(data: Any, name: str) -> Mapping[str, Any]:
    section = data.get(name) if isinstance(data, Mapping) else None
    if not isinstance(section, Mapping):
        # A malformed profile file is a bad value, not a programming error.
        raise ValueError(f"timing profile needs an object field {name!r}")  # noqa: TRY004
    return section


def _numbers(section: Mapping[str, Any], name: str, key: str) -> tuple[float, ...]:
    values = section.get(key)
    if not isinstance(values, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        for v in values
    ):
        raise ValueError(f"timing profile {name}.{key} must be a list of finite numbers")
    return tuple(float(v) for v in values)


def _validate_curve(name: str, x_key: str, xs: Sequence[float], ys: Sequence[float]) -> None:
    if len(xs) != len(ys):
        raise ValueError(f"profile {name}.{x_key} and {name}.ms differ in length")
    if len(xs) < 2:
        raise ValueError(f"profile {name} needs at least 2 points")
    if any(b <= a for a, b in itertools.pairwise(xs)):
        raise ValueError(f"profile {name}.{x_key} must be strictly increasing")
    if any(y < 0 for y in ys):
        raise ValueError(f"profile {name}.ms must be >= 0")
