"""The graph schema: a YAML description of a Baton deployment, and its plan.

``GraphConfig`` is the schema: msgspec structs that parsed YAML is converted into
(``msgspec.convert``: an unknown key, a missing one or a bad value is a ``ValueError`` that
names the field, ``workers[0].count: ...``). The ``engine`` section is derived from
``EngineConfig``: its keys are the ``baton worker`` engine flags (``block_size``,
``prefix_caching``, ...) with the same types, so a setting added to the engine is a graph key
at once. Defaults come from the config tree. ``plan`` turns a graph into ``ProcessSpec``s
(command lines and the line each process prints when ready) and does no I/O. Every process
is ``python -m baton ...``, so a graph runs exactly what a person would run by hand.
"""

from __future__ import annotations

import re
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from baton.config import (
    NATS_SCHEMES,
    EngineConfig,
    FrontendConfig,
    RouterConfig,
    RouterMode,
    RouterServiceConfig,
    RuntimeConfig,
    WorkerConfig,
    WorkerRole,
)
from baton.settings import Field, SectionField, optional_inner, walk

Group = Literal["nats", "worker", "router", "frontend", "planner"]
STOP_ORDER: tuple[Group, ...] = ("planner", "frontend", "router", "worker", "nats")
_NAME = r"^[A-Za-z0-9_-]+$"
Name = Annotated[str, msgspec.Meta(pattern=_NAME)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class GraphStartError(RuntimeError):
    """A process of the graph exited or stayed silent before printing its ready line."""


# ---------------------------------------------------------------------------- schema


def _engine_keys(cls: type, prefix: str = "") -> Iterator[tuple[str, Field]]:
    for item in walk(cls):
        if isinstance(item, SectionField):
            yield from _engine_keys(item.type, prefix + item.section.prefix)
        elif item.setting.cli:
            yield (prefix + item.flag).replace("-", "_"), item


ENGINE_KEYS: dict[str, Field] = dict(_engine_keys(EngineConfig))
"""The keys of a graph's ``engine`` section: each is the ``baton worker`` flag of that name
(``--block-size``; a bool ``prefix_caching: false`` is ``--no-prefix-caching``)."""

EngineSection = msgspec.defstruct(
    "EngineSection",
    [(key, optional_inner(f.type) | None, None) for key, f in ENGINE_KEYS.items()],
    forbid_unknown_fields=True, frozen=True, omit_defaults=True,
)
"""Engine settings a graph gives; None keeps the worker's default."""


class NatsSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Either the URL of an existing server, or ``start``: run our own nats-server."""

    url: str | None = None
    start: bool = True

    def __post_init__(self) -> None:
        if (self.url is None) != self.start:
            raise ValueError("url: give a URL or {start: true}, not both")
        if self.url is not None and not self.url.startswith(NATS_SCHEMES):
            raise ValueError("url: must be nats://HOST:PORT")


class ResourcesSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """What one process of this kind asks of its node on Kubernetes (``baton deploy``);
    a local graph ignores it. Quantities in Kubernetes' notation (``"4"``, ``"500m"``,
    ``"16Gi"``); each one given is both the request and the limit."""

    cpu: str | None = None
    memory: str | None = None
    gpus: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Accelerators, as ``kubernetes.gpu_resource`` (``nvidia.com/gpu``)."""


class FrontendSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    host: str = FrontendConfig.host
    port: Port = FrontendConfig.port
    """0 = any free port (a restarted frontend then gets a new one)."""
    router: RouterMode = RouterConfig.mode
    args: tuple[str, ...] = ()
    """Extra ``baton frontend`` flags."""
    resources: ResourcesSpec = msgspec.field(default_factory=ResourcesSpec)


class RouterSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A standalone ``baton router`` (the KV router serving decisions over TCP)."""

    host: str = RouterServiceConfig.host
    port: Port = RouterServiceConfig.port
    args: tuple[str, ...] = ()


class WorkerPoolSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    name: Name
    count: Annotated[int, msgspec.Meta(ge=1)] = 1
    role: WorkerRole = "agg"
    """``agg`` workers prefill and decode; ``prefill`` and ``decode`` pools of one model
    serve it disaggregated."""
    engine: EngineSection = msgspec.field(default_factory=EngineSection)  # type: ignore[valid-type]  # built by defstruct
    """Overrides of the graph's engine settings for this pool."""
    args: tuple[str, ...] = ()
    """Extra ``baton worker`` flags."""
    resources: ResourcesSpec = msgspec.field(default_factory=ResourcesSpec)


class PlannerSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A ``baton planner`` that scales this graph's worker pools (the graph serves it their
    sizes; ``graph/scaling.py``)."""

    profile: str
    """A worker profile (JSON; ``baton profile`` writes one)."""
    args: tuple[str, ...] = ()
    """Extra ``baton planner`` flags (``--planner load``, ``--sla-ttft-ms 2000``, bounds)."""


class SupervisionSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    ready_timeout_s: Seconds = 30.0
    """A process that prints no ready line in this long fails the start."""
    grace_s: Seconds = 10.0
    """Between SIGTERM and SIGKILL when stopping."""
    drain_grace_s: Seconds = 45.0
    """Between SIGTERM and SIGKILL when the planner drains a worker (keep it above the
    workers' ``--drain-timeout-s``, 30 s by default, so their streams finish)."""
    backoff_initial_s: Annotated[float, msgspec.Meta(ge=0)] = 0.5
    backoff_max_s: Seconds = 10.0
    """Restart delays double from the initial one up to this; a run this long resets them."""

    def __post_init__(self) -> None:
        if self.backoff_initial_s > self.backoff_max_s:
            raise ValueError("backoff_initial_s: must be at most backoff_max_s")


class TopologySpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Where a graph's pods go on Kubernetes: all in one domain of ``key`` (a zone, a rack),
    so that prefill, decode and router talk over the shortest links, and each pool spread
    over ``spread_key`` (nodes) inside it."""

    key: str = "topology.kubernetes.io/zone"
    """The node label that names the domain (a rack label, e.g. ``example.com/rack``)."""
    mode: Literal["required", "preferred", "off"] = "preferred"
    """``required``: a pod that cannot join its graph's domain stays pending."""
    spread_key: str = "kubernetes.io/hostname"


class KubernetesSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """How ``baton deploy render`` and the operator put this graph on a cluster
    (``docs/kubernetes.md``); a local graph ignores it."""

    image: str = "baton:0.1.0"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    nats_image: str = "nats:2.10-alpine"
    gpu_resource: str = "nvidia.com/gpu"
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    """The frontends' Services."""
    cluster_token_secret: str | None = None
    """A Secret whose key ``token`` is the cluster token (``BATON_CLUSTER_TOKEN``); default
    ``NAME-cluster-token``. Created by you, never rendered (a secret is not a manifest)."""
    node_selector: dict[str, str] = msgspec.field(default_factory=dict)
    env: dict[str, str] = msgspec.field(default_factory=dict)
    """Environment variables of every Baton pod (``BATON_TRACE_EXPORTER``, ``OTEL_*``)."""
    discovery: Literal["nats", "kubernetes"] = "nats"
    """How frontends, routers and the planner find workers: their records in NATS, or the
    ready endpoints of a headless Service per pool (``--discovery kubernetes``; NATS still
    carries events when the graph has it)."""
    topology: TopologySpec = msgspec.field(default_factory=TopologySpec)
    startup_timeout_s: Seconds = 600.0
    """How long a worker may take to load its model before Kubernetes restarts it."""


class GraphConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    workers: Annotated[tuple[WorkerPoolSpec, ...], msgspec.Meta(min_length=1)]
    namespace: Annotated[str, msgspec.Meta(pattern=_NAME)] = RuntimeConfig.namespace
    nats: NatsSpec | str = msgspec.field(default_factory=NatsSpec)
    """``nats://HOST:PORT`` is short for ``{url: nats://HOST:PORT, start: false}``."""
    model: str = WorkerConfig.model
    lease_ttl_s: Annotated[float, msgspec.Meta(ge=1)] = RuntimeConfig.lease_ttl_s
    engine: EngineSection = msgspec.field(default_factory=EngineSection)  # type: ignore[valid-type]  # built by defstruct
    frontends: tuple[FrontendSpec, ...] = ()
    routers: tuple[RouterSpec, ...] = ()
    planner: PlannerSpec | None = None
    supervision: SupervisionSpec = msgspec.field(default_factory=SupervisionSpec)
    kubernetes: KubernetesSpec = msgspec.field(default_factory=KubernetesSpec)

    def __post_init__(self) -> None:
        names = [pool.name for pool in self.workers]
        if len(set(names)) != len(names):
            raise ValueError("workers: pool names must be unique")
        if isinstance(self.nats, str) and not self.nats.startswith(NATS_SCHEMES):
            raise ValueError("nats.url: must be nats://HOST:PORT")

    @property
    def nats_spec(self) -> NatsSpec:
        return NatsSpec(url=self.nats, start=False) if isinstance(self.nats, str) else self.nats


# ---------------------------------------------------------------------------- parsing


def parse_graph(raw: Any) -> GraphConfig:
    """Builds a ``GraphConfig`` from parsed YAML; a ValueError names the offending field."""
    try:
        return msgspec.convert(raw, GraphConfig)
    except msgspec.ValidationError as exc:
        raise _field_error(str(exc)) from None


def load_graph(path: str | Path) -> GraphConfig:
    return parse_graph(read_graph(path))


def read_graph(path: str | Path) -> Any:
    """A graph file's YAML as parsed, not yet checked (``parse_graph`` checks it)."""
    import yaml

    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None


_AT = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_OWN = re.compile(r"^(?P<field>[A-Za-z_][\w.]*): (?P<message>.*)$", re.S)


def _field_error(text: str) -> ValueError:
    """msgspec's ``Expected ... - at `$.workers[0].count``` as ``workers[0].count: ...``."""
    match = _AT.match(text)
    assert match is not None  # the pattern matches any text
    message, path = match["message"], (match["path"] or "").lstrip(".")
    if key := re.match(r"Object contains unknown field `([^`]+)`", message):
        path = _join(path, key[1])
        message = f"unknown key (expected one of {', '.join(_keys_at(path))})"
    elif key := re.match(r"Object missing required field `([^`]+)`", message):
        path, message = _join(path, key[1]), "required"
    elif own := _OWN.match(message):  # a __post_init__ check names its own field
        path, message = _join(path, own["field"]), own["message"]
    else:
        message = message[:1].lower() + message[1:]
    return ValueError(f"{path or 'graph'}: {message}")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _keys_at(path: str) -> list[str]:
    """The keys of the section that holds the last key of ``path``."""
    struct = _struct_type(msgspec.inspect.type_info(GraphConfig))
    assert struct is not None
    for name in re.findall(r"[A-Za-z_]\w*", path)[:-1]:
        field = next(f for f in struct.fields if f.encode_name == name)
        inner = _struct_type(field.type)
        assert inner is not None  # a path msgspec reported runs through sections
        struct = inner
    return [f.encode_name for f in struct.fields]


def _struct_type(info: msgspec.inspect.Type) -> msgspec.inspect.StructType | None:
    """The section type ``info`` holds: itself, or through a tuple, a union or metadata."""
    if isinstance(info, msgspec.inspect.StructType):
        return info
    if isinstance(info, msgspec.inspect.Metadata):
        return _struct_type(info.type)
    if isinstance(info, msgspec.inspect.VarTupleType):
        return _struct_type(info.item_type)
    if isinstance(info, msgspec.inspect.UnionType):
        return next((s for t in info.types if (s := _struct_type(t)) is not None), None)
    return None


# ---------------------------------------------------------------------------- plan


class ProcessSpec(msgspec.Struct, frozen=True):
    name: str
    """Unique in the graph; also the log file's name."""
    group: Group
    argv: tuple[str, ...]
    ready: str
    """A regex matched against each stderr line; its named groups are kept."""
    pool: str | None = None


def engine_args(*sections: Any) -> list[str]:
    """``baton worker`` flags for the engine sections given (later ones win)."""
    merged: dict[str, Any] = {}
    for section in sections:
        merged |= {k: v for k, v in msgspec.structs.asdict(section).items() if v is not None}
    args: list[str] = []
    for key, value in merged.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            args.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            args += [f"--{flag}", str(value)]
    return args


Argv = tuple[str, ...]


def common_args(config: GraphConfig, nats_url: str) -> Argv:
    """The flags every Baton process of the graph shares."""
    return ("--nats", nats_url, "--namespace", config.namespace,
            "--lease-ttl-s", str(config.lease_ttl_s))


def worker_command(config: GraphConfig, pool: WorkerPoolSpec, listen: Argv, common: Argv) -> Argv:
    """``baton worker`` arguments for a pool's process; ``listen`` says where it serves (the
    pool's own ``args`` come last, so they win)."""
    return ("worker", *listen, "--model", config.model, "--role", pool.role,
            *engine_args(config.engine, pool.engine), *common, *pool.args)


def router_command(router: RouterSpec, listen: Argv, common: Argv) -> Argv:
    return ("router", *listen, *common, *router.args)


def frontend_command(frontend: FrontendSpec, listen: Argv, common: Argv) -> Argv:
    return ("frontend", *listen, "--router", frontend.router, *common, *frontend.args)


def planner_command(planner: PlannerSpec, profile: str, listen: Argv, common: Argv) -> Argv:
    return ("planner", "--profile", profile, *listen, *common, *planner.args)


def plan(config: GraphConfig, nats_url: str) -> list[ProcessSpec]:
    """The graph's Baton processes (workers, routers, frontends), in start order."""
    baton = (sys.executable, "-m", "baton")
    common = common_args(config, nats_url)
    specs: list[ProcessSpec] = []
    for pool in config.workers:
        argv = (*baton, *worker_command(config, pool, ("--port", "0"), common))
        specs += [ProcessSpec(f"worker-{pool.name}-{i}", "worker", argv,
                              r"baton worker (?P<id>\S+) listening on (?P<address>\S+)", pool.name)
                  for i in range(pool.count)]
    for i, r in enumerate(config.routers):
        listen = ("--host", r.host, "--port", str(r.port))
        specs.append(ProcessSpec(f"router-{i}", "router", (*baton, *router_command(r, listen, common)),
                                 r"baton router listening on (?P<address>\S+)"))
    for i, f in enumerate(config.frontends):
        listen = ("--host", f.host, "--port", str(f.port))
        argv = (*baton, *frontend_command(f, listen, common))
        specs.append(ProcessSpec(f"frontend-{i}", "frontend", argv,
                                 r"baton frontend on (?P<address>https?://\S+)"))
    if config.planner is not None:
        argv = (*baton, *planner_command(config.planner, config.planner.profile, (), common))
        specs.append(ProcessSpec("planner", "planner", argv,
                                 r"baton planner (?P<mode>\S+) on .* metrics on (?P<metrics>\S+)"))
    return specs


def find_nats_server() -> str | None:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("nats-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def nats_spec(binary: str, port: int, store_dir: Path) -> ProcessSpec:
    argv = (binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store_dir), "-m", "0")
    return ProcessSpec("nats", "nats", argv, r"Server is ready")
