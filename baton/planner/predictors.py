"""Predictors of the request count per interval for the planner's throughput mode.

Each takes one value per interval (``add``) and predicts ``steps`` intervals ahead
(``predict``). All ignore the leading zeros of an idle start (a deployment that has seen no
traffic yet has nothing to learn from) and read a NaN as 0. ``ready`` says whether enough
values came to act on (``min_points``): until then the planner's throughput mode changes
nothing, so cold-start samples cannot size a pool. ``settled`` says whether the predictor has
seen all it needs (the seasonal one: a whole period): until then no pool shrinks.

- ``constant``: the last value;
- ``moving-average``: the mean of the last ``window`` values;
- ``kalman``: a local linear trend (level and slope) filtered with a Kalman filter, so a
  ramp is followed ahead rather than behind; before ``min_points`` values, the last value;
- ``seasonal``: the value one period (``season`` values) before the one predicted, as
  traffic that repeats daily or bursts on a schedule does; the last value until a whole
  period has been seen (and only then ``settled``: a deployment keeps what it started with
  through the first period, a burst it has not seen yet included).

``slope_t`` tells a trend from noise (the planner lets a pool shrink fuller while traffic
falls, and sizes it ahead while traffic rises: ``project``).

Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from baton.config import PredictorKind

__all__ = ["ConstantPredictor", "KalmanPredictor", "MovingAverage", "Predictor", "SeasonalPredictor",
           "make_predictor", "project", "slope_t"]


class Predictor(Protocol):
    def add(self, value: float) -> None: ...

    def predict(self, steps: int = 1) -> float:
        """The value expected ``steps`` intervals after the last one added (never < 0)."""
        ...

    @property
    def ready(self) -> bool:
        """Enough values (past the idle start) to act on."""
        ...

    @property
    def settled(self) -> bool:
        """Ready, and all seen that a forecast draws on (a whole period for a seasonal one):
        until then a pool may grow on the predictions but not shrink."""
        ...


class _Base:
    def __init__(self, min_points: int) -> None:
        self.min_points = min_points
        self.count = 0
        """Values taken (leading zeros not counted)."""

    def _take(self, value: float) -> float | None:
        """The value to learn from, or None for a leading zero."""
        value = 0.0 if math.isnan(value) else value
        if self.count == 0 and value == 0:
            return None
        self.count += 1
        return value

    @property
    def ready(self) -> bool:
        return self.count >= self.min_points

    @property
    def settled(self) -> bool:
        return self.ready


class ConstantPredictor(_Base):
    def __init__(self, min_points: int = 1) -> None:
        super().__init__(min_points)
        self._last = 0.0

    def add(self, value: float) -> None:
        taken = self._take(value)
        if taken is not None:
            self._last = taken

    def predict(self, steps: int = 1) -> float:
        return self._last


class _LastValues(_Base):
    """Keeps the last ``window`` values taken."""

    def __init__(self, window: int, min_points: int) -> None:
        super().__init__(min_points)
        self._values: deque[float] = deque(maxlen=window)

    def add(self, value: float) -> None:
        taken = self._take(value)
        if taken is not None:
            self._values.append(taken)


class MovingAverage(_LastValues):
    def __init__(self, window: int = 5, min_points: int = 1) -> None:
        super().__init__(window, min_points)

    def predict(self, steps: int = 1) -> float:
        return sum(self._values) / len(self._values) if self._values else 0.0


class KalmanPredictor(_Base):
    """Local linear trend: state (level, slope), ``x' = F x`` with ``F = [[1, 1], [0, 1]]``,
    observed level with noise ``r``, process noise ``q_level``, ``q_slope``."""

    def __init__(self, min_points: int = 5, *, q_level: float = 1.0, q_slope: float = 0.1,
                 r: float = 10.0) -> None:
        super().__init__(min_points)
        self.q_level, self.q_slope, self.r = q_level, q_slope, r
        self._level = self._slope = 0.0
        self._p = [[1000.0, 0.0], [0.0, 1000.0]]  # state covariance: unknown at first

    def add(self, value: float) -> None:
        taken = self._take(value)
        if taken is None:
            return
        if self.count == 1:
            self._level = taken
            return
        # predict one step
        level, slope = self._level + self._slope, self._slope
        (a, b), (c, d) = self._p
        p00 = a + b + c + d + self.q_level
        p01 = b + d
        p10 = c + d
        p11 = d + self.q_slope
        # update with the observed level
        s = p00 + self.r
        k0, k1 = p00 / s, p10 / s
        residual = taken - level
        self._level, self._slope = level + k0 * residual, slope + k1 * residual
        self._p = [[(1 - k0) * p00, (1 - k0) * p01], [p10 - k1 * p00, p11 - k1 * p01]]

    def predict(self, steps: int = 1) -> float:
        if self.count < self.min_points:
            return max(0.0, self._level)  # the last value, until the trend can be trusted
        return max(0.0, self._level + steps * self._slope)


class SeasonalPredictor(_LastValues):
    """Seasonal naive: ``predict(steps)`` is the value ``season - steps + 1`` values back (the
    same point of the last period); the last value until ``season`` values came, or for a
    horizon of a whole period or more."""

    def __init__(self, season: int, min_points: int = 1) -> None:
        if season < 2:
            raise ValueError(f"season must be >= 2 intervals, got {season}")
        super().__init__(season, min_points)
        self.season = season

    @property
    def settled(self) -> bool:
        return self.ready and len(self._values) >= self.season

    def predict(self, steps: int = 1) -> float:
        if not self._values:
            return 0.0
        if len(self._values) < self.season or not 1 <= steps <= self.season:
            return self._values[-1]
        return self._values[steps - 1]  # the oldest is one period before the next value


def _line(values: Sequence[float]) -> tuple[float, float, float]:
    """The least-squares line through ``values`` at x = 0, 1, ...: (level at 0, slope, sxx)."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    sxx = sum((x - mean_x) ** 2 for x in range(n))
    slope = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values)) / sxx
    return mean_y - slope * mean_x, slope, sxx


def project(values: Sequence[float], steps: float) -> float:
    """The least-squares line through ``values`` (two or more), ``steps`` intervals after
    the last one."""
    level, slope, _ = _line(values)
    return level + slope * (len(values) - 1 + steps)


def slope_t(values: Sequence[float]) -> float:
    """The least-squares slope of ``values`` (one per interval) over its standard error: how
    many standard errors the trend is from flat. Noise alone rarely goes far below 0 (12
    values of white noise: below -5 about 3 times in 10,000); a sustained fall does. 0 for
    fewer than 4 values; +-inf for values exactly on a sloped line."""
    n = len(values)
    if n < 4:
        return 0.0
    level, slope, sxx = _line(values)
    residuals = sum((y - level - slope * x) ** 2 for x, y in enumerate(values))
    if residuals <= 1e-12 * max(1.0, sum(y * y for y in values)):
        return 0.0 if slope == 0 else math.copysign(math.inf, slope)
    return slope / math.sqrt(residuals / (n - 2) / sxx)


def make_predictor(kind: PredictorKind, min_points: int, season: int | None = None) -> Predictor:
    if kind == "constant":
        return ConstantPredictor(min_points)
    if kind == "moving-average":
        return MovingAverage(min_points=min_points)
    if kind == "seasonal":
        if season is None:
            raise ValueError("the seasonal predictor needs its season (intervals)")
        return SeasonalPredictor(season, min_points)
    return KalmanPredictor(min_points)
