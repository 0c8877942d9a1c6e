"""Graceful shutdown: SIGTERM drains a worker; the frontend turns unready while it drains."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.error
import urllib.request

import aiohttp
import openai

from tests.conftest import baton_process

MAX_TOKENS = 150


async def stream_all(port: int, n: int, started: asyncio.Event) -> list[tuple[int, str | None]]:
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                                max_retries=0, timeout=30)
    running = 0

    async def one() -> tuple[int, str | None]:
        nonlocal running
        stream = await client.chat.completions.create(
            model="baton-tiny", messages=[{"role": "user", "content": "a long answer"}],
            max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True})
        finish, tokens = None, 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.role:
                running += 1
                if running == n:
                    started.set()
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return tokens, finish

    try:
        return await asyncio.gather(*(one() for _ in range(n)))
    finally:
        await client.close()


def test_sigterm_on_a_worker_lets_its_ten_streams_finish():
    worker, wmatch = baton_process("worker", "--port", "0", "--speedup-ratio", "1",
                                   ready=r"listening on (tcp://\S+)")
    frontend = None
    try:
        frontend, fmatch = baton_process("frontend", "--port", "0", "--worker", wmatch.group(1),
                                         ready=r"http://127\.0\.0\.1:(\d+)")

        async def scenario():
            started = asyncio.Event()
            streams = asyncio.ensure_future(stream_all(int(fmatch.group(1)), 10, started))
            await asyncio.wait_for(started.wait(), 15)
            worker.send_signal(signal.SIGTERM)
            return await streams

        results = asyncio.run(scenario())
        assert results == [(MAX_TOKENS, "length")] * 10
        assert worker.wait(15) == 0
    finally:
        for proc in (frontend, worker):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_sigterm_on_a_frontend_turns_health_503_and_finishes_open_streams():
    serve, match = baton_process("serve", "--port", "0", "--speedup-ratio", "1",
                                 ready=r"http://127\.0\.0\.1:(\d+)")
    port = int(match.group(1))

    def health() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as err:
            return err.code

    async def scenario():
        started = asyncio.Event()
        streams = asyncio.ensure_future(stream_all(port, 3, started))
        await asyncio.wait_for(started.wait(), 15)
        serve.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        status = await asyncio.to_thread(health)
        return status, await streams

    try:
        status, results = asyncio.run(scenario())
        assert status == 503
        assert results == [(MAX_TOKENS, "length")] * 3
        assert serve.wait(15) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(10)


def test_a_drained_worker_delivers_everything_its_slow_readers_have_not_read_yet():
    """The worker's engine finishes generating long before its clients read the streams (each
    stream's credit window fills and its handler waits): SIGTERM must not cut what is still
    buffered or not yet sent, the End frames included."""
    worker, wmatch = baton_process("worker", "--port", "0", "--speedup-ratio", "0",
                                   ready=r"listening on (tcp://\S+)")
    frontend = None
    try:
        frontend, fmatch = baton_process("frontend", "--port", "0", "--worker", wmatch.group(1),
                                         ready=r"http://127\.0\.0\.1:(\d+)")
        url = f"http://127.0.0.1:{fmatch.group(1)}/v1/completions"

        async def slow_reader(session: aiohttp.ClientSession, i: int) -> int:
            body = {"model": "baton-tiny", "prompt": [5 + i, 6, 7], "max_tokens": 2000,
                    "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
            async with session.post(url, json=body) as resp:
                first = await resp.content.readline()
                assert first.startswith(b"data: ")
                await asyncio.sleep(3)  # stop reading: everything piles up upstream
                async for line in resp.content:
                    if line.startswith(b"data: {"):
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            return int(chunk["usage"]["completion_tokens"])
                    if line.startswith(b"data: [DONE]"):
                        break
            return -1  # the stream ended without its usage: cut short

        async def scenario() -> list[int]:
            async with aiohttp.ClientSession() as session:
                readers = [asyncio.ensure_future(slow_reader(session, i)) for i in range(4)]
                await asyncio.sleep(1.0)  # generated and buffered, not read
                worker.send_signal(signal.SIGTERM)
                return await asyncio.gather(*readers)

        assert asyncio.run(scenario()) == [2000] * 4
        assert worker.wait(15) == 0
    finally:
        for proc in (frontend, worker):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
