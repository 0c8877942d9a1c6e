"""Baton's configuration tree: frozen dataclasses, validated when built.

Every setting is declared once, here, with ``setting()`` (its default and help) or nested
with ``section()``; the CLI's flags, the graph schema's engine keys and the simulator's
configuration are derived from these declarations, and the kinds of things (router modes,
engine kinds, roles, transfer modes) are spelled once, as the ``Literal`` types below.
Components take their own section, never the whole tree. Environment variables are read
only by the CLI (a setting names the one it may be defaulted from).

Size: the whole tree is one declaration of every setting of every component; split, the
sections would lose the one place where a reader sees them all.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from baton.checks import require, valid_model_name
from baton.settings import check_choices, section, setting

RouterMode = Literal["kv", "latency", "round-robin", "random", "least-loaded"]
EngineKind = Literal["mock", "hf", "vllm"]
WorkerRole = Literal["agg", "prefill", "decode"]
KvTransferMode = Literal["inproc", "tcp", "shm"]
DisaggPolicy = Literal["always", "isl", "load", "isl_or_load"]
PreemptionMode = Literal["lifo", "fifo"]
FaultMode = Literal["raise", "hang"]
DiskAdmission = Literal["reused", "all"]
PlannerMode = Literal["off", "throughput", "load", "both"]
PredictorKind = Literal["constant", "moving-average", "kalman", "seasonal"]
ConnectorKind = Literal["local", "kubernetes"]
DiscoveryKind = Literal["auto", "kubernetes"]
HardwareKind = Literal["h100", "h200", "b200", "gb200"]
TraceExporter = Literal["off", "console", "otlp"]
NATS_SCHEMES = ("nats://", "tls://", "ws://", "wss://")
"""The URL schemes a NATS client connects with."""


def _positive_ints(config: object, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name,
                f"must be a positive integer, got {value!r}")


# ------------------------------------------------------------------------------ engine


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Scheduler and KV cache sizing. Defaults are Dynamo's mocker defaults, except the block
    size: 16 tokens, vLLM's default (the mocker uses 64)."""

    num_blocks: int = setting(16384, "KV blocks per worker")
    block_size: int = setting(16, "tokens per KV block")
    max_num_seqs: int = setting(256, "requests in one step at most")
    max_num_batched_tokens: int = setting(8192, "tokens computed in one step at most")
    enable_prefix_caching: bool = setting(True, "reuse cached prompt blocks",
                                          flag="prefix-caching")
    enable_chunked_prefill: bool = setting(True, "split long prompts over several steps",
                                           flag="chunked-prefill")
    preemption_mode: PreemptionMode = setting(
        "lifo", "which running request gives its blocks back when they run out: the newest "
        "(lifo) or the oldest (fifo)")
    host_kv_blocks: int = setting(
        0, "KV blocks kept in host memory below the device pool: evicted blocks go there "
        "and a prefix found there is copied back instead of recomputed; 0 = no host tier")
    disk_kv_blocks: int = setting(
        0, "KV blocks kept on disk below the host tier (blocks pushed out of host memory); "
        "0 = no disk tier")
    host_kv_write_through: bool = setting(
        False, "copy each newly cached KV block to host memory at once (write-through) "
        "rather than when the device pool evicts it (write-back): evictions then cost no copy")
    disk_kv_admission: DiskAdmission = setting(
        "reused", "which blocks pushed out of host memory go to disk: those used at least "
        "twice (reused), or all")
    shared_kv_blocks: int = setting(
        0, "KV blocks this worker may keep in a store shared with other workers: each block "
        "entering its host tier is written there unless some worker wrote it, and any "
        "worker onboards a prefix found there; 0 = no shared tier")

    def __post_init__(self) -> None:
        _positive_ints(self, "num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens")
        check_choices(self)
        require(self.host_kv_blocks >= 0, "host_kv_blocks", "must be >= 0")
        require(self.disk_kv_blocks >= 0, "disk_kv_blocks", "must be >= 0")
        require(not self.disk_kv_blocks or self.host_kv_blocks > 0, "disk_kv_blocks",
                "needs a host tier above it (--host-kv-blocks)")
        require(self.shared_kv_blocks >= 0, "shared_kv_blocks", "must be >= 0")
        require(not self.shared_kv_blocks or self.host_kv_blocks > 0, "shared_kv_blocks",
                "needs a host tier above it (--host-kv-blocks)")

    @property
    def kv_tokens(self) -> int:
        """Tokens the KV block pool holds."""
        return self.num_blocks * self.block_size

    @property
    def kv_tiers(self) -> bool:
        """Whether KV tiers sit below the pool (a host tier, and cached blocks to keep)."""
        return self.host_kv_blocks > 0 and self.enable_prefix_caching


@dataclass(frozen=True)
class TimingConfig:
    """The simulated engine's clock: its timing model and its modelled KV transfers (the live
    mock engine and ``baton sim`` alike)."""

    speedup_ratio: float = setting(
        1.0, "divide simulated step time by this; 0 = no simulated delay")
    profile: str | None = setting(
        None, "JSON profile replacing the polynomial timing model (docs/timing-model.md)",
        flag="timing-profile", metavar="JSON", default_help="the polynomial")
    roofline_model: str | None = setting(
        None, "an HF config.json: step times from the roofline model of this model on "
        "--hardware, --tp and --ep (docs/timing-model.md)", metavar="JSON",
        default_help="the polynomial")
    hardware: HardwareKind = setting("h100", "roofline: the GPU (public specs)")
    tp: int = setting(1, "roofline: tensor parallel GPUs per worker")
    ep: int = setting(1, "roofline: expert parallel GPUs per worker")
    kv_transfer_gbps: float = setting(64.0, "modelled KV transfer bandwidth, GB/s")
    host_kv_gbps: float = setting(
        25.0, "modelled bandwidth of KV copies between device and host memory (the host "
        "tier), GB/s")
    disk_kv_gbps: float = setting(3.0, "modelled bandwidth of KV reads from disk, GB/s")
    disk_kv_latency_ms: float = setting(
        0.1, "modelled latency of one onboarding that reads from disk, ms")
    shared_kv_gbps: float = setting(
        3.0, "modelled bandwidth of KV reads from the shared store, GB/s (a node's disk; "
        "the same as --disk-kv-gbps)")
    shared_kv_latency_ms: float = setting(
        0.1, "modelled latency of one onboarding that reads from the shared store, ms")
    recompute_slow_tiers: bool = setting(
        True, "recompute a prefix found in the KV tiers when the modelled read would take "
        "longer than prefilling it again")
    kv_bytes_per_token: int | None = setting(
        None, "modelled KV cache bytes per token over all layers",
        default_help="the model's; in baton sim 131072, Llama-3-8B in fp16")

    def __post_init__(self) -> None:
        require(self.speedup_ratio >= 0, "speedup_ratio", "must be >= 0 (0 = no delay)")
        for name in ("kv_transfer_gbps", "host_kv_gbps", "disk_kv_gbps", "shared_kv_gbps"):
            value = getattr(self, name)
            require(math.isfinite(value) and value > 0, name, "must be > 0")
        require(self.disk_kv_latency_ms >= 0, "disk_kv_latency_ms", "must be >= 0")
        require(self.shared_kv_latency_ms >= 0, "shared_kv_latency_ms", "must be >= 0")
        require(self.profile is None or self.roofline_model is None, "roofline_model",
                "a timing profile or a roofline model, not both")
        require(self.tp >= 1 and self.ep >= 1, "tp", "--tp and --ep must be >= 1")
        check_choices(self)
        require(self.kv_bytes_per_token is None or self.kv_bytes_per_token >= 0,
                "kv_bytes_per_token", "must be >= 0")

    def check_ep(self, attention_dp: int) -> None:
        """The experts are split over a worker's ``tp x attention_dp`` GPUs: ``ep`` must
        divide them (a live engine has one attention-DP rank)."""
        require((self.tp * attention_dp) % self.ep == 0, "ep",
                f"--ep {self.ep} must divide the worker's GPUs, --tp {self.tp} x "
                f"{attention_dp} attention-DP rank(s) (ranks: baton sim's --attention-dp)")


@dataclass(frozen=True)
class VllmConfig:
    """The vLLM engine's own settings (``--engine vllm``); the block size, KV cache bytes,
    prefix caching and batch limits come from the shared engine settings."""

    dtype: str = setting("float32", "model dtype (vLLM's --dtype); CPU builds need float32 "
                         "for correct output with small models")
    max_model_len: int | None = setting(None, "context length (vLLM's --max-model-len)",
                                        default_help="the model's")
    enforce_eager: bool = setting(
        True, "run the model eagerly: no torch.compile or graph capture (compiling costs a "
        "minute at start on CPU)", flag="eager")
    engine_args: str | None = setting(
        None, "more vLLM engine arguments as a JSON object, e.g. '{\"seed\": 1}'",
        metavar="JSON", default_help="none")

    def __post_init__(self) -> None:
        require(self.max_model_len is None or self.max_model_len >= 1, "max_model_len",
                "must be >= 1")
        if self.engine_args is not None:
            require(isinstance(_json_object(self.engine_args), dict), "engine_args",
                    "must be a JSON object")


def _json_object(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class EngineConfig:
    """An engine: its scheduler and KV pool, the simulated engine's timing, the transformers
    engine's memory and threads, and how KV moves between prefill and decode workers."""

    kind: EngineKind = setting("mock", "mock = the simulated engine; hf = a transformers "
                               "model on CPU; vllm = vLLM's engine", flag="engine")
    scheduler: SchedulerConfig = section(SchedulerConfig)
    timing: TimingConfig = section(TimingConfig)
    vllm: VllmConfig = section(VllmConfig, prefix="vllm-")
    kv_cache_bytes: int = setting(1 << 30, "hf and vllm engines: KV cache size in bytes "
                                  "(caps --num-blocks)")
    num_threads: int | None = setting(None, "hf engine: torch threads",
                                      default_help="torch's default")
    disk_kv_dir: str | None = setting(
        None, "hf engine: directory of the disk KV tier's block files (one directory per "
        "worker; blocks whose files are intact survive a restart)", metavar="DIR",
        default_help="none")
    shared_kv_dir: str | None = setting(
        None, "directory of the shared KV tier's block files, the same for every worker "
        "sharing it (the simulated engine's hold no payload)", metavar="DIR",
        default_help="none")
    kv_transfer: KvTransferMode = setting(
        "tcp", "how decode workers fetch KV from prefill workers: tcp (bulk TCP), shm (TCP "
        "handshake, shared-memory copy on one host) or inproc (workers in one process)")
    kv_transfer_timeout_s: float = setting(
        10.0, "a slower KV fetch fails and the decode worker prefills locally")
    kv_hold_timeout_s: float = setting(
        30.0, "a prefill worker frees held KV blocks nobody fetched after this long")
    step_timeout_s: float = setting(
        120.0, "an engine step running longer than this is a fault: its requests move to "
        "other workers and the engine is restarted")
    # -- fault injection, for tests and chaos runs
    fault_on_token: int | None = setting(
        None, "testing: the engine faults on the first step computing a request whose prompt "
        "holds this token id", default_help="never")
    fault_after_steps: int | None = setting(
        None, "testing: the engine faults at its Nth step (so a restarted one faults again "
        "N steps later)", default_help="never")
    fault_kv_events_after: int | None = setting(
        None, "testing: the engine stops publishing KV events after this many steps (a "
        "broken event publisher; it keeps serving)", default_help="never")
    fault_mode: FaultMode = setting(
        "raise", "testing: how an injected fault happens: the step raises, or hangs until "
        "the step timeout")

    def __post_init__(self) -> None:
        check_choices(self)
        require(self.kind != "vllm" or not self.scheduler.host_kv_blocks, "host_kv_blocks",
                "KV tiers are not wired to the vLLM engine yet (--engine mock or hf)")
        require(self.kind != "hf" or not self.scheduler.disk_kv_blocks
                or self.disk_kv_dir is not None, "disk_kv_dir",
                "the hf engine's disk tier (--disk-kv-blocks) needs a directory for its files")
        require(not self.scheduler.shared_kv_blocks or self.shared_kv_dir is not None,
                "shared_kv_dir", "a shared KV tier (--shared-kv-blocks) needs the directory "
                "its workers share")
        require(self.kv_cache_bytes > 0, "kv_cache_bytes", "must be > 0")
        self.timing.check_ep(1)
        for name in ("kv_transfer_timeout_s", "kv_hold_timeout_s", "step_timeout_s"):
            require(getattr(self, name) > 0, name, "must be > 0")
        require(self.fault_after_steps is None or self.fault_after_steps >= 1,
                "fault_after_steps", "must be >= 1")
        require(self.fault_kv_events_after is None or self.fault_kv_events_after >= 0,
                "fault_kv_events_after", "must be >= 0")

    @property
    def block_size(self) -> int:
        return self.scheduler.block_size


# ----------------------------------------------------------------------------- runtime


@dataclass(frozen=True)
class KubeApiConfig:
    """Where the Kubernetes API is, for ``baton deploy operator``, ``baton planner
    --connector kubernetes`` and ``--discovery kubernetes`` (``docs/kubernetes.md``)."""

    kube_api: str | None = setting(
        None, "the Kubernetes API's URL without credentials (kubectl proxy serves one: "
        "http://127.0.0.1:8001)", metavar="URL",
        default_help="the API of the pod this runs in, with its service account")
    kube_namespace: str | None = setting(
        None, "the namespace of the BatonDeployment(s), or of the worker Services that "
        "--discovery kubernetes lists", metavar="NAMESPACE",
        default_help="the pod's own; the operator: every namespace")


@dataclass(frozen=True)
class RuntimeConfig:
    """How a process finds the others: in-process only, NATS, or a list of worker addresses."""

    namespace: str = setting("baton", "discovery and event subjects are scoped to this")
    nats: str | None = setting(
        None, "discovery and events on NATS", env="BATON_NATS", metavar="nats://HOST:PORT",
        default_help="$BATON_NATS, else this process only")
    lease_ttl_s: float = setting(
        10.0, "NATS discovery: a process that stops heartbeating expires after this")
    workers: tuple[str, ...] = setting(
        (), "a worker's request-plane address (repeatable)", flag="worker", repeat=True,
        metavar="tcp://HOST:PORT", default_help="none")
    probe_interval_s: float = setting(
        2.0, "how often --worker addresses (or Kubernetes' worker endpoints) are probed")
    discovery: DiscoveryKind = setting(
        "auto", "where workers are found: auto = on NATS with --nats, else the --worker "
        "addresses, else this process; kubernetes = the ready endpoints of the worker "
        "Services that --kube-workers selects (events still go over NATS with --nats)")
    kube_workers: str = setting(
        "app.kubernetes.io/part-of=baton,app.kubernetes.io/component=worker",
        "kubernetes discovery: the label selector of the worker Services", metavar="SELECTOR")
    kube: KubeApiConfig = section(KubeApiConfig)
    # -- NATS security (a user and password, or a token, go in the URL: nats://USER:PASS@HOST)
    nats_creds: str | None = setting(
        None, "NATS credentials file (.creds: a user JWT and its NKey seed)",
        env="BATON_NATS_CREDS", metavar="FILE")
    nats_nkey: str | None = setting(
        None, "file holding the NKey seed this process signs the NATS server's challenge with",
        env="BATON_NATS_NKEY", metavar="FILE")
    nats_tls_ca: str | None = setting(
        None, "CA certificates (PEM) to verify the NATS server against; turns TLS on",
        metavar="PEM", default_help="the system's CAs with tls://, else no TLS")
    nats_tls_cert: str | None = setting(
        None, "client certificate (PEM) for a NATS server that verifies its clients ...",
        metavar="PEM")
    nats_tls_key: str | None = setting(None, "... and its key (PEM)", metavar="PEM")
    cluster_token: str | None = setting(
        None, "a secret shared by every process of the deployment, proven on each request-plane "
        "and KV transfer connection; a listener beyond loopback needs one",
        env="BATON_CLUSTER_TOKEN", metavar="TOKEN", secret=True,
        default_help="$BATON_CLUSTER_TOKEN, else none")

    def __post_init__(self) -> None:
        require(self.nats is None or self.nats.startswith(NATS_SCHEMES), "nats",
                f"must be nats://HOST:PORT (or {', '.join(NATS_SCHEMES[1:])}), got {self.nats!r}")
        require(self.lease_ttl_s >= 1.0, "lease_ttl_s", "must be >= 1 (a NATS TTL)")
        require(self.probe_interval_s > 0, "probe_interval_s", "must be > 0")
        require((self.nats_tls_cert is None) == (self.nats_tls_key is None), "nats_tls_cert",
                "a client certificate needs its key (--nats-tls-key), and the key its certificate")
        require(self.nats_creds is None or self.nats_nkey is None, "nats_creds",
                "give a credentials file or an NKey seed, not both")
        check_choices(self)
        require(self.discovery != "kubernetes" or not self.workers, "discovery",
                "kubernetes finds the workers itself: drop --worker")


# ------------------------------------------------------------------------------ worker


@dataclass(frozen=True)
class WorkerConfig:
    """One worker process or in-process worker."""

    model: str = setting(
        "baton-tiny", "built-in model name, a local HF-style model folder, or with --engine hf "
        "baton-tiny-llama / smollm2 (built or converted once, then cached)")
    model_name: str | None = setting(None, "name served to clients",
                                     default_help="the model folder's name")
    cache_dir: str | None = setting(
        None, "where converted models are kept (in DIR/models)", env="BATON_CACHE_DIR",
        metavar="DIR", default_help="$BATON_CACHE_DIR, else ~/.cache/baton")
    engine: EngineConfig = section(EngineConfig)
    role: WorkerRole = setting(
        "agg", "prefill and decode workers form a disaggregated model's two pools")
    host: str = setting(
        "127.0.0.1", "address the worker's listeners bind (request plane, KV transfer, "
        "metrics); 0.0.0.0 = every interface")
    advertise_host: str | None = setting(
        None, "address other hosts reach this worker's listeners at (registered in discovery)",
        default_help="--host, or the address this host's name resolves to when --host is "
        "0.0.0.0")
    port: int = setting(0, "request-plane port; 0 = any free port")
    kv_port: int = setting(0, "KV transfer port (--kv-transfer tcp or shm); 0 = any free port")
    metrics_port: int | None = setting(
        0, "port of the worker's own GET /metrics (Prometheus); 0 = any free port (in "
        "`baton serve` the frontend's /metrics carries the workers' metrics instead)")
    worker_id: int | None = setting(None, "this worker's id in discovery",
                                    default_help="a random one")
    load_interval_s: float = setting(
        0.1, "load metrics are published on the event plane at most this often")
    heartbeat_interval_s: float = setting(
        1.0, "an idle worker's feed still sends its load this often (it is its heartbeat: "
        "keep it well under the routers' --health-timeout-s)")
    drain_timeout_s: float = setting(
        30.0, "on SIGTERM, how long in-flight requests may still run")
    max_waiting_requests: int = setting(
        1024, "refuse new requests while this many wait in the engine (frontends try "
        "another worker, then answer 529)")

    def __post_init__(self) -> None:
        check_choices(self)
        require(self.model_name is None or valid_model_name(self.model_name), "model_name",
                f"letters, digits, '_', '-', '.' and '/' between names, got {self.model_name!r}")
        require(0 <= self.port <= 65535, "port", "must be 0..65535")
        require(0 <= self.kv_port <= 65535, "kv_port", "must be 0..65535")
        require(self.metrics_port is None or 0 <= self.metrics_port <= 65535, "metrics_port",
                "must be 0..65535")
        require(self.load_interval_s > 0, "load_interval_s", "must be > 0")
        require(self.heartbeat_interval_s > 0, "heartbeat_interval_s", "must be > 0")
        require(self.max_waiting_requests >= 1, "max_waiting_requests", "must be >= 1")


# ------------------------------------------------------------------------------ router


@dataclass(frozen=True)
class KvRouterConfig:
    """Weights of the KV router's cost function and the picker's temperature (Dynamo's
    defaults)."""

    overlap_score_credit: float = setting(1.0, "prefill blocks forgiven per cached block")
    overlap_score_credit_decay: float = setting(
        0.0, "shrinks the credit of workers whose prefill backlog exceeds the least-loaded "
        "one's")
    prefill_load_scale: float = setting(
        1.0, "weight of the blocks left to prefill against blocks held by running requests "
        "(Dynamo's overlap score weight); higher keeps a prefix's requests on the workers "
        "caching it")
    decode_active_request_weight: float = setting(
        0.0, "cost added per active request on a worker")
    temperature: float = setting(
        0.0, "0 picks the cheapest worker; above 0 samples a softmax over normalised costs")
    track_prefill_tokens: bool = setting(
        True, "count other requests' queued prefill tokens as load")
    assume_kv_reuse: bool = setting(
        True, "count cached blocks once; off: every request block is new decode load (e.g. "
        "disaggregated decode)")

    def __post_init__(self) -> None:
        for name in ("overlap_score_credit", "overlap_score_credit_decay", "prefill_load_scale",
                     "decode_active_request_weight", "temperature"):
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0, name, "must be a finite number >= 0")

    def with_overrides(self, overrides: Any) -> KvRouterConfig:
        """This config with every field that ``overrides`` sets replaced."""
        if overrides is None:
            return self
        changes = {f.name: getattr(overrides, f.name) for f in fields(overrides)}
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True)
class RouterConfig:
    """How a frontend (or the standalone router) picks a worker."""

    mode: RouterMode = setting(
        "latency", "latency = KV-aware: the worker with the lowest predicted latency, from "
        "step times learned from the workers (docs/routing.md); kv = KV-aware with Dynamo's "
        "cost function; round-robin, random, least-loaded ignore the caches", flag="router")
    seed: int | None = setting(None, "seeds the random choices", flag="router-seed",
                               default_help="unseeded")
    unhealthy_cooldown_s: float = setting(
        5.0, "how long a worker that failed a call is kept out of rotation")
    health_timeout_s: float = setting(
        3.0, "a worker whose feed is silent this long leaves the rotation until it answers, "
        "and its streams continue on other workers")
    first_token_timeout_s: float = setting(
        120.0, "a worker that sends no first token in this long is given up on: the request "
        "moves to another worker")
    inter_token_timeout_s: float = setting(
        30.0, "a stream whose worker sends nothing for this long moves to another worker")
    # -- KV-aware routing (mode "kv")
    kv: KvRouterConfig = section(KvRouterConfig, prefix="router-")
    itl_weight: float = setting(
        0.0, "latency mode: weight of the decode phase against the time to first token: the "
        "request's own decode time and the delay its prefill and KV add to running decodes "
        "(0: TTFT alone)", flag="router-itl-weight")
    session_itl_weight: float = setting(
        0.3, "latency mode: the same weight for a request of a session (its placement "
        "carries the session's later turns)", flag="router-session-itl-weight")
    latency_candidates: int = setting(
        4, "latency mode: with more than twice this many workers, only this many holding the "
        "longest part of the prompt and this many of the least loaded are scored",
        flag="router-latency-candidates")
    decode_horizon_tokens: int = setting(
        512, "latency mode: a request's decode steps counted at most (its max_tokens below)",
        flag="router-decode-horizon-tokens")
    itl_bound_ms: float | None = setting(
        None, "latency mode: avoid workers whose decodes would see a step longer than this",
        flag="router-itl-bound-ms", default_help="no bound")
    session_ttl_s: float = setting(
        600.0, "a conversation's turns (X-Session-ID header, or the user field) go to the "
        "worker of its previous turn while that worker can take them; forgotten after this "
        "long unused", flag="router-session-ttl-s")
    host_kv_credit: float | None = setting(
        None, "KV-aware modes: a prompt block a worker holds only in host memory counts as "
        "this much of a block held on the device (it is copied back, not recomputed)",
        flag="router-host-kv-credit",
        default_help="the worker's own, 1 - read time / compute time, where it announces one; "
        "else 0.75")
    disk_kv_credit: float | None = setting(
        None, "KV-aware modes: the same for a block held only on disk",
        flag="router-disk-kv-credit", default_help="the worker's own; else 0.25")
    kv_events: bool = setting(
        True, "follow the workers' KV events; off: predict caches from routing decisions "
        "(approximate mode)")
    kv_stale_after_s: float = setting(
        10.0, "a worker that prefilled new blocks and sent no KV event for this long is "
        "blind (its events stopped)", flag="router-kv-stale-after-s")
    blind_fallback: bool = setting(
        True, "route to a blind worker (events stopped, or its cache hits diverge from the "
        "index) on load alone", flag="router-blind-fallback")
    ttl_s: float = setting(
        120.0, "approximate mode: seconds a routed prefix is assumed cached",
        flag="router-ttl-s")
    block_size: int | None = setting(
        None, "KV block size the router hashes with", flag="router-block-size",
        default_help="the first worker's")
    replica_sync: bool = setting(
        False, "KV routers of several frontends share their active-request load",
        flag="router-replica-sync")
    # -- overload
    active_decode_blocks_threshold: float | None = setting(
        None, "a worker above this KV usage fraction is busy", default_help="no limit")
    active_prefill_tokens_threshold: int | None = setting(
        None, "a worker with more active prefill tokens than this is busy",
        default_help="no limit")
    overload_status: Literal[503, 529] = setting(
        529, "HTTP status when every worker is busy (Dynamo answers 529; 503 is the "
        "alternative)")

    def __post_init__(self) -> None:
        check_choices(self)
        require(self.unhealthy_cooldown_s >= 0, "unhealthy_cooldown_s", "must be >= 0")
        for name in ("host_kv_credit", "disk_kv_credit"):
            value = getattr(self, name)
            require(value is None or 0 <= value <= 1, name, "must be between 0 and 1")
        for name in ("health_timeout_s", "first_token_timeout_s", "inter_token_timeout_s"):
            require(getattr(self, name) > 0, name, "must be > 0")
        require(self.ttl_s > 0, "router_ttl_s", "must be > 0")
        require(self.itl_weight >= 0, "router_itl_weight", "must be >= 0")
        require(self.session_itl_weight >= 0, "router_session_itl_weight", "must be >= 0")
        require(self.latency_candidates >= 1, "router_latency_candidates", "must be >= 1")
        require(self.decode_horizon_tokens >= 0, "router_decode_horizon_tokens", "must be >= 0")
        require(self.itl_bound_ms is None or self.itl_bound_ms > 0, "router_itl_bound_ms",
                "must be > 0")
        require(self.session_ttl_s > 0, "router_session_ttl_s", "must be > 0")
        require(self.kv_stale_after_s > 0, "router_kv_stale_after_s", "must be > 0")
        require(self.block_size is None or self.block_size >= 1, "block_size", "must be >= 1")
        t = self.active_decode_blocks_threshold
        require(t is None or 0.0 <= t <= 1.0, "active_decode_blocks_threshold", "must be 0..1")
        t2 = self.active_prefill_tokens_threshold
        require(t2 is None or t2 >= 0, "active_prefill_tokens_threshold", "must be >= 0")


@dataclass(frozen=True)
class DisaggConfig:
    """When a model has prefill workers: which requests skip them (conditional
    disaggregation). ``always`` sends every request to a prefill worker first; ``isl``
    prefills locally on the decode worker when the prompt's uncached part is short;
    ``load`` when the prefill pool is busy; ``isl_or_load`` when either holds."""

    policy: DisaggPolicy = setting(
        "always", "which requests of a disaggregated model skip the prefill pool: none "
        "(always), short uncached prompts (isl), all while it is busy (load), either",
        flag="disagg-policy")
    max_local_prefill_tokens: int = setting(
        2048, "isl: prefill locally below this many uncached prompt tokens ...")
    max_local_prefill_ratio: float = setting(
        0.7, "... and below this uncached share of the prompt")
    prefill_busy_tokens: int = setting(
        8192, "load: a prefill worker with more active prefill tokens is busy ...")
    prefill_busy_waiting: int = setting(
        4, "... or one with more waiting requests")

    def __post_init__(self) -> None:
        check_choices(self)
        require(self.max_local_prefill_tokens >= 0, "max_local_prefill_tokens", "must be >= 0")
        require(0.0 <= self.max_local_prefill_ratio <= 1.0, "max_local_prefill_ratio",
                "must be 0..1")
        require(self.prefill_busy_tokens >= 0, "prefill_busy_tokens", "must be >= 0")
        require(self.prefill_busy_waiting >= 0, "prefill_busy_waiting", "must be >= 0")


@dataclass(frozen=True)
class RouterServiceConfig:
    """``baton router``: the KV router alone, serving decisions on the request plane."""

    host: str = setting("127.0.0.1", "address the router listens on; 0.0.0.0 = every "
                        "interface")
    advertise_host: str | None = setting(
        None, "address frontends on other hosts reach the router at (the one printed)",
        default_help="--host, or the address this host's name resolves to when --host is "
        "0.0.0.0")
    port: int = setting(0, "port; 0 = any free port")
    router: RouterConfig = section(RouterConfig)

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, "port", "must be 0..65535")
        require(self.router.mode in ("kv", "latency"), "router",
                "the standalone router is a KV router (kv or latency)")


# ---------------------------------------------------------------------------- frontend


@dataclass(frozen=True)
class FrontendConfig:
    """The HTTP frontend: where it listens, how it routes, how it survives failures."""

    host: str = setting("127.0.0.1", "address the HTTP server listens on")
    port: int = setting(8000, "HTTP port; 0 = any free port")
    max_body_bytes: int = setting(8 * 1024 * 1024, "larger request bodies get 413")
    keep_alive_timeout_s: int = setting(
        75, "an idle HTTP connection is closed after this long (above the idle time of "
        "common client pools, so a reused connection is not closed under a request)")
    router: RouterConfig = section(RouterConfig)
    disagg: DisaggConfig = section(DisaggConfig)
    # -- access
    api_keys: tuple[str, ...] = setting(
        (), "a key clients must send (Authorization: Bearer KEY) to /v1/* and to the routes "
        "that read settings (repeatable)", flag="api-key", env="BATON_API_KEY", repeat=True,
        metavar="KEY", default_help="none: no key needed", secret=True)
    api_key_file: str | None = setting(
        None, "a file of API keys, one per line (added to --api-key)", metavar="FILE")
    admin_key: str | None = setting(
        None, "the key the routes that change state (POST /busy_threshold) need; without it "
        "any API key does, and with no key at all they are refused when --host is not "
        "loopback", env="BATON_ADMIN_KEY", metavar="KEY", secret=True)
    ssl_certfile: str | None = setting(None, "serve HTTPS with this certificate (PEM) ...",
                                       metavar="PEM", default_help="plain HTTP")
    ssl_keyfile: str | None = setting(None, "... and this private key (PEM)", metavar="PEM")
    migration_limit: int = setting(
        3, "times a stream whose worker dies moves to another worker (0: never)")
    drain_timeout_s: float = setting(
        30.0, "on SIGTERM, how long open streams may run before the frontend exits anyway")
    traffic_interval_s: float = setting(
        1.0, "how often the frontend publishes what it served (requests, lengths, TTFT, ITL) "
        "on the event plane, for the planner")

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, "port", "must be 0..65535")
        require(self.max_body_bytes >= 1024, "max_body_bytes", "must be >= 1024")
        require(self.keep_alive_timeout_s > 0, "keep_alive_timeout_s", "must be > 0")
        require(self.traffic_interval_s > 0, "traffic_interval_s", "must be > 0")
        require((self.ssl_certfile is None) == (self.ssl_keyfile is None), "ssl_certfile",
                "give both --ssl-certfile and --ssl-keyfile, or neither")
        require(all(k and k.strip() == k for k in self.api_keys), "api_keys",
                "keys must be non-empty, without surrounding spaces")
        require(self.migration_limit >= 0, "migration_limit", "must be >= 0")


# ----------------------------------------------------------------------------- planner


@dataclass(frozen=True)
class PlannerConfig:
    """The SLA planner: targets, how it predicts and reacts, and the guards on its scaling
    (``docs/planner.md``). Pool bounds: ``agg`` for an aggregated pool, ``prefill`` and
    ``decode`` for disaggregated ones."""

    mode: PlannerMode = setting(
        "both", "throughput = size pools from predicted traffic and the workers' profile; "
        "load = react to queued prefill tokens, KV usage and observed TTFT/ITL; both = "
        "load scaling above the throughput size; off = no planner", flag="planner")
    ttft_ms: float = setting(500.0, "SLA: time to first token target, ms", flag="sla-ttft-ms")
    itl_ms: float = setting(50.0, "SLA: inter-token latency target, ms", flag="sla-itl-ms")
    throughput_interval_s: float = setting(
        30.0, "throughput mode: seconds between predictions (and the window they predict)")
    load_interval_s: float = setting(5.0, "load mode: seconds between reactions")
    predictor: PredictorKind = setting(
        "constant", "throughput mode: how the next interval's request count is predicted (the "
        "last value, a moving average, a local linear trend, or the count one --season-s "
        "before); ISL and OSL are the means of the last hour, or of the last "
        "min_observations intervals when theirs differ beyond noise")
    season_s: float | None = setting(
        None, "seasonal predictor: the traffic's period (a day; the spacing of periodic "
        "bursts), a whole number of throughput intervals", flag="season-s",
        default_help="none")
    min_observations: int = setting(
        5, "observations a mode needs before it scales (cold start: none of them acts on "
        "the first samples)", flag="planner-min-observations")
    worker_startup_s: float = setting(
        60.0, "seconds a new worker takes to serve: throughput mode sizes pools for the "
        "traffic predicted that far ahead; workers still starting count as capacity to come")
    scale_up_cooldown_s: float = setting(0.0, "seconds between two scale-ups of a pool")
    scale_down_cooldown_s: float = setting(
        120.0, "seconds after any change of a pool before it scales down")
    scale_down_utilization: float = setting(
        0.7, "hysteresis: a pool scales down only to a size whose predicted load stays under "
        "this share of its capacity (throughput mode) or of the SLA (load mode)")
    falling_scale_down_utilization: float = setting(
        1.0, "throughput mode, while the request count falls beyond noise (its trend over the "
        "last 12 predictions more than 5 standard errors below flat): the share of capacity a "
        "shrunk pool may be loaded to, in place of --scale-down-utilization (the same value "
        "turns this off)")
    scale_down_noise: float = setting(
        2.0, "throughput mode: a pool also shrinks only to a size that serves, at full load, "
        "the next interval's predicted rate plus this many standard deviations of the last "
        "12 predictions' errors (from their median absolute error; 0: off)")
    rise_ahead_workers: int = setting(
        1, "throughput mode, while the request count rises beyond noise (its trend over the "
        "last 4 predictions more than 5 standard errors above flat): a pool is sized for that "
        "trend's line a start-up ahead, at most this many workers above the size for the "
        "last count (0: off; docs/planner.md)")
    queue_pooling: float = setting(
        0.5, "throughput sizing: how far a pool's workers share their queues behind the "
        "router (0 = each its own queue; 1 = one queue for all, so each of n may run fuller "
        "at the same wait); scales the gain of the M/G/n queue over n M/G/1 queues")
    queue_pooling_workers: int = setting(
        2, "throughput sizing: in pools whose workers decode (aggregated, decode), the gain "
        "of --queue-pooling counts at most this many workers (measured behind the router, an "
        "aggregated worker's capacity within the SLA grows from one worker to two and not "
        "beyond: the ITL, which does not pool, binds; prefill workers gain on to four; "
        "benches/planner_pooling.py)")
    max_scale_step: int = setting(8, "workers a pool gains or loses in one decision at most")
    min_workers: int = setting(1, "aggregated pool: fewest workers")
    max_workers: int = setting(64, "aggregated pool: most workers")
    min_prefill_workers: int = setting(1, "prefill pool: fewest workers")
    max_prefill_workers: int = setting(64, "prefill pool: most workers")
    min_decode_workers: int = setting(1, "decode pool: fewest workers")
    max_decode_workers: int = setting(64, "decode pool: most workers")
    max_total_workers: int | None = setting(
        None, "budget: the pools together never exceed this", default_help="no budget")

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("ttft_ms", "itl_ms", "throughput_interval_s", "load_interval_s"):
            require(math.isfinite(getattr(self, name)) and getattr(self, name) > 0, name,
                    "must be > 0")
        for name in ("worker_startup_s", "scale_up_cooldown_s", "scale_down_cooldown_s"):
            require(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("scale_down_utilization", "falling_scale_down_utilization"):
            require(0 < getattr(self, name) <= 1, name, "must be in (0, 1]")
        _positive_ints(self, "max_scale_step", "min_observations", "queue_pooling_workers")
        require(self.rise_ahead_workers >= 0, "rise_ahead_workers", "must be >= 0")
        require(self.scale_down_noise >= 0, "scale_down_noise", "must be >= 0")
        require(0 <= self.queue_pooling <= 1, "queue_pooling", "must be in [0, 1]")
        require((self.season_s is not None) == (self.predictor == "seasonal"), "season_s",
                "is the seasonal predictor's period: set both or neither")
        if self.season_s is not None:
            steps = self.season_s / self.throughput_interval_s
            require(steps >= 2 and math.isclose(steps, round(steps)), "season_s",
                    "must be a whole number (>= 2) of throughput intervals")
        for pool in ("", "prefill_", "decode_"):
            low, high = getattr(self, f"min_{pool}workers"), getattr(self, f"max_{pool}workers")
            require(0 <= low <= high, f"min_{pool}workers", f"must be 0..max_{pool}workers")
        require(self.max_total_workers is None or self.max_total_workers >= 1,
                "max_total_workers", "must be >= 1")

    def bounds(self, pool: str) -> tuple[int, int]:
        """(fewest, most) workers of pool ``agg``, ``prefill`` or ``decode``."""
        prefix = "" if pool == "agg" else f"{pool}_"
        return getattr(self, f"min_{prefix}workers"), getattr(self, f"max_{prefix}workers")


@dataclass(frozen=True)
class ProfileConfig:
    """``baton profile``: what one worker sustains within the SLA, for the planner. The
    simulated engine's comes from its timing model (``--speedup-ratio`` included) unless
    ``--measure``; other engines are always measured (``control/profiling.py``)."""

    worker: WorkerConfig = section(WorkerConfig)
    """Only the model and the engine settings are flags."""
    sla: PlannerConfig = section(PlannerConfig)
    """Only its targets (``--sla-ttft-ms``, ``--sla-itl-ms``) are flags."""
    isl: int = setting(3000, "mean prompt length, tokens")
    osl: int = setting(150, "mean output length, tokens")
    isl_cv: float = setting(
        0.0, "spread of the prompt lengths (standard deviation over mean): long prompts "
        "ahead make the others wait, so a wider spread lowers the prefill capacity")
    measure: bool = setting(
        False, "run the engine on probe requests and learn its step times (always for the "
        "hf and vllm engines); off: the simulated engine's timing model")

    def __post_init__(self) -> None:
        _positive_ints(self, "isl", "osl")
        require(math.isfinite(self.isl_cv) and self.isl_cv >= 0, "isl_cv", "must be >= 0")
        require(self.worker.engine.kind != "mock" or self.worker.engine.timing.speedup_ratio > 0,
                "speedup_ratio", "a simulated worker without delay (0) has no capacity to "
                "profile")

    @property
    def measured(self) -> bool:
        return self.measure or self.worker.engine.kind != "mock"


@dataclass(frozen=True)
class TracingConfig:
    """OpenTelemetry tracing of requests, for every ``baton`` command (``baton/tracing.py``)."""

    trace_exporter: TraceExporter = setting(
        "off", "trace each request across frontend, router and worker (OpenTelemetry): console "
        "prints the spans, otlp sends them to $OTEL_EXPORTER_OTLP_ENDPOINT (pip install "
        "'baton[tracing]'); a graph's processes inherit it", env="BATON_TRACE_EXPORTER")


@dataclass(frozen=True)
class OperatorConfig:
    """``baton deploy operator``: reconciles BatonDeployment resources into Kubernetes
    objects."""

    kube: KubeApiConfig = section(KubeApiConfig)
    interval_s: float = setting(
        10.0, "besides on every spec change, each resource is reconciled this often (pods "
        "that became ready, objects changed by hand)")
    health_port: int = setting(8080, "port of the operator's GET /healthz (0 = any free port)")

    def __post_init__(self) -> None:
        require(self.interval_s > 0, "interval_s", "must be > 0")
        require(0 <= self.health_port <= 65535, "health_port", "must be 0..65535")


@dataclass(frozen=True)
class PlannerServiceConfig:
    """``baton planner``: the planner as its own process, scaling a deployment through a
    connector from what its frontends and workers publish."""

    planner: PlannerConfig = section(PlannerConfig)
    profile: str | None = setting(
        None, "the workers' profile (JSON: prefill and decode tokens/s within the SLA; "
        "`baton profile` writes one)", metavar="JSON", default_help="required")
    host: str = setting("127.0.0.1", "address the planner's GET /metrics listens on")
    metrics_port: int = setting(0, "port of the planner's GET /metrics (Prometheus); 0 = any "
                                "free port (printed when it starts)")
    connector: ConnectorKind = setting(
        "local", "local = the graph (`baton serve -f`) that runs this planner starts and "
        "drains worker processes; kubernetes = set the pools' counts of a BatonDeployment "
        "(--deployment), which its operator applies")
    deployment: str | None = setting(
        None, "the BatonDeployment whose pools the kubernetes connector sets (found with "
        "--kube-api and --kube-namespace)", metavar="NAME",
        default_help="required with --connector kubernetes")

    def __post_init__(self) -> None:
        check_choices(self)
        require(self.planner.mode != "off", "planner", "baton planner needs a mode: "
                "throughput, load or both")
        require(0 <= self.metrics_port <= 65535, "metrics_port", "must be 0..65535")
        require(self.connector != "kubernetes" or self.deployment is not None, "deployment",
                "--connector kubernetes needs the BatonDeployment's name")


# ------------------------------------------------------------------- deployment shape


@dataclass(frozen=True)
class PoolsConfig:
    """The workers of one deployment (``baton serve``, ``baton sim``): N aggregated workers, or
    ``disaggregated`` P prefill and D decode workers."""

    num_workers: int = setting(2, "aggregated workers", flag="workers")
    disaggregated: bool = setting(
        False, "disaggregated: --prefill-workers and --decode-workers instead", flag="disagg")
    num_prefill_workers: int = setting(1, "prefill workers (with --disagg)",
                                       flag="prefill-workers")
    num_decode_workers: int = setting(1, "decode workers (with --disagg)",
                                      flag="decode-workers")
    prefill_scheduler: SchedulerConfig | None = setting(
        None, "the prefill workers' scheduler (same block size as the others); None: the "
        "other workers'", cli=False)
    """The CLI sets it from ``--prefill-num-blocks`` and the like (``cli/args.py``)."""

    def __post_init__(self) -> None:
        _positive_ints(self, "num_workers", "num_prefill_workers", "num_decode_workers")

    def roles(self) -> list[WorkerRole]:
        """The role of each worker, in start (and worker id) order: prefill workers first."""
        roles: list[WorkerRole]
        if not self.disaggregated:
            roles = ["agg"] * self.num_workers
        else:
            roles = ["prefill"] * self.num_prefill_workers
            roles += ["decode"] * self.num_decode_workers
        return roles

    def scheduler_for(self, role: WorkerRole, base: SchedulerConfig) -> SchedulerConfig:
        """The scheduler of a worker of ``role`` whose pool's default is ``base``."""
        if role == "prefill" and self.prefill_scheduler is not None:
            return self.prefill_scheduler
        return base

    def check_block_size(self, base: SchedulerConfig) -> None:
        prefill = self.prefill_scheduler
        require(prefill is None or prefill.block_size == base.block_size, "prefill_scheduler",
                "its block_size must equal the other workers' (KV moves in blocks)")


@dataclass(frozen=True)
class ServeConfig:
    """``baton serve``: a frontend and its workers in one process."""

    frontend: FrontendConfig = section(FrontendConfig)
    worker: WorkerConfig = section(
        lambda: WorkerConfig(engine=EngineConfig(kv_transfer="inproc"), metrics_port=None))
    """In one process KV moves in memory (``inproc``); a ``baton worker`` uses ``tcp``."""
    pools: PoolsConfig = section(PoolsConfig)

    def __post_init__(self) -> None:
        self.pools.check_block_size(self.worker.engine.scheduler)

    def worker_config(self, role: WorkerRole) -> WorkerConfig:
        """The configuration of an in-process worker of ``role``."""
        scheduler = self.pools.scheduler_for(role, self.worker.engine.scheduler)
        return replace(self.worker, role=role,
                       engine=replace(self.worker.engine, scheduler=scheduler))
