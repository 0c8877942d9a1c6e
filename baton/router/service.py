"""The standalone router (``baton router``): KV-aware routing decisions as a service.

An external gateway sends a request's token ids to ``route`` and gets the worker to use
(and that worker's cached overlap); the router counts the request as active on that worker
until the gateway reports ``mark_prefill`` (first token seen) and ``mark_free`` (stream
ended). ``overlap_scores`` answers how many prompt blocks each worker holds, without side
effects. Like ``KvRouter`` itself, it only decides: it never forwards a request.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncGenerator

import msgspec

from baton.config import RouterServiceConfig, RuntimeConfig
from baton.errors import InvalidRequestError
from baton.kv.hashing import compute_local_hashes, compute_sequence_hashes
from baton.protocol import GenerateRequest, SamplingParams
from baton.router.kv_router import KvRouter
from baton.router.kv_selector import RouterOverrides
from baton.router.policy import RouteHints
from baton.router.registry import ModelEntry, ModelRegistry
from baton.runtime import EndpointServer
from baton.runtime.process import describe_discovery, open_runtime


class RouteRequest(msgspec.Struct, kw_only=True):
    request_id: str
    token_ids: list[int]
    model: str | None = None
    """Needed only when the router serves several models."""
    overlap_score_credit: float | None = None
    prefill_load_scale: float | None = None
    temperature: float | None = None
    session_id: str | None = None
    """The conversation the request belongs to: its turns go to one worker while it can take
    them (``router.sessions``)."""
    max_tokens: int = 1
    """The output the request asks for (the latency router weighs its decode)."""


class RouteDecision(msgspec.Struct, kw_only=True):
    worker_id: int
    address: str
    overlap_blocks: int
    predicted_hit_rate: float
    costs: dict[int, float]
    """Every candidate's cost (the decision's terms are logged at debug level)."""


class RequestRef(msgspec.Struct):
    request_id: str
    model: str | None = None
    cached_tokens: int | None = None
    """With ``mark_prefill``: the prompt tokens the engine served from its cache."""


class Ack(msgspec.Struct):
    ok: bool = True


class TokensQuery(msgspec.Struct, kw_only=True):
    token_ids: list[int]
    model: str | None = None


class OverlapScores(msgspec.Struct, kw_only=True):
    block_size: int
    scores: dict[int, int]
    """Worker id → number of leading prompt blocks it holds (0s omitted)."""


class RouterService:
    def __init__(self, models: ModelRegistry) -> None:
        self.models = models
        self.endpoints = EndpointServer()
        self.endpoints.add("route", self._route, RouteRequest, RouteDecision)
        self.endpoints.add("mark_prefill", self._mark_prefill, RequestRef, Ack)
        self.endpoints.add("mark_free", self._mark_free, RequestRef, Ack)
        self.endpoints.add("overlap_scores", self._overlap_scores, TokensQuery, OverlapScores)

    def _entry(self, model: str | None) -> tuple[ModelEntry, KvRouter]:
        if model is None:
            served = self.models.served()
            if len(served) != 1:
                raise InvalidRequestError(
                    f"name the model: this router serves {', '.join(served) or 'none'}",
                    param="model",
                )
            model = served[0]
        entry = self.models.get(model)
        assert isinstance(entry.pool.policy, KvRouter), "the router service runs in kv mode"
        return entry, entry.pool.policy

    async def _route(self, req: RouteRequest) -> AsyncGenerator[RouteDecision, None]:
        entry, router = self._entry(req.model)
        overrides = RouterOverrides(
            overlap_score_credit=req.overlap_score_credit,
            prefill_load_scale=req.prefill_load_scale,
            temperature=req.temperature,
        )
        request = GenerateRequest(request_id=req.request_id, token_ids=req.token_ids,
                                  sampling=SamplingParams(max_tokens=req.max_tokens))
        sessions, now = entry.pool.sessions, time.monotonic()
        candidates = sessions.candidates(req.session_id, entry.pool.eligible(), now)
        worker_id = router.choose(request, candidates, entry.pool.in_flight,
                                  RouteHints(overrides=overrides, session_id=req.session_id))
        sessions.bind(req.session_id, worker_id, now)
        decision = router.last_decision
        assert decision is not None
        yield RouteDecision(
            worker_id=worker_id,
            address=entry.pool.instances[worker_id].address,
            overlap_blocks=decision.overlap_blocks,
            predicted_hit_rate=decision.predicted_hit_rate,
            costs={c.worker_id: c.cost for c in decision.candidates},
        )

    async def _mark_prefill(self, ref: RequestRef) -> AsyncGenerator[Ack, None]:
        self._entry(ref.model)[1].on_first_output(ref.request_id, ref.cached_tokens)
        yield Ack()

    async def _mark_free(self, ref: RequestRef) -> AsyncGenerator[Ack, None]:
        self._entry(ref.model)[1].on_finish(ref.request_id)
        yield Ack()

    async def _overlap_scores(self, query: TokensQuery) -> AsyncGenerator[OverlapScores, None]:
        _, router = self._entry(query.model)
        assert router.block_size is not None
        seq = compute_sequence_hashes(compute_local_hashes(query.token_ids, router.block_size))
        yield OverlapScores(block_size=router.block_size, scores=router.index.find_matches(seq).scores)


async def run_router(
    config: RouterServiceConfig, runtime_config: RuntimeConfig, stop: asyncio.Event
) -> None:
    """``baton router``: follows the workers' feeds and serves decisions over TCP until
    ``stop`` is set."""
    async with open_runtime(runtime_config, name="baton-router") as runtime:
        models = ModelRegistry(runtime, config.router)
        await models.start()
        try:
            service = RouterService(models)
            server = await runtime.serve_tcp(service.endpoints, config.host, config.port,
                                             advertise_host=config.advertise_host)
            print(f"baton router listening on {server.address} for "
                  f"{describe_discovery(runtime_config)}", file=sys.stderr, flush=True)
            await stop.wait()
        finally:
            await models.close()
