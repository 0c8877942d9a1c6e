"""OpenTelemetry tracing of a request: one trace from the frontend's ``baton.request``
through the router's ``baton.route`` to the worker's ``baton.worker.generate``, in one
process and across processes (``baton/tracing.py``)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import openai
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from baton import tracing
from baton.protocol import GenerateRequest, SamplingParams
from tests.conftest import baton_process

MESSAGES = [{"role": "user", "content": "Say something about tracing."}]


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    tracing.enable(exporter, "baton-test")
    yield exporter
    tracing.disable()


def ask(port: int, max_tokens: int = 6) -> None:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    client.chat.completions.create(model="baton-tiny", messages=MESSAGES, max_tokens=max_tokens)


def by_name(exporter: InMemorySpanExporter) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for span in exporter.get_finished_spans():
        out.setdefault(span.name, []).append(span)
    return out


def test_a_request_is_one_trace_from_frontend_through_router_to_worker(make_server, spans):
    srv = make_server(workers=2)
    ask(srv.port)
    assert srv.wait_until(lambda: len(spans.get_finished_spans()) >= 3)
    named = by_name(spans)
    (request,), (route,), (work,) = (named["baton.request"], named["baton.route"],
                                    named["baton.worker.generate"])
    assert request.parent is None
    assert route.parent.span_id == request.context.span_id
    assert work.parent.span_id == route.context.span_id
    assert {s.context.trace_id for s in (request, route, work)} == {request.context.trace_id}
    assert request.attributes["baton.model"] == "baton-tiny"
    assert request.attributes["baton.completion_tokens"] == 6
    worker = request.attributes["baton.worker_id"]
    assert route.attributes["baton.worker_id"] == worker == work.attributes["baton.worker_id"]
    assert work.attributes["baton.prompt_tokens"] == request.attributes["baton.prompt_tokens"]


def test_a_disaggregated_request_traces_both_legs(make_server, spans):
    srv = make_server(disagg=(1, 1), disagg_options={"policy": "always"})
    ask(srv.port)
    assert srv.wait_until(lambda: len(spans.get_finished_spans()) >= 5)
    named = by_name(spans)
    (request,) = named["baton.request"]
    assert len(named["baton.route"]) == 2
    roles = {w.attributes["baton.role"]: w for w in named["baton.worker.generate"]}
    assert set(roles) == {"prefill", "decode"}
    routes = {r.context.span_id: r for r in named["baton.route"]}
    for work in roles.values():
        assert routes[work.parent.span_id].parent.span_id == request.context.span_id
    assert request.attributes["baton.prefill_worker_id"] == roles["prefill"].attributes[
        "baton.worker_id"]


def test_a_request_no_worker_can_serve_ends_its_spans_as_errors(make_server, spans):
    srv = make_server(workers=1)
    srv.call(lambda: [w.__setattr__("draining", True) for w in srv.workers])
    with pytest.raises(openai.APIStatusError):
        ask(srv.port)
    assert srv.wait_until(lambda: len(by_name(spans).get("baton.request", [])) == 1)
    named = by_name(spans)
    for span in (*named["baton.request"], *named["baton.route"]):
        assert span.status.status_code.name == "ERROR"
        assert "draining" in span.status.description or "no reachable worker" in \
            span.status.description


def test_tracing_off_costs_nothing_and_sends_no_parent():
    tracing.disable()
    span = tracing.start("baton.request", model="m")
    assert span.traceparent is None
    span.set(anything=1)
    span.end(RuntimeError("x"))
    request = GenerateRequest(request_id="r", token_ids=[1], sampling=SamplingParams(max_tokens=1))
    assert request.trace_parent is None


def console_spans(path: Path) -> list[dict[str, Any]]:
    """The spans a ``--trace-exporter console`` process printed (JSON objects, one after
    another)."""
    text, decoder, spans, at = path.read_text(), json.JSONDecoder(), [], 0
    while (at := text.find("{", at)) != -1:
        span, at = decoder.raw_decode(text, at)
        spans.append(span)
    return spans


def test_a_trace_crosses_from_the_frontend_process_to_the_worker_process(tmp_path):
    outs = {name: open(tmp_path / f"{name}.out", "w") for name in ("worker", "frontend")}  # noqa: SIM115
    worker, wmatch = baton_process("--trace-exporter", "console", "worker", "--port", "0",
                                   ready=r"listening on (tcp://\S+)", stdout=outs["worker"])
    try:
        frontend, fmatch = baton_process(
            "--trace-exporter", "console", "frontend", "--port", "0", "--worker",
            wmatch.group(1), ready=r"http://127\.0\.0\.1:(\d+)", stdout=outs["frontend"])
        try:
            ask(int(fmatch.group(1)))
        finally:
            frontend.send_signal(signal.SIGTERM)
            frontend.wait(30)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        for f in outs.values():
            f.close()
    front = {s["name"]: s for s in console_spans(tmp_path / "frontend.out")}
    (work,) = [s for s in console_spans(tmp_path / "worker.out")
               if s["name"] == "baton.worker.generate"]
    assert work["parent_id"] == front["baton.route"]["context"]["span_id"]
    assert work["context"]["trace_id"] == front["baton.request"]["context"]["trace_id"]
    assert work["resource"]["attributes"]["service.name"] == "baton-worker"
    assert front["baton.request"]["resource"]["attributes"]["service.name"] == "baton-frontend"
