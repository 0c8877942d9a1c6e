"""Property-based fuzzing (hypothesis) of the HTTP API and of the request plane's frames.

HTTP: arbitrary bodies, from random bytes to near-valid requests with wrong types, ranges and
shapes in every field, get no 5xx; every error body is OpenAI-shaped; the server serves a
normal request afterwards. Frames: the reader raises nothing but ``FrameError`` on any
bytes, reassembles valid frames however the bytes are cut, and a live server fed garbage
keeps serving its other connections.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from baton.runtime.frames import (
    HEADER,
    Call,
    Cancel,
    Credit,
    Data,
    End,
    Fail,
    FrameError,
    FrameReader,
    encode_frame,
)
from baton.runtime.tcp import TcpServer
from baton.runtime.tcp_client import TcpClientPool
from tests.test_runtime import Count, CountingService, Item, collect

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
MODEL = "baton-tiny"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)


def bodies(noisy: bool) -> tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]:
    """Chat and completion bodies: with ``noisy``, any field may hold any JSON value instead
    of a plausible one (most such bodies are invalid); without, all are plausible (valid
    requests, and invalid ranges and combinations)."""

    def either(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(plausible, plausible, json_values) if noisy else plausible

    small_ints = st.integers(-3, 12)
    messages = st.lists(
        st.fixed_dictionaries(
            {"role": either(st.sampled_from(["system", "user", "assistant", "tool", "robot"])),
             "content": either(st.text(max_size=40) | st.lists(st.fixed_dictionaries(
                 {"type": either(st.just("text")), "text": either(st.text(max_size=20))}),
                 max_size=3))},
            optional={"name": either(st.text(max_size=8))}),
        max_size=4)
    common = {
        "stream": either(st.booleans()),
        "stream_options": either(st.fixed_dictionaries({"include_usage": either(st.booleans())})),
        "temperature": either(st.floats(-1, 3)),
        "top_p": either(st.floats(-0.5, 1.5)),
        "seed": either(st.integers(-5, 2**66)),
        "stop": either(st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=5)),
        "n": either(small_ints),
        "presence_penalty": either(st.floats(-3, 3)),
        "frequency_penalty": either(st.floats(-3, 3)),
        "ignore_eos": either(st.booleans()),
        "min_tokens": either(small_ints),
        "user": either(st.text(max_size=8)),
        "baton": either(st.fixed_dictionaries({}, optional={
            "worker_id": either(small_ints),
            "router_config_override": either(st.fixed_dictionaries({}, optional={
                "temperature": either(st.floats(-1, 2)),
                "overlap_score_credit": either(st.floats(-1, 2))}))})),
    }
    chat = st.fixed_dictionaries(
        {"model": either(st.just(MODEL) | st.text(max_size=10)), "messages": either(messages)},
        optional=common | {
            "max_tokens": either(small_ints),
            "max_completion_tokens": either(small_ints),
            "logprobs": either(st.booleans()),
            "top_logprobs": either(small_ints),
            "tools": either(st.lists(json_values, max_size=3)),
            "response_format": either(st.fixed_dictionaries({"type": either(st.sampled_from(
                ["text", "json_object", "json_schema"]))})),
        })
    completion = st.fixed_dictionaries(
        {"model": either(st.just(MODEL)),
         "prompt": either(st.text(max_size=40) | st.lists(st.integers(-5, 70000), max_size=8)
                          | st.lists(st.text(max_size=10), max_size=3))},
        optional=common | {
            "max_tokens": either(small_ints),
            "logprobs": either(small_ints),
            "echo": either(st.booleans()),
            "suffix": either(st.text(max_size=5)),
            "best_of": either(small_ints),
        })
    return chat, completion


NOISY, PLAUSIBLE = bodies(noisy=True), bodies(noisy=False)
chat_bodies = st.one_of(NOISY[0], PLAUSIBLE[0])
completion_bodies = st.one_of(NOISY[1], PLAUSIBLE[1])


def post(port: int, path: str, body: bytes) -> tuple[int, bytes, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"content-type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("content-type") or ""
    finally:
        conn.close()


def check_answer(port: int, path: str, body: bytes) -> None:
    status, payload, ctype = post(port, path, body)
    event(f"HTTP {status}")  # --hypothesis-show-statistics shows the mix
    assert status < 500, (status, payload[:300])
    if status >= 400:
        error = json.loads(payload)["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str)
        assert "code" in error
    elif "text/event-stream" in ctype:  # a stream that failed midway ends with an error event
        for line in payload.decode().splitlines():
            data = json.loads(line[6:]) if line.startswith("data: {") else {}
            if "error" in data:  # an error event, not a chunk whose text is "error"
                error = data["error"]
                assert isinstance(error["message"], str) and error["message"]


def serves_normally(port: int) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    status, payload, _ = post(port, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200, payload[:300]


@FUZZ
@given(body=chat_bodies)
def test_chat_completions_never_answer_5xx(server, body: dict[str, Any]) -> None:
    check_answer(server.port, "/v1/chat/completions", json.dumps(body).encode())


@FUZZ
@given(body=completion_bodies)
def test_completions_never_answer_5xx(server, body: dict[str, Any]) -> None:
    check_answer(server.port, "/v1/completions", json.dumps(body).encode())


@FUZZ
@given(raw=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()),
       path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/busy_threshold"]))
def test_any_bytes_in_a_body_get_a_clear_error(server, raw: bytes, path: str) -> None:
    check_answer(server.port, path, raw)


def test_the_server_still_serves_after_the_fuzzing(server) -> None:
    serves_normally(server.port)


# ------------------------------------------------------------------------------- frames

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
raw_payloads = msgpack_values.map(lambda v: msgspec.Raw(msgspec.msgpack.encode(v)))
frames = st.one_of(
    st.builds(Call, st.integers(0, 2**40), st.text(max_size=10),
              raw_payloads, st.integers(0, 2**20)),
    st.builds(Cancel, st.integers(0, 2**40)),
    st.builds(Credit, st.integers(0, 2**40), st.integers(-5, 2**20)),
    st.builds(Data, st.integers(0, 2**40), raw_payloads),
    st.builds(End, st.integers(0, 2**40)),
    st.builds(Fail, st.integers(0, 2**40), st.text(max_size=10), st.text(max_size=30),
              st.integers(100, 599), st.none() | st.text(max_size=10)),
)


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=6))
def test_the_frame_reader_raises_only_frame_errors(data: bytes, cuts: list[int]) -> None:
    reader = FrameReader(max_frame_bytes=1 << 16)
    try:
        for chunk in split(data, cuts):
            reader.feed(chunk)
    except FrameError:
        pass


@settings(max_examples=300, deadline=None)
@given(sent=st.lists(frames, max_size=8), cuts=st.lists(st.integers(0, 4000), max_size=8))
def test_frames_survive_any_cutting_of_the_byte_stream(sent: list[Any], cuts: list[int]) -> None:
    data = b"".join(encode_frame(f) for f in sent)
    reader, got = FrameReader(), []
    for chunk in split(data, cuts):
        got += reader.feed(chunk)
    assert [msgspec.msgpack.encode(f) for f in got] == [msgspec.msgpack.encode(f) for f in sent]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


class LiveServer:
    """A request-plane server on its own event loop thread, for blocking fuzz clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = TcpServer(CountingService().endpoints)
        self.address = self.run(self.server.start())
        host, port = self.address.removeprefix("tcp://").rsplit(":", 1)
        self.host, self.port = host, int(port)

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    server = LiveServer()
    yield server
    server.close()


async def call_once(address: str) -> list[int]:
    client = TcpClientPool(pool_size=1)
    try:
        return [x.i for x in await collect(client.stream(address, "count", Count(n=3), Item))]
    finally:
        await client.close()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=500) | st.lists(frames, max_size=4).map(
    lambda fs: b"".join(encode_frame(f) for f in fs)), framed=st.booleans())
def test_a_live_server_fed_garbage_keeps_serving(live: LiveServer, payload: bytes,
                                                 framed: bool) -> None:
    with socket.create_connection((live.host, live.port), timeout=5) as sock:
        sock.sendall(HEADER.pack(len(payload)) + payload if framed else payload)
        sock.settimeout(0.2)
        try:  # whatever comes back must itself be valid frames
            reply = sock.recv(65536)
        except TimeoutError:
            reply = b""
        reader = FrameReader()
        assert all(isinstance(f, Data | End | Fail) for f in reader.feed(reply))
    assert live.run(call_once(live.address)) == [0, 1, 2]
