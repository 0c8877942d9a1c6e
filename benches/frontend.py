"""Frontend throughput and added latency: Baton vs NVIDIA Dynamo, same machine, same run.

What is measured
    Requests/s, output tokens/s, client-side TTFT and inter-token latency (ITL) of streaming
    chat completions sent through each stack's OpenAI-compatible frontend to two simulated
    workers that add no delay (Baton ``--speedup-ratio 0``; Dynamo's mocker with
    ``--speedup-ratio 1e6``, because in 1.6.1 its "0" behaves like 1). With no simulated
    engine time, the TTFT and ITL the client sees ARE the latency the serving stack adds
    (HTTP, preprocessing, routing, transport, detokenisation, SSE) plus CPU contention.

How
    * One tiny WordLevel model folder (1 word = 1 token, see ``_model.py``) is written to a
      temp dir and served by both stacks under the name ``tiny``.
    * Baton: ``baton serve --workers 2 --speedup-ratio 0 --block-size 16`` (one process).
      Dynamo (only when ``--dynamo-python`` / ``BATON_DYNAMO_PYTHON`` points at a python
      with ai-dynamo installed): ZMQ broker + ``dynamo.frontend --router-mode round-robin``
      + 2 ``dynamo.mocker --block-size 16``, file discovery, TCP request plane, everything
      on 127.0.0.1. Both stacks stay up for the whole run; runs are interleaved (order
      alternates) so machine noise hits both.
    * Load: ``_load.py`` in a separate process, closed loop at each concurrency, 64-word
      prompts, ``max_tokens`` 8, ``ignore_eos``; warm-up discarded, then a window bounded
      by time and request count.
    * Server CPU: utime+stime of every server process (and descendants) between the
      client's ``warm`` and ``stop`` marks, divided by requests completed in the window.
    * Each (stack, concurrency) runs ``--repeats`` times; the median of each metric is
      reported, with Baton/Dynamo ratios.

    python benches/frontend.py --dynamo-python $DYNAMO_VENV/bin/python
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _model import build_model  # noqa: E402
from _procs import (  # noqa: E402
    cpu_seconds,
    free_low_port,
    free_port,
    http_get,
    json_or_none,
    stop,
    wait_until,
)

MODEL_NAME = "tiny"


class Stack:
    """A running server graph: its processes, its base URL, the PIDs whose CPU counts."""

    name = "?"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []
        self.url = ""

    def _spawn(self, cmd: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
        out = open(self.workdir / log, "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        stop(list(reversed(self.procs)))


class BatonStack(Stack):
    name = "baton"

    def __init__(self, workdir: Path, baton_cmd: list[str], model_dir: Path,
                 extra_args: list[str]) -> None:
        super().__init__(workdir)
        self.cmd = baton_cmd
        self.model_dir = model_dir
        self.extra_args = extra_args

    def start(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._spawn([*self.cmd, "serve", "--host", "127.0.0.1", "--port", str(port),
                     "--model", str(self.model_dir), "--model-name", MODEL_NAME,
                     "--workers", "2", "--speedup-ratio", "0", "--block-size", "16",
                     "--router", "round-robin",  # as Dynamo's side; --baton-args may override
                     *self.extra_args],
                    "baton.log")
        log = self.workdir / "baton.log"
        wait_until(lambda: "http://" in log.read_text(errors="replace")
                   and http_get(self.url + "/health")[0] == 200,
                   60, "baton serve", self.procs)


class DynamoStack(Stack):
    name = "dynamo"

    def __init__(self, workdir: Path, python: str, model_dir: Path) -> None:
        super().__init__(workdir)
        self.python = python
        self.model_dir = model_dir

    def _env(self, xsub: int) -> dict:
        env = dict(os.environ)
        env.update({
            "DYN_FILE_KV": str(self.workdir / "kv"),
            "DYN_TCP_RPC_HOST": "127.0.0.1", "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
            "DYN_EVENT_PLANE_HOST": "127.0.0.1", "DYN_SYSTEM_HOST": "127.0.0.1",
            "DYN_HTTP_RPC_HOST": "127.0.0.1",
            "DYN_ZMQ_BROKER_URL": f"xsub=tcp://127.0.0.1:{xsub} , xpub=tcp://127.0.0.1:{xsub + 1}",
            "DYN_LOG": "warn", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        })
        return env

    def _free_pair(self) -> int:
        for _ in range(50):
            p = free_port()
            if p < 65535 and _port_free(p + 1):
                return p
        raise RuntimeError("no two adjacent free ports")

    def start(self) -> None:
        xsub, port = self._free_pair(), free_port()
        env = self._env(xsub)
        self.url = f"http://127.0.0.1:{port}"
        common = ["--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq"]
        self._spawn([self.python, str(HERE / "_zmq_broker.py"), str(xsub), str(xsub + 1)],
                    "broker.log", env)
        self._spawn([self.python, "-m", "dynamo.frontend", "--http-host", "127.0.0.1",
                     "--http-port", str(port), *common, "--router-mode", "round-robin"],
                    "frontend.log", env)
        for i in range(2):
            wenv = dict(env, DYN_SYSTEM_PORT=str(free_low_port()))
            self._spawn([self.python, "-m", "dynamo.mocker", "--model-path", str(self.model_dir),
                         "--model-name", MODEL_NAME, *common, "--speedup-ratio", "1000000",
                         "--block-size", "16"], f"mocker{i}.log", wenv)
        wait_until(self._ready, 120, "dynamo stack", self.procs)

    def _ready(self) -> bool:
        status, raw = http_get(self.url + "/v1/models")
        models = json_or_none(raw) if status == 200 else None
        if not models or not any(m.get("id") == MODEL_NAME for m in models.get("data", [])):
            return False
        health = json_or_none(http_get(self.url + "/health")[1]) or {}
        ids = {i.get("instance_id") for i in health.get("instances", [])
               if i.get("endpoint") == "generate"}
        return len(ids) >= 2


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def dynamo_available(python: str | None) -> str | None:
    """The ai-dynamo version importable by ``python``, or None (with a printed note)."""
    if not python:
        print("note: no --dynamo-python / BATON_DYNAMO_PYTHON given: Dynamo side skipped")
        return None
    code = ("import importlib.metadata as m, dynamo.frontend, dynamo.mocker;"
            "print(m.version('ai-dynamo'))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True,
                             timeout=120, check=False)
    except OSError as exc:
        print(f"note: cannot run {python}: {exc}; Dynamo side skipped")
        return None
    if out.returncode != 0:
        print(f"note: ai-dynamo not importable by {python}; Dynamo side skipped")
        return None
    return out.stdout.strip()


def run_load(stack: Stack, conc: int, args: argparse.Namespace, idle: list[Stack]) -> dict:
    """One closed-loop run against ``stack``; adds server CPU per request to the summary."""
    cmd = [sys.executable, str(HERE / "_load.py"), "--url", stack.url, "--model", MODEL_NAME,
           "--concurrency", str(conc), "--warmup", str(args.warmup),
           "--duration", str(args.duration), "--max-requests", str(args.max_requests),
           "--prompt-words", str(args.prompt_words), "--max-tokens", str(args.max_tokens)]
    if args.fresh_connections:
        cmd.append("--fresh-connections")
    client = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    marks: dict[str, tuple[float, float, float]] = {}
    result = None
    try:
        for line in client.stdout:
            line = line.strip()
            if line in ("warm", "stop"):
                idle_cpu = sum(cpu_seconds(s.pids) for s in idle)
                marks[line] = (time.monotonic(), cpu_seconds(stack.pids), idle_cpu)
            elif line.startswith("{"):
                result = json.loads(line)
        client.wait(timeout=args.warmup + args.duration + 120)
    finally:
        stop([client], grace=5)
    if result is None or set(marks) != {"warm", "stop"}:
        raise RuntimeError(f"load generator failed (rc={client.returncode})")
    wall = marks["stop"][0] - marks["warm"][0]
    server_cpu = marks["stop"][1] - marks["warm"][1]
    n = max(1, result["completed_in_window"])
    result.update(server_cpu_s=round(server_cpu, 3),
                  server_cpu_ms_per_req=round(server_cpu * 1000 / n, 3),
                  server_cores=round(server_cpu / wall, 2),
                  idle_stack_cpu_s=round(marks["stop"][2] - marks["warm"][2], 3))
    return result


METRICS = {  # name -> path into a run summary
    "req_per_s": ("req_per_s",), "out_tok_per_s": ("out_tok_per_s",),
    "ttft_p50": ("ttft_ms", "p50"), "ttft_p90": ("ttft_ms", "p90"), "ttft_p99": ("ttft_ms", "p99"),
    "itl_p50": ("itl_ms", "p50"), "itl_p99": ("itl_ms", "p99"),
    "e2e_p50": ("e2e_ms", "p50"), "errors": ("errors",),
    "cpu_ms_per_req": ("server_cpu_ms_per_req",), "server_cores": ("server_cores",),
    "client_cpu_s": ("client_cpu_s",), "idle_stack_cpu_s": ("idle_stack_cpu_s",),
}


def _get(run: dict, path: tuple[str, ...]):
    for key in path:
        run = run.get(key) if isinstance(run, dict) else None
    return run


def medians(runs: list[dict]) -> dict:
    out = {}
    for name, path in METRICS.items():
        vals = [v for v in (_get(r, path) for r in runs) if v is not None]
        out[name] = round(statistics.median(vals), 3) if vals else None
    out["req_per_s_runs"] = [r["req_per_s"] for r in runs]
    out["errors"] = sum(r["errors"] for r in runs)
    return out


def _fmt(v, nd=1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def table(summary: dict) -> str:
    rows = [("| stack | conc | req/s (median; runs) | out tok/s | TTFT p50 / p90 / p99 ms "
            "| ITL p50 / p99 ms | E2E p50 ms | errors | server CPU ms/req | server cores |"),
            "|---|---|---|---|---|---|---|---|---|---|"]
    for key, m in summary.items():
        stack, conc = key.split("@")
        runs = " / ".join(_fmt(v, 0) for v in m["req_per_s_runs"])
        rows.append(
            f"| {stack} | {conc} | **{_fmt(m['req_per_s'], 0)}** ({runs}) "
            f"| {_fmt(m['out_tok_per_s'], 0)} "
            f"| {_fmt(m['ttft_p50'], 2)} / {_fmt(m['ttft_p90'], 2)} / {_fmt(m['ttft_p99'], 2)} "
            f"| {_fmt(m['itl_p50'], 3)} / {_fmt(m['itl_p99'], 3)} | {_fmt(m['e2e_p50'], 2)} "
            f"| {m['errors']} "
            f"| {_fmt(m['cpu_ms_per_req'], 2)} | {_fmt(m['server_cores'], 2)} |")
    return "\n".join(rows)


def ratios(summary: dict, concs: list[int]) -> tuple[str, dict]:
    rows = [("| conc | req/s Baton/Dynamo (higher is better) | TTFT p50 Baton/Dynamo "
            "| ITL p50 Baton/Dynamo | E2E p50 Baton/Dynamo (lower is better) "
            "| CPU ms/req Baton/Dynamo |"),
            "|---|---|---|---|---|---|"]
    data = {}
    for c in concs:
        b, d = summary.get(f"baton@{c}"), summary.get(f"dynamo@{c}")
        if not b or not d:
            continue
        r = {k: (b[k] / d[k] if b[k] and d[k] else None)
             for k in ("req_per_s", "ttft_p50", "itl_p50", "e2e_p50", "cpu_ms_per_req")}
        data[c] = {k: None if v is None else round(v, 3) for k, v in r.items()}
        rows.append(f"| {c} | **{_fmt(r['req_per_s'], 2)}** | {_fmt(r['ttft_p50'], 2)} "
                    f"| {_fmt(r['itl_p50'], 2)} | {_fmt(r['e2e_p50'], 2)} | {_fmt(r['cpu_ms_per_req'], 2)} |")
    return "\n".join(rows), data


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "kernel": platform.release(),
            "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg()}


def git_state() -> dict:
    """Commit and number of locally modified files of the checkout (read-only git calls)."""
    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(HERE.parent), *a], capture_output=True, text=True,
                           check=False)
        return r.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"),
            "modified_files": len(git("status", "--porcelain", "-uno").splitlines())}


def run_all(stacks: list[Stack], args: argparse.Namespace, concs: list[int]) -> dict:
    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeats):
        for ci, conc in enumerate(concs):
            order = stacks if (rep + ci) % 2 == 0 else list(reversed(stacks))
            for stack in order:
                idle = [s for s in stacks if s is not stack]
                res = run_load(stack, conc, args, idle)
                runs.setdefault(f"{stack.name}@{conc}", []).append(res)
                print(f"[{rep + 1}/{args.repeats}] {stack.name:6s} c={conc:<4d} "
                      f"{res['req_per_s']:8.1f} req/s  TTFT p50 {res['ttft_ms']['p50']} ms  "
                      f"ITL p50 {res['itl_ms']['p50']} ms  err {res['errors']}  "
                      f"cpu {res['server_cpu_ms_per_req']} ms/req", flush=True)
    return runs


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Baton vs Dynamo frontend throughput / added latency")
    p.add_argument("--concurrency", default="1,32,128")
    p.add_argument("--duration", type=float, default=12.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="discarded seconds per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-requests", type=int, default=30000, help="cap per run (incl. warm-up)")
    p.add_argument("--prompt-words", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--dynamo-python", default=os.environ.get("BATON_DYNAMO_PYTHON"),
                   help="python of a venv with ai-dynamo (env BATON_DYNAMO_PYTHON)")
    p.add_argument("--baton-cmd", default=str(Path(sys.executable).parent / "baton"),
                   help="baton executable (default: next to this python)")
    p.add_argument("--baton-args", default="",
                   help="extra flags for baton serve, e.g. '--http-server granian'")
    p.add_argument("--fresh-connections", action="store_true",
                   help="client opens a new connection per request (default: keep-alive)")
    p.add_argument("--only", choices=["baton", "dynamo"], default=None)
    p.add_argument("--out", default=None, help="JSON result file (default bench-results/...)")
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with server logs")
    return p.parse_args()


def build_stacks(args: argparse.Namespace, work: Path, model: Path) -> tuple[list[Stack], str | None]:
    stacks: list[Stack] = []
    if args.only != "dynamo":
        (work / "baton").mkdir()
        stacks.append(BatonStack(work / "baton", [args.baton_cmd], model, args.baton_args.split()))
    version = None
    if args.only != "baton":
        version = dynamo_available(args.dynamo_python)
        if version:
            (work / "dynamo").mkdir()
            stacks.append(DynamoStack(work / "dynamo", args.dynamo_python, model))
    return stacks, version


def report(args, concs, runs, version, started) -> dict:
    summary = {k: medians(v) for k, v in runs.items()}
    summary = dict(sorted(summary.items(), key=lambda kv: (int(kv[0].split("@")[1]), kv[0])))
    rtable, rdata = ratios(summary, concs)
    print("\n" + table(summary))
    if rdata:
        print("\n" + rtable)
    return {"date_utc": started, "machine": machine(), "args": vars(args),
            "dynamo_version": version,
            "git": git_state(), "summary": summary, "ratios": rdata, "runs": runs}


def main() -> None:
    args = parse_args()
    concs = [int(c) for c in args.concurrency.split(",")]
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    work = Path(tempfile.mkdtemp(prefix="baton-bench-"))
    stacks: list[Stack] = []
    try:
        model = build_model(work / "model")
        stacks, version = build_stacks(args, work, model)
        for s in stacks:
            t = time.monotonic()
            s.start()
            print(f"{s.name} up at {s.url} in {time.monotonic() - t:.1f} s (pids {s.pids})")
        runs = run_all(stacks, args, concs)
    finally:
        for s in stacks:
            s.stop()
        if args.keep_logs:
            print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result = report(args, concs, runs, version, started)
    out = Path(args.out or f"bench-results/frontend-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
