"""A client that disconnects mid-stream cancels its sequence on the worker and frees its blocks."""

from __future__ import annotations

import http.client
import json
import urllib.request


def open_stream(base_url: str, max_tokens: int) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    body = {"model": "baton-tiny", "messages": [{"role": "user", "content": "go " * 100}],
            "max_tokens": max_tokens, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")
    return conn, resp


def test_disconnect_mid_stream_frees_the_sequence_blocks(make_server):
    srv = make_server(workers=1, speedup_ratio=1.0)
    sched = srv.workers[0].engine.scheduler
    conn, resp = open_stream(srv.base_url, max_tokens=3000)
    assert srv.wait_until(lambda: sched.num_running == 1 and sched.pool.num_used_blocks > 0)
    resp.close()
    conn.close()
    assert srv.wait_until(lambda: sched.num_running == 0 and sched.num_waiting == 0)
    assert srv.call(lambda: sched.pool.num_used_blocks) == 0
    srv.call(sched.check_invariants)
    with urllib.request.urlopen(f"{srv.base_url}/metrics") as r:
        metrics = r.read().decode()
    assert 'baton_frontend_client_disconnects_total{model="baton-tiny"} 1.0' in metrics
    assert 'baton_frontend_inflight_requests{model="baton-tiny"} 0.0' in metrics
