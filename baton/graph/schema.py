"""The graph schema: a YAML description of a Baton deployment, and its plan.

``GraphConfig`` is the schema (frozen dataclasses, validated when built; an unknown key is
an error naming it). ``plan`` turns a graph into ``ProcessSpec``s (command lines and the
line each process prints when ready) and does no I/O. Every process is
``python -m baton ...``, so a graph runs exactly what a person would run by hand.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import sys
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from baton.checks import is_int, require
from baton.config import DEFAULT_SERVING_ROUTER, ROUTER_MODES

ROLES = ("agg", "prefill", "decode")
Group = Literal["nats", "worker", "router", "frontend"]
STOP_ORDER: tuple[Group, ...] = ("frontend", "router", "worker", "nats")
ENGINE_KEYS: dict[str, type] = {
    "speedup_ratio": float, "block_size": int, "num_blocks": int, "max_num_seqs": int,
    "max_num_batched_tokens": int, "preemption_mode": str, "timing_profile": str,
    "prefix_caching": bool, "chunked_prefill": bool, "engine": str, "kv_transfer": str,
    "kv_cache_bytes": int, "num_threads": int, "kv_transfer_timeout_s": float,
    "kv_transfer_gbps": float,
}
"""Engine settings a graph may give, each becoming the ``baton worker`` flag of that name."""
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class GraphStartError(RuntimeError):
    """A process of the graph exited or stayed silent before printing its ready line."""


# ---------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class NatsSpec:
    """Either the URL of an existing server, or ``start``: run our own nats-server."""

    url: str | None = None
    start: bool = True

    def __post_init__(self) -> None:
        require((self.url is None) == self.start, "url", "give a URL or {start: true}, not both")
        require(self.url is None or str(self.url).startswith("nats://"), "url", "must be nats://...")


@dataclass(frozen=True)
class FrontendSpec:
    host: str = "127.0.0.1"
    port: int = 8000
    """0 = any free port (a restarted frontend then gets a new one)."""
    router: str = DEFAULT_SERVING_ROUTER
    args: tuple[str, ...] = ()
    """Extra ``baton frontend`` flags."""

    def __post_init__(self) -> None:
        require(is_int(self.port) and 0 <= self.port <= 65535, "port", "must be 0..65535")
        require(self.router in ROUTER_MODES, "router", f"one of {', '.join(ROUTER_MODES)}")


@dataclass(frozen=True)
class RouterSpec:
    """A standalone ``baton router`` (the KV router serving decisions over TCP)."""

    host: str = "127.0.0.1"
    port: int = 0
    args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        require(is_int(self.port) and 0 <= self.port <= 65535, "port", "must be 0..65535")


@dataclass(frozen=True)
class WorkerPoolSpec:
    name: str
    count: int = 1
    role: str = "agg"
    """``agg`` workers prefill and decode; ``prefill`` and ``decode`` pools of one model
    serve it disaggregated."""
    engine: tuple[tuple[str, Any], ...] = ()
    """Overrides of the graph's engine settings for this pool."""
    args: tuple[str, ...] = ()
    """Extra ``baton worker`` flags."""

    def __post_init__(self) -> None:
        require(bool(_NAME.match(str(self.name))), "name", "letters, digits, '_' and '-' only")
        require(is_int(self.count) and self.count >= 1, "count", "must be an integer >= 1")
        require(self.role in ROLES, "role", f"one of {', '.join(ROLES)}")


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
            require(getattr(self, name) > 0, name, "must be > 0")
        require(0 <= self.backoff_initial_s <= self.backoff_max_s, "backoff_initial_s",
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
        require(bool(_NAME.match(str(self.namespace))), "namespace", "letters, digits, '_', '-'")
        require(self.lease_ttl_s > 0, "lease_ttl_s", "must be > 0")
        require(len(self.workers) >= 1, "workers", "at least one pool")
        names = [pool.name for pool in self.workers]
        require(len(set(names)) == len(names), "workers", "pool names must be unique")


# ---------------------------------------------------------------------------- parsing


@contextlib.contextmanager
def _at(where: str) -> Iterator[None]:
    """Prefixes the field named by a ValueError with where it sits (``workers[0].count``)."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(f"{where}.{exc}") from None


def _mapping(raw: Any, where: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    require(isinstance(raw, Mapping), where, "must be a mapping")
    for key in raw:
        require(key in allowed, str(key) if where == "graph" else f"{where}.{key}",
                f"unknown key (expected one of {', '.join(allowed)})")
    return raw


def _strings(raw: Any, where: str) -> tuple[str, ...]:
    require(isinstance(raw, list), where, "must be a list of strings")
    return tuple(str(item) for item in raw)


def _engine(raw: Any, where: str) -> tuple[tuple[str, Any], ...]:
    items = _mapping(raw, where, tuple(ENGINE_KEYS))
    for key, value in items.items():
        kind = ENGINE_KEYS[key]
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        require(ok, f"{where}.{key}", f"must be a {kind.__name__}")
    return tuple(sorted(items.items()))


def _section(cls: type, raw: Any, where: str, lists: tuple[str, ...] = ("args",)) -> Any:
    keys = tuple(cls.__dataclass_fields__)
    values = dict(_mapping(raw, where, keys))
    for f in fields(cls):
        if f.default is MISSING and f.default_factory is MISSING:
            require(f.name in values, f"{where}.{f.name}", "required")
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
    require(isinstance(raw, list), where, "must be a list")
    return tuple(_section(cls, item, f"{where}[{i}]") for i, item in enumerate(raw))


def parse_graph(raw: Any) -> GraphConfig:
    """Builds a ``GraphConfig`` from parsed YAML; a ValueError names the offending field."""
    top = dict(_mapping(raw, "graph", tuple(GraphConfig.__dataclass_fields__)))
    require("workers" in top, "workers", "required (a list of worker pools)")
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
        argv = (*baton, "worker", "--port", "0", "--model", config.model, "--role", pool.role,
                *engine, *common, *pool.args)
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nats_spec(binary: str, port: int, store_dir: Path) -> ProcessSpec:
    argv = (binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store_dir), "-m", "0")
    return ProcessSpec("nats", "nats", argv, r"Server is ready")
