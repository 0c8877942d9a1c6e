"""HTTP server stacks for an SSE-streaming frontend, measured on this machine with wrk.

Each server runs as its own process (one worker, uvloop) and serves two endpoints:
    GET /stream  16 ``data: {chat.completion.chunk}`` events (~250 B of JSON each, one
                 ``send``/``write`` per event, as a token stream would) + ``data: [DONE]``
    GET /plain   one small JSON object
Servers:
    uvicorn-raw        uvicorn (httptools) serving a raw ASGI app, started inside an existing
                       uvloop event loop (``uvicorn.Server.serve()``), as Baton's frontend is
    uvicorn-starlette  the same server with a starlette app (framework cost)
    granian            granian's ASGI interface, normal mode (1 worker process, uvloop)
    granian-embed      ``granian.server.embed.Server`` awaited inside an existing asyncio loop
    aiohttp            aiohttp.web (AppRunner + TCPSite inside an existing uvloop loop)
Load: ``wrk -t1 -c64 -d8s --latency`` (client and server share the 2 cores), rounds
interleaved across servers so noise spreads. Reports rps and p50/p99 latency from wrk plus
the server process's CPU per request.

    python benches/http_stack.py [--rounds 2] [--duration 8] [--servers a,b] [--out F]
    python benches/http_stack.py --serve uvicorn-raw --port 8000   # one server, by hand
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _procs import cpu_seconds, free_port, http_get, stop, wait_until  # noqa: E402

SERVERS = ["uvicorn-raw", "uvicorn-starlette", "granian", "granian-embed", "aiohttp"]

_CHUNK = {
    "id": "chatcmpl-0123456789abcdef0123456789abcdef", "object": "chat.completion.chunk",
    "created": 1795300000, "model": "tiny",
    "choices": [{"index": 0, "delta": {"content": " w1234"}, "logprobs": None,
                 "finish_reason": None}],
    "usage": None,
}
CHUNKS = [b"data: " + json.dumps(dict(_CHUNK, created=1795300000 + i)).encode() + b"\n\n"
          for i in range(16)]
DONE = b"data: [DONE]\n\n"
PLAIN = json.dumps({"object": "list", "data": [{"id": "tiny", "object": "model",
                                               "owned_by": "baton"}]}).encode()
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
JSON_HEADERS = [(b"content-type", b"application/json"),
                (b"content-length", str(len(PLAIN)).encode())]


# --------------------------------------------------------------------------- apps
async def raw_asgi(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            await send({"type": msg["type"] + ".complete"})
            if msg["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        for chunk in CHUNKS:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": DONE})
    else:
        await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
        await send({"type": "http.response.body", "body": PLAIN})


def starlette_app():
    from starlette.applications import Starlette
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    async def events():
        for chunk in CHUNKS:
            yield chunk
        yield DONE

    async def stream(request):
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    async def plain(request):
        return Response(PLAIN, media_type="application/json")

    return Starlette(routes=[Route("/stream", stream), Route("/plain", plain)])


# --------------------------------------------------------------------------- servers
async def _serve_uvicorn(app, port: int) -> None:
    import uvicorn

    cfg = uvicorn.Config(app, host="127.0.0.1", port=port, loop="none", http="httptools",
                         lifespan="off", access_log=False, log_level="warning")
    await uvicorn.Server(cfg).serve()


async def _serve_granian_embed(port: int) -> None:
    from granian.constants import Interfaces
    from granian.server.embed import Server

    server = Server(raw_asgi, address="127.0.0.1", port=port, interface=Interfaces.ASGINL,
                    log_level="warning")
    await server.serve()


async def _serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def stream(request):
        resp = web.StreamResponse(headers={"content-type": "text/event-stream",
                                           "cache-control": "no-cache"})
        await resp.prepare(request)
        for chunk in CHUNKS:
            await resp.write(chunk)
        await resp.write(DONE)
        await resp.write_eof()
        return resp

    async def plain(request):
        return web.Response(body=PLAIN, content_type="application/json")

    app = web.Application()
    app.router.add_get("/stream", stream)
    app.router.add_get("/plain", plain)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


def _serve_granian(port: int) -> None:
    from granian import Granian
    from granian.constants import Interfaces, Loops

    os.environ["PYTHONPATH"] = str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")
    Granian("http_stack:raw_asgi", address="127.0.0.1", port=port, interface=Interfaces.ASGINL,
            workers=1, loop=Loops.uvloop, log_level="warning").serve()


def serve(kind: str, port: int) -> None:
    import uvloop

    if kind == "granian":
        _serve_granian(port)
        return
    coro = {
        "uvicorn-raw": lambda: _serve_uvicorn(raw_asgi, port),
        "uvicorn-starlette": lambda: _serve_uvicorn(starlette_app(), port),
        "granian-embed": lambda: _serve_granian_embed(port),
        "aiohttp": lambda: _serve_aiohttp(port),
    }[kind]
    uvloop.run(coro())


# --------------------------------------------------------------------------- load
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.MULTILINE))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return {"rps": rps, "p50_ms": _ms(lat["50"]), "p99_ms": _ms(lat["99"]), "requests": total,
            "non_2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": sock.group(1).strip() if sock else None}


def run_wrk(url: str, args: argparse.Namespace, pids: list[int]) -> dict:
    cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency", url]
    cpu0, t0 = cpu_seconds(pids), time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                         timeout=args.duration + 30).stdout
    cpu, wall = cpu_seconds(pids) - cpu0, time.monotonic() - t0
    res = parse_wrk(out)
    res["server_cpu_us_per_req"] = round(cpu * 1e6 / max(1, res["requests"]), 1)
    res["server_cores"] = round(cpu / wall, 2)
    return res


def check_stream(url: str) -> None:
    status, body = http_get(url)
    events = body.count(b"data: ")
    if status != 200 or events != 17 or not body.endswith(DONE):
        raise RuntimeError(f"{url}: status {status}, {events} events")


def bench_server(kind: str, args: argparse.Namespace) -> dict:
    port = free_port()
    log = tempfile.TemporaryFile()  # server chatter (e.g. resets when wrk stops) goes here
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_get(base + "/plain")[0] == 200, 30, kind, [proc])
        check_stream(base + "/stream")
        return {ep: run_wrk(f"{base}/{ep}", args, [proc.pid]) for ep in ("stream", "plain")}
    except Exception:
        log.seek(0)
        sys.stderr.write(log.read()[-2000:].decode(errors="replace"))
        raise
    finally:
        stop([proc])
        log.close()


def summarise(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for kind, rounds in runs.items():
        out[kind] = {}
        for ep in ("stream", "plain"):
            rs = [r[ep] for r in rounds]
            out[kind][ep] = {k: round(statistics.median(r[k] for r in rs), 2)
                             for k in ("rps", "p50_ms", "p99_ms", "server_cpu_us_per_req",
                                       "server_cores")}
            out[kind][ep]["rps_rounds"] = [r["rps"] for r in rs]
            out[kind][ep]["errors"] = sum(r["non_2xx"] for r in rs)
    return out


def table(summary: dict) -> str:
    rows = [("| server | SSE rps (rounds) | SSE p50 / p99 ms | SSE server CPU µs/req "
            "| SSE server cores | plain rps (rounds) | plain p50 / p99 ms |"),
            "|---|---|---|---|---|---|---|"]
    for kind, s in summary.items():
        st, pl = s["stream"], s["plain"]
        rows.append(
            f"| {kind} | **{st['rps']:.0f}** ({' / '.join(f'{v:.0f}' for v in st['rps_rounds'])}) "
            f"| {st['p50_ms']:.1f} / {st['p99_ms']:.1f} | {st['server_cpu_us_per_req']:.0f} "
            f"| {st['server_cores']:.2f} "
            f"| **{pl['rps']:.0f}** ({' / '.join(f'{v:.0f}' for v in pl['rps_rounds'])}) "
            f"| {pl['p50_ms']:.2f} / {pl['p99_ms']:.2f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description="HTTP server stacks under wrk (SSE and plain JSON)")
    p.add_argument("--serve", choices=SERVERS, help="run one server (internal)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=int, default=8)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    if not shutil.which("wrk"):
        sys.exit("wrk not found (apt-get install -y wrk)")
    runs: dict[str, list[dict]] = {}
    for rnd in range(args.rounds):
        for kind in args.servers.split(","):
            try:
                res = bench_server(kind, args)
            except Exception as exc:  # noqa: BLE001 - report and go on with the others
                print(f"[{rnd + 1}] {kind}: FAILED {exc}", flush=True)
                continue
            runs.setdefault(kind, []).append(res)
            print(f"[{rnd + 1}] {kind:18s} SSE {res['stream']['rps']:8.0f} rps "
                  f"p50 {res['stream']['p50_ms']:.1f} ms | plain {res['plain']['rps']:8.0f} rps",
                  flush=True)
    summary = summarise(runs)
    print("\n" + table(summary))
    out = Path(args.out or f"bench-results/http_stack-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "args": vars(args), "summary": summary, "runs": runs}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
