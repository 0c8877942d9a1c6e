"""Chaos: workers that die, hang, fault or drop off the network under load, and clients that
stop reading; are any requests lost, and how long does a client wait?

What is measured
    A graph of one frontend and ``--workers`` simulated workers on its own nats-server runs
    under a closed loop of streaming chat completions while a ``--scenario`` plays out:

    * ``kill``: every ``--kill-interval-s`` a random live worker gets SIGKILL (its whole
      process group, as the supervisor does); the supervisor restarts it.
    * ``stop``: every interval a random live worker is frozen (SIGSTOP) for ``--pause-s``,
      then resumed (SIGCONT): a hung process that holds its connections open.
    * ``partition``: each worker runs in a network namespace of its own, joined to the
      frontend and NATS by a switch; every interval a random worker's link drops every
      packet both ways (a ``blackhole`` qdisc) for ``--pause-s``. Needs root and iproute2.
    * ``fault-raise`` / ``fault-hang``: each worker's engine faults at a step of its own
      (``--fault-after-steps`` N, then 1.25 N, 1.5 N... for the next workers; a step that
      raises, or one that hangs until the step timeout), is replaced in place, and faults
      again as many steps later.
    * ``slow-clients``: ``--slow-clients`` extra clients each open a long stream and never
      read it, for the whole run.

    The frontend runs with short deadlines (``--first-token-timeout-s``,
    ``--inter-token-timeout-s``) so that a hung or cut-off worker's streams move on within
    them. Per request the client records TTFT, the longest gap between two tokens,
    completion, finish reason, ``usage.completion_tokens`` vs ``max_tokens`` (``ignore_eos``,
    so they must be equal) and whether the stream was well formed. The goal: zero lost
    requests, and no client waiting longer than the deadlines (plus a migration).

    * failed: HTTP status other than 200, a client/transport error or timeout, or an
      ``{"error": ...}`` event in the stream.
    * malformed: status 200 and no error event, but a ``data:`` line that is not JSON, not
      exactly one non-null ``finish_reason``, no ``usage``, ``completion_tokens`` !=
      ``max_tokens``, or the stream does not end with ``data: [DONE]``.
    * lost = failed + malformed. The exit status is 1 when any request was lost.

    Migrations are read from the frontend's ``baton_frontend_migrations_total`` at the end;
    the client also counts streams whose chunks named more than one ``baton.worker_id``.

How
    The graph is built in code (``parse_graph``) and run in this process (``Graph``), with
    ``lease_ttl_s`` small so killed workers leave discovery quickly, and a short restart
    backoff. Load: aiohttp + uvloop, ``--concurrency`` tasks, bounded by ``--requests`` and
    ``--max-seconds``; prompts share one of a few prefixes (so the KV router has overlap to
    route by) plus a unique tail; ``max_tokens`` uniform in [--min-tokens, --max-tokens].

    .venv/bin/python benches/chaos.py                       # 2,000 requests, ~2-3 min
    .venv/bin/python benches/chaos.py --requests 200 --max-seconds 60   # quick
    .venv/bin/python benches/chaos.py --scenario stop --requests 600
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

try:
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover - orjson is optional
    _loads = json.loads

from baton.graph import Graph, parse_graph

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee "
         "zulu river stone cloud ember frost grove harbor island jungle lantern meadow").split()


@dataclass
class Record:
    index: int
    max_tokens: int
    start: float = 0.0
    end: float = 0.0
    ttft: float | None = None
    max_gap: float = 0.0
    status: int | None = None
    error: str | None = None
    problems: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    completion_tokens: int | None = None
    content_chunks: int = 0
    worker_ids: list[str] = field(default_factory=list)
    done: bool = False
    response_id: str | None = None
    """The completion's id, as the frontend logs it."""

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def malformed(self) -> bool:
        return not self.failed and bool(self.problems)

    @property
    def completed(self) -> bool:
        return not self.failed and not self.problems


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 1)


# ------------------------------------------------------------------------------- the load


def _prompt(rng: random.Random, prefixes: list[str]) -> str:
    tail = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 48)))
    return f"{rng.choice(prefixes)} {tail} {rng.getrandbits(48):x}"


_BAD = object()


def _parse(raw: bytes) -> object:
    try:
        return _loads(raw)
    except ValueError:
        return _BAD


def _has_content(chunk: object) -> bool:
    return isinstance(chunk, dict) and any(
        (c.get("delta") or {}).get("content") for c in chunk.get("choices") or ())


def _check_stream(rec: Record, events: list[tuple[bytes, object]]) -> None:
    """Fills ``rec`` from the SSE body's ``data:`` payloads (raw, parsed), in order."""
    saw_done = False
    usage = None
    for raw, chunk in events:
        if saw_done:
            rec.problems.append("data after [DONE]")
            break
        if raw == b"[DONE]":
            saw_done = True
            continue
        if chunk is _BAD:
            rec.problems.append(f"not JSON: {raw[:80]!r}")
            continue
        if not isinstance(chunk, dict):
            rec.problems.append(f"not an object: {raw[:80]!r}")
            continue
        if "error" in chunk:
            rec.error = f"error event: {json.dumps(chunk['error'])[:300]}"
            continue
        rec.response_id = rec.response_id or chunk.get("id")
        wid = (chunk.get("baton") or {}).get("worker_id")
        if wid is None:
            rec.problems.append("chunk without baton.worker_id")
        elif not rec.worker_ids or rec.worker_ids[-1] != str(wid):
            rec.worker_ids.append(str(wid))
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if (choice.get("delta") or {}).get("content"):
                rec.content_chunks += 1
            if choice.get("finish_reason") is not None:
                rec.finish_reasons.append(choice["finish_reason"])
    if rec.error is not None:
        return
    if not saw_done:
        rec.problems.append("no data: [DONE] at the end")
    rec.done = saw_done
    if len(rec.finish_reasons) != 1:
        rec.problems.append(f"{len(rec.finish_reasons)} finish reasons")
    if usage is None:
        rec.problems.append("no usage")
    else:
        rec.completion_tokens = usage.get("completion_tokens")
        if rec.completion_tokens != rec.max_tokens:
            rec.problems.append(f"completion_tokens {rec.completion_tokens} != max_tokens "
                                f"{rec.max_tokens}")


async def _one(session: aiohttp.ClientSession, url: str, model: str, rec: Record, prompt: str,
               t0: float) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": rec.max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    rec.start = time.perf_counter() - t0
    events: list[tuple[bytes, object]] = []
    last: float | None = None
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            rec.status = resp.status
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return
            async for line in resp.content:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                now = time.perf_counter() - t0
                payload = line[5:].strip()
                chunk = None if payload == b"[DONE]" else _parse(payload)
                events.append((payload, chunk))
                if _has_content(chunk):
                    if rec.ttft is None:
                        rec.ttft = now - rec.start
                    if last is not None:
                        rec.max_gap = max(rec.max_gap, now - last)
                    last = now
    except (aiohttp.ClientError, TimeoutError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        rec.end = time.perf_counter() - t0
    if rec.error is None:
        _check_stream(rec, events)


async def _load(url: str, model: str, args: argparse.Namespace, records: list[Record],
                t0: float) -> None:
    rng = random.Random(args.seed)
    prefixes = [" ".join(rng.choice(WORDS) for _ in range(args.prefix_words))
                for _ in range(8)]
    deadline = time.monotonic() + args.max_seconds
    counter = iter(range(args.requests))
    timeout = aiohttp.ClientTimeout(total=args.request_timeout_s)

    async def loop(session: aiohttp.ClientSession) -> None:
        for i in counter:
            if time.monotonic() >= deadline:
                return
            rec = Record(i, rng.randint(args.min_tokens, args.max_tokens))
            records.append(rec)
            await _one(session, url, model, rec, _prompt(rng, prefixes), t0)

    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(loop(session) for _ in range(args.concurrency)))


# ------------------------------------------------------------------------------ the chaos


class Target:
    """A worker process the chaos can hit."""

    def __init__(self, name: str, pid_of: Callable[[], int | None],
                 ready: Callable[[], bool], link: tuple[str, ...] = ()) -> None:
        self.name = name
        self._pid_of = pid_of
        self._ready = ready
        self.link = link
        """``partition``: (host namespace, its interface, switch namespace, switch port)."""

    @property
    def pid(self) -> int | None:
        return self._pid_of()

    @property
    def live(self) -> bool:
        return self._ready() and self.pid is not None


def _blackhole(target: Target, on: bool) -> None:
    """Drops every packet to and from ``target``'s host (both ends of its link), or stops."""
    host_ns, host_if, switch_ns, switch_if = target.link
    for ns, dev in ((host_ns, host_if), (switch_ns, switch_if)):
        action = ["replace", "dev", dev, "root", "blackhole"] if on else ["del", "dev", dev, "root"]
        subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", *action], check=on,
                       capture_output=True, timeout=10)


async def _chaos(targets: list[Target], args: argparse.Namespace, kills: list[dict],
                 t0: float, stop: asyncio.Event) -> None:
    """Every ``--kill-interval-s`` hits a random live worker the scenario's way (never the
    last one that is not already hit); ``fault-*`` and ``slow-clients`` need no hand."""
    if args.scenario not in ("kill", "stop", "partition"):
        await stop.wait()
        return
    rng = random.Random(args.seed + 1)
    hit: set[str] = set()
    resumes: list[asyncio.Task[None]] = []

    async def undo(target: Target) -> None:
        try:
            await asyncio.wait_for(stop.wait(), args.pause_s)
        except TimeoutError:
            pass
        _undo(target)

    def _undo(target: Target) -> None:
        if target.name not in hit:
            return
        hit.discard(target.name)
        if args.scenario == "stop" and target.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(target.pid, signal.SIGCONT)
        elif args.scenario == "partition":
            _blackhole(target, on=False)

    try:
        while True:
            try:
                await asyncio.wait_for(stop.wait(), args.kill_interval_s)
                return
            except TimeoutError:
                pass
            live = [t for t in targets if t.live and t.name not in hit]
            t = round(time.perf_counter() - t0, 2)
            if len(live) < 2:  # never the last one: that tests nothing but an outage
                kills.append({"t": t, "skipped": True, "live": len(live)})
                continue
            victim = rng.choice(live)
            pid = victim.pid
            assert pid is not None
            try:
                if args.scenario == "kill":
                    os.killpg(pid, signal.SIGKILL)
                elif args.scenario == "stop":
                    os.killpg(pid, signal.SIGSTOP)
                else:
                    _blackhole(victim, on=True)
            except ProcessLookupError:
                continue
            if args.scenario != "kill":
                hit.add(victim.name)
                resumes.append(asyncio.create_task(undo(victim)))
            kills.append({"t": t, "worker": victim.name, "pid": pid, "live_before": len(live)})
    finally:
        for task in resumes:
            task.cancel()
        for target in targets:
            _undo(target)


async def _slow_clients(url: str, args: argparse.Namespace, model: str
                        ) -> list[asyncio.StreamWriter]:
    """``--slow-clients`` connections that each ask for a long stream and never read."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    writers = []
    for i in range(args.slow_clients):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        _, writer = await asyncio.open_connection(sock=sock)
        body = json.dumps({"model": model, "stream": True, "ignore_eos": True,
                           "max_tokens": args.slow_tokens,
                           "messages": [{"role": "user", "content": f"slow reader {i}"}]})
        writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\n"
                     f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
                     f"{body}".encode())
        writers.append(writer)
    return writers


def _unsent_bytes(ports: list[int]) -> int | None:
    """Bytes the frontend has queued but the slow clients (at local ``ports``) have not read:
    the Send-Q of the frontend's end of their connections (``ss``)."""
    try:
        out = subprocess.run(["ss", "-Htn"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return None
    total, wanted = 0, {str(p) for p in ports}
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 5 and cols[4].rsplit(":", 1)[-1] in wanted:
            total += int(cols[2])
    return total


async def _metric(session: aiohttp.ClientSession, url: str, name: str) -> float | None:
    """The sum of a metric's samples on the frontend's ``/metrics``."""
    try:
        async with session.get(url + "/metrics") as resp:
            text = await resp.text()
    except aiohttp.ClientError:
        return None
    total = None
    for line in text.splitlines():
        if line.startswith(name):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


# ----------------------------------------------------------------------------------- main


def _frontend_args(args: argparse.Namespace) -> list[str]:
    return ["--migration-limit", str(args.migration_limit),
            "--first-token-timeout-s", str(args.first_token_timeout_s),
            "--inter-token-timeout-s", str(args.inter_token_timeout_s)]


def _worker_pools(args: argparse.Namespace) -> list[dict]:
    """One pool of ``--workers``; for ``fault-*``, one pool per worker, whose engines fault
    at staggered steps (N, 1.25 N, 1.5 N...): engines that all failed at once would test an
    outage, not a fault."""
    if not args.scenario.startswith("fault-"):
        return [{"name": "agg", "count": args.workers}]
    extra = ["--fault-mode", "hang", "--step-timeout-s", str(args.step_timeout_s)] \
        if args.scenario == "fault-hang" else []
    return [{"name": f"agg{i}", "count": 1, "args": [
        "--fault-after-steps", str(int(args.fault_after_steps * (1 + i / args.workers))),
        *extra]} for i in range(args.workers)]


def _graph_config(args: argparse.Namespace):
    return parse_graph({
        "namespace": f"baton-chaos-{os.getpid()}",
        "nats": {"start": True},
        "lease_ttl_s": args.lease_ttl_s,
        "engine": {"speedup_ratio": args.speedup_ratio, "block_size": 16},
        "frontends": [{"port": 0, "router": args.router, "args": _frontend_args(args)}],
        "workers": _worker_pools(args),
        "supervision": {"backoff_initial_s": 0.5, "backoff_max_s": args.backoff_max_s},
    })


@dataclass
class Deployment:
    url: str
    targets: list[Target]
    restarts: Callable[[], tuple[int, dict[str, int]]]
    """(worker restarts, other processes' restarts by name)"""
    pids: Callable[[], list[int]]


@contextlib.asynccontextmanager
async def _supervised(args: argparse.Namespace, run_dir: Path,
                      report: Callable[[str], None]) -> AsyncIterator[Deployment]:
    """The graph on this host, its processes supervised (restarted when they die)."""
    graph = Graph(_graph_config(args), log_dir=run_dir, report=report)
    async with graph:
        workers = [p for p in graph.supervisor.processes if p.spec.group == "worker"]
        targets = [Target(p.spec.name, lambda p=p: p.pid, lambda p=p: p.is_ready)
                   for p in workers]

        def restarts() -> tuple[int, dict[str, int]]:
            others = {p.spec.name: p.num_restarts for p in graph.supervisor.processes
                      if p.spec.group != "worker" and p.num_restarts}
            return sum(p.num_restarts for p in workers), others

        pids: list[int] = []
        yield Deployment(graph.frontend_urls[0], targets, restarts, lambda: pids)
        pids += graph.supervisor.all_pids()


@contextlib.asynccontextmanager
async def _on_hosts(args: argparse.Namespace, run_dir: Path,
                    report: Callable[[str], None]) -> AsyncIterator[Deployment]:
    """``partition``: nats-server on a switch, each worker on a host (network namespace) of
    its own, the frontend here; not supervised (a cut-off worker comes back by itself)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.nats_fixture import NATS_SERVER_BIN
    from tests.netns import lan

    os.environ.setdefault("BATON_CLUSTER_TOKEN", f"chaos-{os.getpid()}")
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, argv: list[str], ready: str) -> tuple[subprocess.Popen[bytes], str]:
        log = run_dir / f"{name}.log"
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log.open("wb"),
                                start_new_session=True)
        procs.append(proc)
        deadline = time.monotonic() + 60
        while not (m := re.search(ready, log.read_text(errors="replace"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; see {log}")
            time.sleep(0.1)
        report(f"{name} up")
        return proc, m.group(1)

    with lan(args.workers) as net:
        try:
            assert NATS_SERVER_BIN is not None
            nats, _ = start("nats", [*net.switch.prefix, NATS_SERVER_BIN, "-a", net.switch.ip,
                                     "-p", "4222", "-js", "-sd", str(run_dir / "js")],
                            r"(Server is ready)")
            url = f"nats://{net.switch.ip}:4222"
            baton = [sys.executable, "-m", "baton"]
            common = ["--nats", url, "--lease-ttl-s", str(args.lease_ttl_s)]
            workers = []
            for i, host in enumerate(net.hosts):
                proc, _ = start(f"worker-{i}", [
                    *host.prefix, *baton, "worker", "--host", host.ip, "--worker-id", str(i + 1),
                    "--speedup-ratio", str(args.speedup_ratio), "--block-size", "16",
                    *common], r"listening on (\S+)")
                workers.append((proc, host))
            _, port = start("frontend", [*baton, "frontend", "--port", "0", "--router",
                                         args.router, *_frontend_args(args), *common],
                            r"http://127\.0\.0\.1:(\d+)")
            targets = [Target(f"worker-{i}", lambda p=p: p.pid if p.poll() is None else None,
                              lambda: True, (h.namespace, h.link, net.switch.namespace,
                                             f"{h.link}s"))
                       for i, (p, h) in enumerate(workers)]
            yield Deployment(f"http://127.0.0.1:{port}", targets, lambda: (0, {}),
                             lambda: [p.pid for p in procs])
        finally:
            for proc in reversed(procs):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


async def run(args: argparse.Namespace) -> dict:
    run_dir = Path(args.logs or tempfile.mkdtemp(prefix="baton-chaos-"))
    events: list[str] = []
    t0 = time.perf_counter()

    def report(msg: str) -> None:
        line = f"{time.perf_counter() - t0:8.2f}s {msg}"
        events.append(line)
        if args.verbose:
            print(f"chaos graph: {line}", file=sys.stderr, flush=True)

    records: list[Record] = []
    kills: list[dict] = []
    deploy = _on_hosts if args.scenario == "partition" else _supervised
    async with deploy(args, run_dir, report) as where:
        url = where.url
        print(f"chaos ({args.scenario}): up in {time.perf_counter() - t0:.1f} s, frontend "
              f"{url}, logs in {run_dir}", file=sys.stderr, flush=True)
        slow = await _slow_clients(url, args, args.model) if args.scenario == "slow-clients" \
            else []
        t_load = time.perf_counter()
        stop = asyncio.Event()
        chaos = asyncio.create_task(_chaos(where.targets, args, kills, t0, stop))
        try:
            await _load(url, args.model, args, records, t0)
        finally:
            stop.set()
            await chaos
        load_s = time.perf_counter() - t_load
        async with aiohttp.ClientSession() as session:
            migrations = await _metric(session, url, "baton_frontend_migrations_total")
            # the unread streams are still open at the end (they would have long finished)
            still_open = await _metric(session, url, "baton_frontend_inflight_requests")
        backlog = _unsent_bytes([w.get_extra_info("sockname")[1] for w in slow])
        for writer in slow:
            writer.close()
        restarts, others = where.restarts()
    leftovers = [pid for pid in where.pids() if _alive(pid)]
    (run_dir / "chaos-events.log").write_text("\n".join(events) + "\n")
    result = _summary(args, records, kills, migrations, restarts, others, load_s, run_dir,
                      leftovers)
    result["summary"]["unread_streams_open_at_end"] = still_open if slow else None
    result["summary"]["bytes_waiting_for_slow_readers"] = backlog if slow else None
    return result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (not yet reaped by anyone) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


MIGRATION_ALLOWANCE_S = 1.0
"""Beyond a deadline, the time a stream may take to resume elsewhere (a prefill, a retry)."""


def _summary(args, records, kills, migrations, restarts, others, load_s, run_dir,
             leftovers) -> dict:
    completed = [r for r in records if r.completed]
    failed = [r for r in records if r.failed]
    malformed = [r for r in records if r.malformed]
    ttfts = [r.ttft for r in completed if r.ttft is not None]
    e2e = [r.end - r.start for r in completed]
    gaps = [r.max_gap for r in completed]
    moved = [r for r in records if len(r.worker_ids) > 1]
    ttft_max, stall_max = max(ttfts, default=0.0), max(gaps, default=0.0)
    summary = {
        "scenario": args.scenario,
        "deadlines_s": {"first_token": args.first_token_timeout_s,
                        "inter_token": args.inter_token_timeout_s},
        "within_deadlines": (ttft_max <= args.first_token_timeout_s + MIGRATION_ALLOWANCE_S
                             and stall_max <= args.inter_token_timeout_s
                             + MIGRATION_ALLOWANCE_S),
        "sent": len(records),
        "completed": len(completed),
        "failed": len(failed),
        "malformed": len(malformed),
        "lost": len(failed) + len(malformed),
        "migrations_frontend_metric": migrations,
        "streams_on_2plus_workers": len(moved),
        "kills": sum(1 for k in kills if not k.get("skipped")),
        "kills_skipped": sum(1 for k in kills if k.get("skipped")),
        "worker_restarts": restarts,
        "engine_restarts": sum(log.read_text(errors="replace").count("engine failed")
                               for log in Path(run_dir).glob("worker*.log")),
        "other_restarts": others,
        "ttft_p50_ms": _ms(percentile(ttfts, 50)),
        "ttft_p99_ms": _ms(percentile(ttfts, 99)),
        "ttft_max_ms": _ms(max(ttfts, default=None)),
        "ttft_p50_migrated_ms": _ms(percentile([r.ttft for r in moved if r.ttft], 50)),
        "e2e_p50_ms": _ms(percentile(e2e, 50)),
        "e2e_p99_ms": _ms(percentile(e2e, 99)),
        "max_stall_p99_ms": _ms(percentile(gaps, 99)),
        "max_stall_max_ms": _ms(max(gaps, default=None)),
        "load_seconds": round(load_s, 1),
        "req_per_s": round(len(completed) / load_s, 2) if load_s else None,
        "output_tokens": sum(r.completion_tokens or 0 for r in completed),
    }
    return {
        "bench": "chaos",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": vars(args),
        "run_dir": str(run_dir),
        "summary": summary,
        "leftover_pids": leftovers,
        "kills": kills,
        "lost": [asdict(r) for r in failed + malformed],
        "migrated": [asdict(r) for r in moved],
        "slowest_first_token": [asdict(r) for r in sorted(
            completed, key=lambda r: -(r.ttft or 0.0))[:5]],
        "longest_stall": [asdict(r) for r in sorted(completed, key=lambda r: -r.max_gap)[:5]],
    }


def _print(result: dict) -> None:
    s = result["summary"]
    rows = [
        ("scenario", s["scenario"]),
        ("deadlines first token / between tokens s",
         f"{s['deadlines_s']['first_token']} / {s['deadlines_s']['inter_token']}"),
        ("longest TTFT and stall within deadlines (+1 s)", s["within_deadlines"]),
        ("sent", s["sent"]), ("completed", s["completed"]), ("failed", s["failed"]),
        ("malformed", s["malformed"]), ("lost", s["lost"]),
        ("migrated (frontend metric)", s["migrations_frontend_metric"]),
        ("streams served by 2+ workers", s["streams_on_2plus_workers"]),
        ("workers hit (kill / stop / cut)", s["kills"]), ("worker restarts", s["worker_restarts"]),
        ("engines failed and replaced in place", s["engine_restarts"]),
        ("TTFT p50 / p99 / max ms", f"{s['ttft_p50_ms']} / {s['ttft_p99_ms']} / "
                                    f"{s['ttft_max_ms']}"),
        ("TTFT p50 of migrated streams ms", s["ttft_p50_migrated_ms"]),
        ("end-to-end p50 / p99 ms", f"{s['e2e_p50_ms']} / {s['e2e_p99_ms']}"),
        ("longest stall per stream p99 / max ms", f"{s['max_stall_p99_ms']} / "
                                                  f"{s['max_stall_max_ms']}"),
        ("load seconds", s["load_seconds"]), ("completed req/s", s["req_per_s"]),
    ]
    if s.get("unread_streams_open_at_end") is not None:
        rows.append(("unread slow-client streams still open at the end",
                     s["unread_streams_open_at_end"]))
        rows.append(("bytes the frontend holds for them (Send-Q)",
                     s["bytes_waiting_for_slow_readers"]))
    if s["kills_skipped"]:
        rows.append(("kills skipped (< 2 workers up)", s["kills_skipped"]))
    if s["other_restarts"]:
        rows.append(("non-worker restarts", s["other_restarts"]))
    width = max(len(k) for k, _ in rows)
    print(f"\n{'metric':<{width}}  value\n{'-' * width}  -----")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for r in result["lost"][:20]:
        what = r["error"] or "; ".join(r["problems"])
        print(f"LOST request {r['index']} at {r['start']:.2f}s (workers {r['worker_ids']}): "
              f"{what}")
    if result["leftover_pids"]:
        print(f"LEFTOVER processes: {result['leftover_pids']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--max-seconds", type=float, default=300.0,
                   help="no new request after this many seconds of load")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--router", default="kv", choices=["kv", "latency", "round-robin", "random",
                                                      "least-loaded"])
    p.add_argument("--scenario", default="kill", choices=["kill", "stop", "partition",
                                                          "fault-raise", "fault-hang",
                                                          "slow-clients"])
    p.add_argument("--kill-interval-s", type=float, default=3.0,
                   help="kill / stop / partition: how often a worker is hit")
    p.add_argument("--pause-s", type=float, default=6.0,
                   help="stop / partition: how long a worker stays frozen or cut off")
    p.add_argument("--fault-after-steps", type=int, default=1500,
                   help="fault-*: each engine faults at this step (~9 s at speedup 1)")
    p.add_argument("--step-timeout-s", type=float, default=2.0,
                   help="fault-hang: the step watchdog's limit")
    p.add_argument("--slow-clients", type=int, default=4)
    p.add_argument("--slow-tokens", type=int, default=20000,
                   help="slow-clients: max_tokens of each unread stream")
    p.add_argument("--first-token-timeout-s", type=float, default=5.0)
    p.add_argument("--inter-token-timeout-s", type=float, default=2.0)
    p.add_argument("--speedup-ratio", type=float, default=1.0)
    p.add_argument("--min-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--prefix-words", type=int, default=64,
                   help="length of the 8 shared prompt prefixes")
    p.add_argument("--lease-ttl-s", type=float, default=3.0)
    p.add_argument("--migration-limit", type=int, default=3)
    p.add_argument("--backoff-max-s", type=float, default=2.0,
                   help="supervisor restart backoff cap")
    p.add_argument("--request-timeout-s", type=float, default=60.0)
    p.add_argument("--model", default="baton-tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logs", default=None, help="run directory (default: a new temp dir)")
    p.add_argument("--out", default="bench-results/chaos.json")
    p.add_argument("-v", "--verbose", action="store_true", help="print supervisor events")
    args = p.parse_args(argv)

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is in the project venv
        result = asyncio.run(run(args))
    else:
        result = uvloop.run(run(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    _print(result)
    print(f"\nJSON: {out}; logs: {result['run_dir']}")
    return 1 if result["summary"]["lost"] or result["leftover_pids"] else 0


if __name__ == "__main__":
    sys.exit(main())
