"""The SLA planner's pure core: predictors, worker profiles, and the planner that turns
observations into target worker counts per pool (``docs/planner.md``)."""

from baton.planner.core import Decision, Observation, Planner, PoolDecision, PoolObservation
from baton.planner.predictors import make_predictor
from baton.planner.profile import WorkerProfile

__all__ = ["Decision", "Observation", "Planner", "PoolDecision", "PoolObservation",
           "WorkerProfile", "make_predictor"]
