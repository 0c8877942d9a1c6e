"""Step-time models learned online from what workers report about their steps.

Each worker's engine reports, per step, the prefill tokens it computed, the requests it
decoded, the KV tokens in use and how long the step took (``protocol.StepSample``). A
``StepTimeModel`` fits, by ridge least squares with older samples weighted down, ::

    step_s ≈ θ · x(T, D, u)
    x = [T > 0, T / 1000, (T / 1000)², D > 0, D / 100, u·[D > 0], u²·[D > 0]]

with ``T`` the prefill tokens, ``D`` the decoding requests and ``u`` the KV usage. The
features cover the shapes engines have: a fixed cost for a step with prefill and one for a
step with decodes, prefill cost linear and quadratic in its tokens (attention), decode cost
per request and growing with the KV it reads. The ridge pulls coefficients the samples do
not determine (a prefill-only worker never shows its decode terms) towards the *prior*: the
pool-wide model where there is one, else a generic starting point. No weight is set by hand
for any engine: the simulated engine, the transformers engine and vLLM are all learned.

``StepTimeModels`` keeps one model per worker plus the pool-wide one (every worker's
samples), and answers for a worker with its own model once it has ``min_samples`` samples,
the pool's before that.

Pure and synchronous: no I/O, no clock. A refit happens lazily, when a prediction is asked
for and ``refit_every`` samples have arrived since the last one (or none was made yet), so a
routing decision costs a cached dot product.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from baton.protocol import StepSample

__all__ = ["GENERIC_PRIOR", "NUM_FEATURES", "Fit", "StepTimeModel", "StepTimeModels"]

NUM_FEATURES = 7

GENERIC_PRIOR = (0.010, 0.020, 0.0, 0.010, 0.0, 0.0, 0.0)
"""Where a model starts before it has samples, in seconds per feature unit: 10 ms for a step
with prefill plus 20 ms per 1,000 prompt tokens, 10 ms for a step with decodes. Only its
ordering matters (more work takes longer); the first samples replace it."""


def _row(sample: StepSample) -> tuple[float, ...] | None:
    """A step's feature vector followed by its seconds; None for an empty step or a negative
    time, which say nothing about step time (``Fit.step_s`` evaluates the same vector)."""
    t_tokens, decodes = sample.prefill_tokens, sample.decode_requests
    if sample.seconds < 0 or (t_tokens <= 0 and decodes <= 0):
        return None
    total = sample.kv_tokens_total
    u = sample.kv_tokens_in_use / total if total > 0 and decodes > 0 else 0.0
    t = t_tokens / 1000.0
    return (1.0 if t_tokens > 0 else 0.0, t, t * t, 1.0 if decodes > 0 else 0.0,
            decodes / 100.0, u, u * u, sample.seconds)


@dataclass(frozen=True, slots=True)
class Fit:
    """A model's coefficients and how many samples they come from."""

    theta: tuple[float, ...]
    num_samples: int

    def step_s(self, prefill_tokens: float, decode_requests: float, kv_usage: float) -> float:
        """Predicted seconds of one step (never below 0; 0 for an empty step)."""
        if prefill_tokens <= 0 and decode_requests <= 0:
            return 0.0
        th = self.theta
        t = prefill_tokens / 1000.0
        total = th[0] + th[1] * t + th[2] * t * t if prefill_tokens > 0 else 0.0
        if decode_requests > 0:
            u = kv_usage
            total += th[3] + th[4] * decode_requests / 100.0 + th[5] * u + th[6] * u * u
        return max(0.0, total)


class StepTimeModel:
    """One ridge-regression fit, samples weighted down by ``1 − 1/window`` per newer one
    (about the last ``window`` samples count)."""

    def __init__(self, *, window: int = 512, ridge: float = 1e-3, refit_every: int = 32) -> None:
        if window < 1 or ridge <= 0 or refit_every < 1:
            raise ValueError("window and refit_every must be >= 1 and ridge > 0")
        self.ridge = ridge
        self.refit_every = refit_every
        self.decay = 1.0 - 1.0 / window
        self._xtx = np.zeros((NUM_FEATURES, NUM_FEATURES))
        self._xty = np.zeros(NUM_FEATURES)
        self._pending: list[tuple[float, ...]] = []
        self._weights = self.decay ** np.arange(window - 1, -1, -1, dtype=np.float64)
        """The newest ``window`` samples' weights, oldest first (a refit takes its tail)."""
        self._ridge_eye = ridge * np.eye(NUM_FEATURES)
        self._fit: Fit | None = None
        self.num_observed = 0
        """Samples observed (empty steps and negative times are ignored)."""

    def observe(self, sample: StepSample) -> None:
        """O(1): the sample waits, as a row, for the next refit."""
        row = _row(sample)
        if row is not None:
            self.add(row)

    def add(self, row: tuple[float, ...]) -> None:
        """A sample already made a row by ``_row``."""
        self._pending.append(row)
        self.num_observed += 1

    @property
    def num_samples(self) -> int:
        return self.num_observed

    def fit(self, prior: Sequence[float] = GENERIC_PRIOR) -> Fit:
        """Coefficients minimizing ``Σ wᵢ(xᵢ·θ − yᵢ)² + ridge·|θ − prior|²``; the cached ones
        while fewer than ``refit_every`` samples came since (a changed prior waits too: with
        hundreds of workers, each refitting at every change of the pool's prior would cost
        more than the routing)."""
        if self._fit is not None and len(self._pending) < self.refit_every:
            return self._fit
        prior_t = tuple(prior)
        self._absorb()
        if self.num_observed == 0:
            self._fit = Fit(prior_t, 0)
        else:
            p = np.asarray(prior_t, dtype=np.float64)
            theta = np.linalg.solve(self._xtx + self._ridge_eye, self._xty + self.ridge * p)
            self._fit = Fit(tuple(float(v) for v in theta), self.num_observed)
        return self._fit

    def _absorb(self) -> None:
        """Folds the pending samples into the weighted sums."""
        if not self._pending:
            return
        rows = np.asarray(self._pending, dtype=np.float64)
        self._pending = []
        n = len(rows)
        x = rows[:, :NUM_FEATURES]
        if n <= len(self._weights):
            w = self._weights[-n:]
        else:
            w = self.decay ** np.arange(n - 1, -1, -1, dtype=np.float64)
        xw = x * w[:, None]
        keep = self.decay ** n
        self._xtx = keep * self._xtx + xw.T @ x
        self._xty = keep * self._xty + xw.T @ rows[:, NUM_FEATURES]


class StepTimeModels:
    """A model per worker and a pool-wide one, which is each worker's prior."""

    def __init__(self, *, window: int = 512, min_samples: int = 32, ridge: float = 1e-3) -> None:
        self.min_samples = min_samples
        self._window = window
        self._ridge = ridge
        self.pool = StepTimeModel(window=window * 4, ridge=ridge, refit_every=512)
        self._workers: dict[int, StepTimeModel] = {}

    def observe(self, worker_id: int, samples: Iterable[StepSample]) -> None:
        model = self._workers.get(worker_id)
        if model is None:
            model = self._workers[worker_id] = StepTimeModel(window=self._window,
                                                             ridge=self._ridge)
        pool = self.pool
        for sample in samples:
            row = _row(sample)
            if row is not None:
                model.add(row)
                pool.add(row)

    def remove_worker(self, worker_id: int) -> None:
        self._workers.pop(worker_id, None)

    def for_worker(self, worker_id: int) -> Fit:
        """The worker's own fit once it has ``min_samples`` samples, else the pool's."""
        pool = self.pool.fit()
        model = self._workers.get(worker_id)
        if model is None or model.num_samples < self.min_samples:
            return pool
        return model.fit(pool.theta)

    def num_samples(self, worker_id: int) -> int:
        model = self._workers.get(worker_id)
        return 0 if model is None else model.num_samples
