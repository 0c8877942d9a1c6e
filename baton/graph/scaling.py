"""Resizing a running graph's worker pools: the server side of the planner's *local* connector.

A graph that includes a planner serves two endpoints on the request plane and registers them
in discovery under the component ``graph``: ``pools`` answers how many workers each pool has
(ready, starting, draining) and ``scale`` sets pools' target sizes, by role (``agg``,
``prefill``, ``decode``; one pool per role). Growing starts more processes of the pool's
command line (they count as starting until they print their ready line). Shrinking first
stops workers still starting, then drains the newest ready ones: SIGTERM makes a worker
leave discovery, refuse new requests and finish its streams (``--drain-timeout-s``) before it
exits; SIGKILL comes only after ``supervision.drain_grace_s``. A stream is never cut by a
scale-down that keeps within that time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import msgspec

from baton.control.connectors import GraphPools, PoolCounts, ScaleRequest
from baton.errors import InvalidRequestError
from baton.graph.schema import GraphConfig, GraphStartError, ProcessSpec
from baton.runtime.endpoint import EndpointServer

if TYPE_CHECKING:
    from baton.graph.supervisor import ManagedProcess, Supervisor

log = logging.getLogger(__name__)

__all__ = ["PoolScaler"]


class PoolScaler:
    """Starts and drains the worker processes of one graph's pools (see the module
    docstring). ``templates``: the command line of each pool's first worker."""

    def __init__(self, config: GraphConfig, supervisor: Supervisor,
                 templates: dict[str, ProcessSpec],
                 report: Callable[[str], None] = log.info) -> None:
        roles = [pool.role for pool in config.workers]
        if len(set(roles)) != len(roles):
            raise ValueError("planner: a graph it scales has one worker pool per role, got "
                             f"roles {roles}")
        self.pool_of_role: dict[str, str] = {pool.role: pool.name for pool in config.workers}
        self._supervisor = supervisor
        self._templates = templates
        self._report = report
        self._next_index = {pool.name: pool.count for pool in config.workers}
        self._draining: set[ManagedProcess] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.endpoints = EndpointServer()
        self.endpoints.add("pools", self._pools, ScaleRequest, GraphPools)
        self.endpoints.add("scale", self._scale, ScaleRequest, GraphPools)

    def counts(self) -> dict[str, PoolCounts]:
        """Each role's workers now."""
        counts: dict[str, PoolCounts] = {}
        for role, name in self.pool_of_role.items():
            members = self._members(name)
            ready = sum(p.is_ready for p in members)
            counts[role] = PoolCounts(ready=ready, starting=len(members) - ready,
                                      draining=sum(p.spec.pool == name for p in self._draining))
        return counts

    def scale(self, targets: dict[str, int]) -> dict[str, PoolCounts]:
        """Starts or drains workers so each named role has its target; the counts after."""
        unknown = set(targets) - set(self.pool_of_role)
        if unknown:
            raise InvalidRequestError(f"no worker pool with role {sorted(unknown)}; this graph "
                                      f"has {sorted(self.pool_of_role)}", param="targets")
        if any(n < 0 for n in targets.values()):
            raise InvalidRequestError("targets must be >= 0", param="targets")
        for role, target in targets.items():
            name = self.pool_of_role[role]
            members = self._members(name)
            for _ in range(target - len(members)):
                self._start(name)
            for _ in range(len(members) - target):
                self._drain(self._members(name))
        return self.counts()

    async def close(self) -> None:
        """Waits for the starts and drains under way (the supervisor stops what is left)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _members(self, pool: str) -> list[ManagedProcess]:
        """The pool's workers that serve or will: not draining, not given up."""
        return [p for p in self._supervisor.processes
                if p.spec.group == "worker" and p.spec.pool == pool and p not in self._draining]

    def _start(self, pool: str) -> None:
        index = self._next_index[pool]
        self._next_index[pool] += 1
        spec = msgspec.structs.replace(self._templates[pool], name=f"worker-{pool}-{index}")
        proc = self._supervisor.add(spec)
        self._report(f"planner: starting {spec.name}")
        self._own(self._started(proc))

    async def _started(self, proc: ManagedProcess) -> None:
        try:
            await proc.start()
        except GraphStartError as exc:
            if proc in self._supervisor.processes:  # not stopped on purpose meanwhile
                self._report(f"planner: {proc.spec.name} did not start: {exc}")
                await self._supervisor.remove(proc)

    def _drain(self, members: list[ManagedProcess]) -> None:
        """One worker fewer: one still starting if any (it serves nothing yet), else the
        newest ready one, drained."""
        starting = [p for p in members if not p.is_ready]
        proc = (starting or members)[-1]
        self._draining.add(proc)
        self._report(f"planner: {'stopping' if starting else 'draining'} {proc.spec.name}")
        self._own(self._drained(proc))

    async def _drained(self, proc: ManagedProcess) -> None:
        try:
            await self._supervisor.remove(proc, grace_s=self._supervisor.supervision.drain_grace_s)
        finally:
            self._draining.discard(proc)
        self._report(f"planner: {proc.spec.name} stopped")

    def _own(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- endpoints ------------------------------------------------------------------------

    async def _pools(self, _: ScaleRequest) -> AsyncGenerator[GraphPools, None]:
        yield GraphPools(pools=self.counts())

    async def _scale(self, request: ScaleRequest) -> AsyncGenerator[GraphPools, None]:
        yield GraphPools(pools=self.scale(request.targets))
