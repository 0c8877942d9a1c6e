"""Bad input gets an OpenAI-style error with the right status, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest

CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"
GOOD_MSG = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return json.dumps({"model": "baton-tiny", "messages": GOOD_MSG, **fields}).encode()


def compl(**fields):
    return json.dumps({"model": "baton-tiny", "prompt": "hi", **fields}).encode()


# (name, method, path, body, status, error type, param or None)
CASES = [
    ("malformed json", "POST", CHAT, b'{"model": "baton-tiny", "messages": [', 400, "invalid_request_error", None),
    ("empty body", "POST", CHAT, b"", 400, "invalid_request_error", None),
    ("body is an array", "POST", CHAT, b"[1, 2]", 400, "invalid_request_error", None),
    ("missing model", "POST", CHAT, json.dumps({"messages": GOOD_MSG}).encode(), 400, "invalid_request_error", "model"),
    ("missing messages", "POST", CHAT, json.dumps({"model": "baton-tiny"}).encode(), 400, "invalid_request_error", "messages"),
    ("empty messages", "POST", CHAT, chat(messages=[]), 400, "invalid_request_error", "messages"),
    ("bad role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "invalid_request_error", "messages[0].role"),
    ("content wrong type", "POST", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "invalid_request_error", "messages[0].content"),
    ("image content part", "POST", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400, "invalid_request_error", "messages[0].content"),
    ("unknown model", "POST", CHAT, chat(model="no-such-model"), 404, "not_found_error", "model"),
    ("max_tokens zero", "POST", CHAT, chat(max_tokens=0), 400, "invalid_request_error", "max_tokens"),
    ("max_tokens string", "POST", CHAT, chat(max_tokens="ten"), 400, "invalid_request_error", "max_tokens"),
    ("max_tokens beyond context", "POST", CHAT, chat(max_tokens=10_000_000), 400, "invalid_request_error", "max_tokens"),
    ("prompt beyond context", "POST", COMPL, compl(prompt=[7] * 40_000, max_tokens=1), 400, "invalid_request_error", "prompt"),
    ("temperature too high", "POST", CHAT, chat(temperature=3.5), 400, "invalid_request_error", "temperature"),
    ("negative temperature", "POST", CHAT, chat(temperature=-1), 400, "invalid_request_error", "temperature"),
    ("top_p zero", "POST", CHAT, chat(top_p=0), 400, "invalid_request_error", "top_p"),
    ("five stop strings", "POST", CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, "invalid_request_error", "stop"),
    ("stop wrong type", "POST", CHAT, chat(stop=7), 400, "invalid_request_error", "stop"),
    ("n of two", "POST", CHAT, chat(n=2), 400, "invalid_request_error", "n"),
    ("logprobs", "POST", CHAT, chat(logprobs=True), 400, "invalid_request_error", "logprobs"),
    ("min_tokens over max_tokens", "POST", CHAT, chat(max_tokens=2, min_tokens=5), 400, "invalid_request_error", "min_tokens"),
    ("presence penalty out of range", "POST", CHAT, chat(presence_penalty=9), 400, "invalid_request_error", "presence_penalty"),
    ("stream not a bool", "POST", CHAT, chat(stream="yes"), 400, "invalid_request_error", "stream"),
    ("response_format json_schema", "POST", CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}), 400, "invalid_request_error", "response_format"),
    ("response_format json_schema without a schema", "POST", CHAT, chat(response_format={"type": "json_schema"}), 400, "invalid_request_error", "response_format.json_schema"),
    ("response_format of no known type", "POST", CHAT, chat(response_format={"type": "yaml"}), 400, "invalid_request_error", "response_format.type"),
    ("top_logprobs without logprobs", "POST", CHAT, chat(top_logprobs=2), 400, "invalid_request_error", "top_logprobs"),
    ("completion empty prompt", "POST", COMPL, compl(prompt=""), 400, "invalid_request_error", "prompt"),
    ("completion batch of prompts", "POST", COMPL, compl(prompt=["a", "b"]), 400, "invalid_request_error", "prompt"),
    ("completion token out of vocab", "POST", COMPL, compl(prompt=[1, 99_999_999]), 400, "invalid_request_error", "prompt"),
    ("completion echo", "POST", COMPL, compl(echo=True), 400, "invalid_request_error", "echo"),
    ("completion logprobs", "POST", COMPL, compl(logprobs=2), 400, "invalid_request_error", "logprobs"),
    ("body over the size limit", "POST", CHAT, chat(messages=[{"role": "user", "content": "x" * (9 * 1024 * 1024)}]), 413, "invalid_request_error", None),
    ("unknown route", "POST", "/v1/nothing", b"{}", 404, "not_found_error", None),
    ("wrong method", "GET", CHAT, None, 405, "invalid_request_error", None),
]


def send(base_url, method, path, body):
    req = urllib.request.Request(
        base_url + path, data=body, method=method, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, err.headers, json.load(err)


@pytest.mark.parametrize("name,method,path,body,status,etype,param", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_openai_error_and_server_keeps_serving(server, name, method, path, body, status, etype, param):
    code, _, payload = send(server.base_url, method, path, body)
    assert code == status, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == etype
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    code, _, ok = send(server.base_url, "POST", CHAT, chat(max_tokens=2))
    assert code == 200 and ok["usage"]["completion_tokens"] == 2


def test_at_least_twenty_bad_requests_are_covered():
    assert len(CASES) >= 20


def test_bad_requests_are_counted_by_status(server):
    send(server.base_url, "POST", CHAT, chat(model="no-such-model"))
    with urllib.request.urlopen(f"{server.base_url}/metrics") as r:
        metrics = r.read().decode()
    assert 'baton_frontend_requests_total{endpoint="chat",model="unknown",status="404"}' in metrics


def status_of(url):
    try:
        with urllib.request.urlopen(url) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_no_worker_for_a_model_gives_503_with_retry_after(make_server):
    srv = make_server(workers=1)
    discovery = srv.frontend.runtime.discovery
    asyncio.run_coroutine_threadsafe(
        discovery.deregister(srv.workers[0].instance_id), srv._loop
    ).result(5)
    assert srv.wait_until(lambda: not srv.frontend.models.served())
    code, headers, payload = send(srv.base_url, "POST", CHAT, chat(max_tokens=2))
    assert code == 503
    assert headers.get("Retry-After") == "1"
    assert payload["error"]["type"] == "service_unavailable"
    assert status_of(srv.base_url + "/health") == 503


def test_a_body_declared_far_over_the_limit_is_refused_before_it_is_read(server):
    """The 413 comes from the headers alone: the server does not read a gigabyte first."""
    import socket
    import time

    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                     b"content-type: application/json\r\ncontent-length: 1073741824\r\n\r\n{")
        started = time.monotonic()
        head = sock.recv(65536)
        assert time.monotonic() - started < 2
        while b"invalid_request_error" not in head and time.monotonic() - started < 5:
            more = sock.recv(65536)  # the body may come in a packet of its own
            if not more:
                break
            head += more
    assert head.startswith(b"HTTP/1.1 413")
    assert b'"type":"invalid_request_error"' in head.replace(b" ", b"")


def test_json_nested_too_deeply_is_a_400_not_a_500(server):
    deep = b"[" * 100_000 + b"]" * 100_000
    body = (b'{"model": "baton-tiny", "messages": [{"role": "user", "content": "hi"}], '
            b'"tools": [{"function": ' + deep + b"}]}")
    code, _, payload = send(server.base_url, "POST", CHAT, body)
    assert code == 400, payload
    assert "nested too deeply" in payload["error"]["message"]
    code, _, ok = send(server.base_url, "POST", CHAT, chat(max_tokens=2))
    assert code == 200
