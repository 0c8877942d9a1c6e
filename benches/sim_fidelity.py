"""Does ``baton sim`` agree with live serving? Mean TTFT and mean ITL, sim vs live, per config.

What is compared
    The same scaled-down Mooncake trace is (a) simulated with ``baton sim`` and (b) replayed
    with ``baton bench`` against ``baton serve --engine mock`` (the simulated engine, real time
    with ``--speedup-ratio 1``), with identical engine settings on both sides (block size 16,
    16384 blocks per worker, max_num_seqs 256, max_num_batched_tokens 8192) and the same
    trace block size (512). Results: docs/sim-fidelity.md.

How
    * Trace: the first ``--requests`` requests of ``--source``, each prompt truncated to
      ``--max-isl`` tokens (``hash_ids`` cut to ``ceil(isl / 512)``), so every request fits
      baton-tiny's 32768-token context and client-side prompt synthesis stays cheap.
      Arrival times are kept; output lengths are kept.
    * Config ``W:ROUTER:A:S``: W workers, router, arrival speedup A, engine speedup S. The
      live side runs ``baton serve --speedup-ratio S`` and ``baton bench --arrival-speedup A*S``; the
      sim runs ``--arrival-speedup A*S --step-time-scale 1/S,...``: the same time-compressed
      experiment, so latencies compare directly (and every modelled duration is S times
      shorter, while the live stack's CPU per step is not).
    * Each live run gets a fresh server (empty caches, as the sim starts), on 127.0.0.1; the
      server's CPU (utime+stime of its process tree) and the bench client's are recorded.
    * Variants of the live server: ``plain`` (``baton serve`` as shipped; ``--repeats`` runs),
      ``instrumented`` (the same, with timing hooks on every engine step, written to
      ``steps-*.json``; used to measure the per-step overhead and to fit a sim with that
      overhead added), ``unanchored`` (the simulated executor before its step deadlines: a
      step sleeps ``now + step time`` instead of ``previous deadline + step time``, so the
      shell's CPU between steps adds to every step; the behaviour docs/sim-fidelity.md
      measured first) and ``noyield`` (``unanchored``, and the engine loop never yields
      explicitly between steps). Patched servers run through this file's ``_serve`` mode.
    * ``--burners N`` runs N busy-loop processes beside each live run (controlled CPU
      contention on top of whatever else the machine is doing; ``other_cores`` records it).

    .venv/bin/python benches/sim_fidelity.py --source $TRACE            # 4 configs, ~35 min
    .venv/bin/python benches/sim_fidelity.py --source $TRACE --configs rr2 --variants plain
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _procs import cpu_seconds, free_port, http_get, stop, wait_until  # noqa: E402

BATON = [sys.executable, "-m", "baton"]
MODEL = "baton-tiny"
TRACE_BLOCK = 512


@dataclass(frozen=True)
class Config:
    name: str
    workers: int
    router: str
    arrival_speedup: float
    engine_speedup: float

    @property
    def bench_speedup(self) -> float:
        return self.arrival_speedup * self.engine_speedup


CONFIGS = {
    "rr2": "2:round-robin:1:1",
    "kv2": "2:kv:1:1",
    "kv4": "4:kv:2:1",
    "kv2-s2": "2:kv:1:2",
}


def parse_config(name: str) -> Config:
    spec = CONFIGS.get(name, name)
    w, router, a, s = spec.split(":")
    return Config(name.replace(":", "_"), int(w), router, float(a), float(s))


# ---------------------------------------------------------------------------- trace


def make_trace(source: Path, out: Path, num: int, max_isl: int) -> Path:
    """The first ``num`` requests of ``source`` with prompts cut to ``max_isl`` tokens."""
    rows = []
    with open(source) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == num:
                break
    with open(out, "w") as f:
        for r in rows:
            isl = min(r["input_length"], max_isl)
            f.write(json.dumps({"timestamp": r["timestamp"], "input_length": isl,
                                "output_length": r["output_length"],
                                "hash_ids": r["hash_ids"][:math.ceil(isl / TRACE_BLOCK)]}) + "\n")
    return out


# ---------------------------------------------------------------------------- commands


def engine_args(a: argparse.Namespace) -> list[str]:
    return ["--block-size", str(a.block_size), "--num-blocks", str(a.num_blocks),
            "--max-num-seqs", str(a.max_num_seqs),
            "--max-num-batched-tokens", str(a.max_num_batched_tokens),
            "--host-kv-blocks", str(a.host_kv_blocks),
            "--shared-kv-blocks", str(a.shared_kv_blocks),
            *(["--host-kv-write-through"] if a.host_kv_write_through else []),
            *(["--no-recompute-slow-tiers"] if a.no_recompute_slow_tiers else []),
            "--kv-bytes-per-token", str(a.kv_bytes_per_token)]


def sim_cmd(cfg: Config, a: argparse.Namespace, trace: Path, out: Path) -> list[str]:
    scale = ",".join([f"{1 / cfg.engine_speedup:g}"] * cfg.workers)
    return [*BATON, "sim", "--trace", str(trace), "--workers", str(cfg.workers),
            "--router", cfg.router, *engine_args(a), "--trace-block-size", str(TRACE_BLOCK),
            "--arrival-speedup", f"{cfg.bench_speedup:g}", "--step-time-scale", scale,
            "--out", str(out)]


def serve_args(cfg: Config, a: argparse.Namespace, port: int) -> list[str]:
    shared = (["--shared-kv-dir", tempfile.mkdtemp(prefix="baton-shared-kv-")]
              if a.shared_kv_blocks else [])  # a fresh store per server
    return ["serve", "--host", "127.0.0.1", "--port", str(port), "--model", MODEL,
            "--workers", str(cfg.workers), "--router", cfg.router,
            "--speedup-ratio", f"{cfg.engine_speedup:g}", *engine_args(a), *shared]


def server_cmd(cfg: Config, a: argparse.Namespace, port: int, variant: str,
               steps: Path) -> list[str]:
    if variant == "plain":
        return [*BATON, *serve_args(cfg, a, port)]
    hooks = ["--steps", str(steps)] + {"unanchored": ["--unanchored"],
                                       "noyield": ["--unanchored", "--no-yield"]}.get(variant, [])
    return [sys.executable, str(Path(__file__).resolve()), "_serve", *hooks, "--",
            *serve_args(cfg, a, port)]


def bench_cmd(cfg: Config, url: str, trace: Path, out: Path) -> list[str]:
    return [*BATON, "bench", "--url", url, "--model", MODEL, "--trace", str(trace),
            "--trace-block-size", str(TRACE_BLOCK), "--arrival-speedup",
            f"{cfg.bench_speedup:g}", "--out", str(out), "--no-progress"]


# ---------------------------------------------------------------------------- runs


def run_sim(cfg: Config, a: argparse.Namespace, trace: Path, out: Path) -> None:
    cmd = sim_cmd(cfg, a, trace, out)
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def machine_busy_s() -> float:
    """CPU seconds every process on the machine has used (``/proc/stat``, all CPUs)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def run_live(cfg: Config, a: argparse.Namespace, trace: Path, out: Path, variant: str) -> dict:
    """One fresh server, one bench run against it; returns CPU and wall accounting, with
    ``other_cores``: what the rest of the (shared) machine used meanwhile."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    steps = out.with_name(f"steps-{out.name}.json")
    procs: list[subprocess.Popen] = []
    with open(out.with_name(f"serve-{out.name}.log"), "wb") as log:
        try:
            for _ in range(a.burners):  # controlled CPU contention
                procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
            server = subprocess.Popen(server_cmd(cfg, a, port, variant, steps), cwd=ROOT,
                                      stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
            procs.append(server)
            wait_until(lambda: http_get(url + "/health")[0] == 200, 60, "baton serve", [server])
            cpu0, busy0, t0 = cpu_seconds([server.pid]), machine_busy_s(), time.monotonic()
            cmd = bench_cmd(cfg, url, trace, out)
            print("$", " ".join(cmd[2:]), flush=True)
            bench = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
            procs.append(bench)
            _, status, usage = os.wait4(bench.pid, 0)
            bench.returncode = os.waitstatus_to_exitcode(status)
            wall, busy = time.monotonic() - t0, machine_busy_s() - busy0
            server_cpu = cpu_seconds([server.pid]) - cpu0
        finally:
            stop(list(reversed(procs)))
    if bench.returncode != 0:
        raise RuntimeError(f"baton bench exited with {bench.returncode}")
    bench_cpu = usage.ru_utime + usage.ru_stime
    return {"wall_s": round(wall, 2), "server_cpu_s": round(server_cpu, 2),
            "server_cores": round(server_cpu / wall, 3), "bench_cpu_s": round(bench_cpu, 2),
            "other_cores": round(max(0.0, busy - server_cpu - bench_cpu) / wall, 2),
            "steps": str(steps) if variant != "plain" else None}


# ---------------------------------------------------------------------------- analysis


def summary_of(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def key_metrics(folder: Path) -> dict:
    data = summary_of(folder)
    s, recs = data["summary"], data["records"]
    ok = [r for r in recs if r["ok"]]
    lag = [r["sent_at_s"] - r["scheduled_at_s"] for r in ok]
    from_arrival = [r["first_token_at_s"] - r["scheduled_at_s"] for r in ok
                    if r["first_token_at_s"] is not None]
    return {"ttft_avg": s["ttft_ms"]["avg"], "ttft_p50": s["ttft_ms"]["p50"],
            "ttft_p90": s["ttft_ms"]["p90"], "itl_avg": s["itl_ms"]["avg"],
            "itl_p50": s["itl_ms"]["p50"], "tpot_avg": s["tpot_ms"]["avg"],
            "req_per_s": s["request_throughput"], "out_tok_per_s": s["output_token_throughput"],
            "cache_hit": s["cache_hit_rate"], "errors": s["num_errors"],
            "send_lag_ms": 1000 * statistics.fmean(lag) if lag else 0.0,
            "ttft_from_arrival_avg": 1000 * statistics.fmean(from_arrival)}


def step_overhead(path: Path, speedup: float = 1.0) -> dict:
    """Per-step wall time beyond the modelled step time (``/ speedup``), from an instrumented
    server's hooks, over steps followed at once by another step of the same engine; with a
    least-squares fit ``overhead_ms = c0 + c1 * decode requests + c2 * prefill ktokens``
    (wall ms)."""
    import numpy as np

    by: dict[int, list] = {}
    for r in json.loads(path.read_text()):
        by.setdefault(r[0], []).append(r)
    rows = []
    for recs in by.values():
        recs.sort(key=lambda r: r[1])
        for a, b in itertools.pairwise(recs):
            if a[8]:  # the engine had work left: the next step started without idling
                model_s = a[4] / 1000 / speedup
                rows.append((b[1] - a[1] - model_s, model_s, a[6], a[5],
                             a[2] - a[1] - model_s, a[3] - a[2], b[1] - a[3]))
    m = np.array(rows)
    x = np.column_stack([np.ones(len(m)), m[:, 2], m[:, 3] / 1000])
    coef = np.linalg.lstsq(x, m[:, 0] * 1000, rcond=None)[0]
    over, model, ndec = m[:, 0], m[:, 1], m[:, 2]
    return {"steps": len(m), "model_ms": float(1000 * model.mean()),
            "overhead_ms": float(1000 * over.mean()),
            "overhead_pct": float(100 * over.sum() / model.sum()),
            "per_decode_token_ms": float(1000 * (over * ndec).sum() / ndec.sum()),
            "in_execute_ms": float(1000 * m[:, 4].mean()),
            "finish_step_ms": float(1000 * m[:, 5].mean()),
            "between_steps_ms": float(1000 * m[:, 6].mean()),
            "fit": [round(float(c), 4) for c in coef]}


def sim_with_overhead(cfg: Config, a: argparse.Namespace, trace: Path, out: Path,
                      fit: list[float]) -> None:
    """``baton sim``'s model plus the fitted live per-step overhead, via the Python API."""
    from baton.config import PoolsConfig, RouterConfig, SchedulerConfig, TimingConfig
    from baton.engine.timing import PolynomialTiming
    from baton.sim import SimConfig
    from baton.sim import run_sim as api_run_sim

    base = PolynomialTiming()
    c0, c1, c2 = fit

    class Overhead:
        def step_ms(self, t: int, nd: int, used: int, total: int) -> float:
            # the fit is in wall ms at this engine speedup: modelled ms are S times longer
            extra = (c0 + c1 * nd + c2 * t / 1000) * cfg.engine_speedup
            return base.step_ms(t, nd, used, total) + extra

    config = SimConfig(
        pools=PoolsConfig(num_workers=cfg.workers), router=RouterConfig(mode=cfg.router),
        timing_model=Overhead(),
        timing=TimingConfig(kv_bytes_per_token=a.kv_bytes_per_token,
                            recompute_slow_tiers=not a.no_recompute_slow_tiers),
        scheduler=SchedulerConfig(num_blocks=a.num_blocks, block_size=a.block_size,
                                  max_num_seqs=a.max_num_seqs,
                                  max_num_batched_tokens=a.max_num_batched_tokens,
                                  host_kv_blocks=a.host_kv_blocks,
                                  shared_kv_blocks=a.shared_kv_blocks,
                                  host_kv_write_through=a.host_kv_write_through),
        arrival_speedup=cfg.bench_speedup, trace_block_size=TRACE_BLOCK,
        step_time_scale=(1 / cfg.engine_speedup,) * cfg.workers,
    )
    api_run_sim(trace, config, out, quiet=True)


def pct(live: float, sim: float) -> float:
    return 100 * (live - sim) / sim


def table(results: dict) -> str:
    """Markdown: one row per run, with the live runs' differences from the sim in %."""
    lines = ["| config | run | TTFT mean | TTFT p50 | TTFT p90 | ITL mean | ITL p50 | req/s "
             "| out tok/s | Δ TTFT mean | Δ TTFT from arrival | Δ ITL mean | Δ req/s "
             "| send lag ms | server cores | other cores |",
             "|" + "---|" * 16]
    for name, res in results.items():
        sim = res["runs"]["sim"]
        for run, m in res["runs"].items():
            deltas = ["", "", "", ""] if run == "sim" else [
                f"{pct(m[k], sim[k2]):+.1f}%" for k, k2 in (
                    ("ttft_avg", "ttft_avg"), ("ttft_from_arrival_avg", "ttft_avg"),
                    ("itl_avg", "itl_avg"), ("req_per_s", "req_per_s"))]
            cells = [name, run, f"{m['ttft_avg']:.1f}", f"{m['ttft_p50']:.1f}",
                     f"{m['ttft_p90']:.1f}", f"{m['itl_avg']:.2f}", f"{m['itl_p50']:.2f}",
                     f"{m['req_per_s']:.3f}", f"{m['out_tok_per_s']:.0f}", *deltas,
                     "" if run.startswith("sim") else f"{m['send_lag_ms']:.1f}",
                     str(m.get("server_cores", "")), str(m.get("other_cores", ""))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- driver


def run_config(cfg: Config, a: argparse.Namespace, trace: Path, out: Path) -> dict:
    runs: dict[str, dict] = {}
    sim_dir = out / f"{cfg.name}-sim"
    run_sim(cfg, a, trace, sim_dir)
    runs["sim"] = key_metrics(sim_dir)
    overhead = None
    failed: dict[str, str] = {}
    rounds = max(a.repeats, a.patched_repeats if set(a.variants) - {"plain"} else 0)
    for rep in range(1, rounds + 1):  # variants interleaved: machine noise hits all alike
        for variant in a.variants:
            if rep > (a.repeats if variant == "plain" else a.patched_repeats):
                continue
            run_dir = out / f"{cfg.name}-{variant}-{rep}"
            try:
                acct = run_live(cfg, a, trace, run_dir, variant)
                m = runs[f"{variant}-{rep}"] = {**key_metrics(run_dir), **acct}
            except (RuntimeError, TimeoutError, KeyError, TypeError) as exc:
                failed[f"{variant}-{rep}"] = str(exc)
                print(f"  {cfg.name} {variant}-{rep}: FAILED: {exc}", flush=True)
                continue
            print(f"  {cfg.name} {variant}-{rep}: TTFT {m['ttft_avg']:.1f} ms "
                  f"({pct(m['ttft_avg'], runs['sim']['ttft_avg']):+.1f}%), ITL "
                  f"{m['itl_avg']:.2f} ms ({pct(m['itl_avg'], runs['sim']['itl_avg']):+.1f}%), "
                  f"server {acct['server_cores']} cores, others {acct['other_cores']} cores",
                  flush=True)
            if variant == "instrumented" and overhead is None:
                overhead = step_overhead(Path(acct["steps"]), cfg.engine_speedup)
    if overhead is not None:
        fit_dir = out / f"{cfg.name}-sim-overhead"
        sim_with_overhead(cfg, a, trace, fit_dir, overhead["fit"])
        runs["sim+overhead"] = key_metrics(fit_dir)
    folders = [str(out / f"{cfg.name}-sim")] + [str(out / f"{cfg.name}-{r}") for r in runs
                                                 if r not in ("sim", "sim+overhead")]
    compare = subprocess.run([*BATON, "bench", "compare", *folders], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
    print(compare, flush=True)
    return {"config": cfg.__dict__, "runs": runs, "failed": failed, "step_overhead": overhead,
            "compare": compare}


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "loadavg_at_start": os.getloadavg()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", type=Path, required=True,
                   help="the Mooncake conversation_trace.jsonl (its first --requests are used)")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--max-isl", type=int, default=8192)
    p.add_argument("--configs", default="rr2,kv2,kv4,kv2-s2",
                   help=f"names ({', '.join(f'{k}={v}' for k, v in CONFIGS.items())}) or "
                        "W:ROUTER:ARRIVAL_SPEEDUP:ENGINE_SPEEDUP specs, comma-separated")
    p.add_argument("--variants", default="plain,unanchored",
                   type=lambda s: [v for v in s.split(",") if v])
    p.add_argument("--repeats", type=int, default=3, help="plain live runs per config")
    p.add_argument("--patched-repeats", type=int, default=1,
                   help="instrumented / unanchored / noyield live runs per config")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=16384)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--host-kv-blocks", type=int, default=0,
                   help="KV tiers: a host tier of this many blocks per worker on both sides")
    p.add_argument("--shared-kv-blocks", type=int, default=0,
                   help="KV tiers: each worker's share of a store the workers share (live: "
                        "files in a fresh directory per server)")
    p.add_argument("--host-kv-write-through", action="store_true",
                   help="KV tiers: copy blocks down when cached, on both sides")
    p.add_argument("--no-recompute-slow-tiers", action="store_true",
                   help="KV tiers: onboard every block found, however slow to read (both sides)")
    p.add_argument("--kv-bytes-per-token", type=int, default=131072,
                   help="modelled KV bytes per token on both sides (onboarding times)")
    p.add_argument("--burners", type=int, default=0,
                   help="busy-loop processes running beside each live run (CPU contention)")
    p.add_argument("--out", type=Path, default=ROOT / "bench-results" / "sim-fidelity")
    a = p.parse_args(argv)
    bad = set(a.variants) - {"plain", "instrumented", "unanchored", "noyield"}
    if bad:
        p.error(f"unknown variants {sorted(bad)}")
    return a


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        return serve_patched(sys.argv[2:])
    for sig in (signal.SIGTERM, signal.SIGINT):  # unwind, so the servers started are stopped
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    a = parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    trace = make_trace(a.source, a.out / "trace.jsonl", a.requests, a.max_isl)
    results = {"machine": machine(), "args": {k: str(v) for k, v in vars(a).items()},
               "configs": {}}
    for name in a.configs.split(","):
        cfg = parse_config(name)
        results["configs"][cfg.name] = run_config(cfg, a, trace, a.out)
        (a.out / "results.json").write_text(json.dumps(results, indent=2))
    md = table(results["configs"])
    (a.out / "table.md").write_text(md + "\n")
    print(md)
    return 0


# ---------------------------------------------------------------------------- patched server


def serve_patched(argv: list[str]) -> int:
    """``_serve --steps FILE [--unanchored] [--no-yield] -- <baton serve args>``: ``baton
    serve`` in this process with per-step timing hooks (and, with ``--unanchored``, steps
    timed from when they start; with ``--no-yield``, no explicit yield between steps)."""
    sep = argv.index("--")
    p = argparse.ArgumentParser(prog="sim_fidelity.py _serve")
    p.add_argument("--steps", type=Path, required=True)
    p.add_argument("--unanchored", action="store_true")
    p.add_argument("--no-yield", action="store_true")
    opts = p.parse_args(argv[:sep])
    install_hooks(opts.steps)
    if opts.unanchored:  # every step's deadline is now + its modelled time
        from baton.engine import mock

        mock.step_deadline = lambda _previous, delay, now: (now + delay, 0.0)
    if opts.no_yield:  # no explicit yield between steps: the step's own sleep is the yield
        from baton.engine import core

        core._BURST_S = math.inf
    from baton.cli import main as baton_main

    sys.argv = ["baton", *argv[sep + 1:]]
    return baton_main()


def install_hooks(path: Path) -> None:
    """Records, per engine step: (engine, execute start, execute end, _finish_step end,
    modelled ms, prefill tokens, decode requests, schedule() seconds, has_work after)."""
    import atexit

    from baton.engine import core, mock
    from baton.engine.scheduler import Scheduler

    clock = time.perf_counter
    steps: list[tuple] = []
    sched_s: dict[int, float] = {}
    atexit.register(lambda: path.write_text(json.dumps(steps)))

    original_schedule = Scheduler.schedule

    def schedule(self):  # type: ignore[no-untyped-def]
        t = clock()
        out = original_schedule(self)
        sched_s[id(self)] = clock() - t
        return out

    execute = mock.SimulatedExecutor.execute

    async def timed_execute(self, output, scheduler):  # type: ignore[no-untyped-def]
        t0, ms0 = clock(), self.simulated_ms
        sampled = await execute(self, output, scheduler)
        self._hook_last = (t0, clock(), self.simulated_ms - ms0, output.num_prefill_tokens,
                           output.num_decode_requests, sched_s.get(id(scheduler), 0.0))
        return sampled

    original_finish = core.EngineCore._finish_step

    def finish_step(self, output, sampled):  # type: ignore[no-untyped-def]
        original_finish(self, output, sampled)
        t0, t1, ms, npf, nd, st = self.executor._hook_last
        busy = self._scheduler.has_work
        steps.append((id(self), t0, t1, clock(), ms, npf, nd, st, busy))

    Scheduler.schedule = schedule
    mock.SimulatedExecutor.execute = timed_execute
    core.EngineCore._finish_step = finish_step


if __name__ == "__main__":
    sys.exit(main())
