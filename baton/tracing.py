"""Optional OpenTelemetry tracing of a request across frontend, router and worker.

Off by default, and then nearly free: ``start`` returns a span that does nothing (about 1 µs
for a span's start, attributes and end; a request has three). ``enable`` (the
command line's ``--trace-exporter``) installs a tracer provider of Baton's own (not the
process-global one, so a test can install another) with an exporter: ``console`` prints
spans, ``otlp`` sends them to a collector (the ``tracing`` extra;
``OTEL_EXPORTER_OTLP_ENDPOINT`` says where), or any ``SpanExporter`` given.

Spans are ended explicitly and parented by W3C ``traceparent`` strings, never through the
"current span" context: a request's work runs across async generators, and a context
attached in one would leak into its consumer. A request's trace is

    baton.request (frontend)  >  baton.route (router: pick, wait for the first token)
        >  baton.worker.generate (worker)

and the same under the prefill leg of a disaggregated request. The frontend passes the
parent on in ``GenerateRequest.trace_parent``, so a trace crosses processes and hosts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = ["Span", "disable", "enable", "start"]

_provider: TracerProvider | None = None
_tracer: Any = None


class Span:
    """One span (or, with tracing off, nothing): ``set`` attributes, ``end`` once."""

    __slots__ = ("_span",)

    def __init__(self, span: Any = None) -> None:
        self._span = span

    @property
    def traceparent(self) -> str | None:
        """This span as a parent for another process (W3C ``traceparent``)."""
        if self._span is None:
            return None
        ctx = self._span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    def set(self, **attributes: Any) -> None:
        if self._span is not None:
            self._span.set_attributes({f"baton.{k}": v for k, v in attributes.items()
                                       if v is not None})

    def end(self, error: BaseException | None = None) -> None:
        if self._span is None:
            return
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            self._span.record_exception(error)
            self._span.set_status(Status(StatusCode.ERROR, str(error)))
        self._span.end()
        self._span = None


def start(name: str, parent: str | None = None, **attributes: Any) -> Span:
    """A new span under ``parent`` (a ``traceparent``; None: a new trace)."""
    if _tracer is None:
        return Span()
    context = None
    if parent is not None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        context = TraceContextTextMapPropagator().extract({"traceparent": parent})
    span = Span(_tracer.start_span(name, context=context))
    span.set(**attributes)
    return span


def enable(exporter: str | SpanExporter, service_name: str) -> None:
    """Traces from now on (``exporter``: ``console``, ``otlp`` or an exporter); a
    ValueError says which package is missing."""
    global _provider, _tracer
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        raise ValueError("tracing needs opentelemetry-sdk: pip install 'baton[tracing]'") from None
    if exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        processor: Any = SimpleSpanProcessor(ConsoleSpanExporter())
    elif exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ValueError("--trace-exporter otlp needs opentelemetry-exporter-otlp-proto-http:"
                             " pip install 'baton[tracing]'") from None
        processor = BatchSpanProcessor(OTLPSpanExporter())
    elif isinstance(exporter, str):
        raise ValueError(f"unknown trace exporter {exporter!r}")
    else:
        processor = SimpleSpanProcessor(exporter)
    disable()
    _provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    _provider.add_span_processor(processor)
    _tracer = _provider.get_tracer("baton")


def disable() -> None:
    """Stops tracing; spans not yet exported are flushed."""
    global _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
    _provider = _tracer = None
