"""OpenTelemetry spans, when ``opentelemetry-api`` is installed (``pip install
saga-orchestrator[otel]`` and an SDK with an exporter); without it, nothing here does anything.

A saga's messages already carry its W3C trace context (``traceparent`` and ``tracestate``),
so spans recorded by the orchestrator and by participants join one trace per saga: the
orchestrator records a span per step attempt and per compensation attempt (from the command
being sent to its answer or timeout) and one for the saga as a whole, all children of the
saga's trace context; a participant records a span for each handler run, a child of the
command's context.

Spans are recorded when the work they describe has ended, with its real start and end times:
the orchestrator is a state machine that handles each message in a moment, so there is no
long-lived span to keep open across messages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

try:  # an optional dependency: spans only when the application installed OpenTelemetry
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # pragma: no cover - exercised where opentelemetry is absent
    trace = None  # type: ignore[assignment]

_INSTRUMENTATION = "saga-orchestrator"


def enabled() -> bool:
    """Whether a finished span recorded now goes anywhere: OpenTelemetry is installed and the
    application set a tracer provider (an SDK).

    The API alone hands out spans that record nothing; building them for every decision cost
    the orchestrator 1-2% of its CPU in the bench (opentelemetry-api is often installed as a
    dependency of something else). Checked on every call: an application may set its provider
    after this module is imported.
    """
    if trace is None:
        return False
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def record_span(
    name: str,
    *,
    traceparent: str | None,
    tracestate: str | None,
    start: datetime,
    end: datetime,
    attributes: Mapping[str, str | int | bool],
    error: str | None = None,
) -> None:
    """Record a finished span as a child of the given W3C context (a new trace without one).

    ``error`` marks the span as failed, with that description.
    """
    if not enabled():
        return
    carrier = {"traceparent": traceparent or ""}
    if tracestate:
        carrier["tracestate"] = tracestate
    context = TraceContextTextMapPropagator().extract(carrier) if traceparent else None
    tracer = trace.get_tracer(_INSTRUMENTATION)
    span = tracer.start_span(
        name,
        context=context,
        kind=trace.SpanKind.INTERNAL,
        attributes=dict(attributes),
        start_time=_nanoseconds(start),
    )
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=_nanoseconds(end))


def current_context(traceparent: str | None, tracestate: str | None) -> Any:
    """The OpenTelemetry context of a W3C ``traceparent``/``tracestate`` pair (or None)."""
    if trace is None or not traceparent:
        return None
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    return TraceContextTextMapPropagator().extract(carrier)


class SpanOutcome:
    """How the work in a live span ended, as far as the span is told."""

    def __init__(self, span: Any) -> None:
        self._span = span

    def fail(self, description: str) -> None:
        """Mark the span as failed, with ``description``."""
        if self._span is not None:
            self._span.set_status(Status(StatusCode.ERROR, description))


@contextlib.contextmanager
def live_span(
    name: str,
    *,
    traceparent: str | None,
    tracestate: str | None,
    attributes: Mapping[str, str | int | bool],
) -> Iterator[SpanOutcome]:
    """A span around work done now (a participant's handler), current while it runs, so the
    work's own spans are its children; a child of the given W3C context."""
    if trace is None:
        yield SpanOutcome(None)
        return
    if not enabled():
        # No SDK: a span would record nothing (building one was 7% of a service's CPU in the
        # bench), but the command's trace context stays current, as the API's no-op span
        # would keep it, so the handler's own outgoing calls still carry the saga's trace.
        context = current_context(traceparent, tracestate)
        token = otel_context.attach(context) if context is not None else None
        try:
            yield SpanOutcome(None)
        finally:
            if token is not None:
                otel_context.detach(token)
        return
    tracer = trace.get_tracer(_INSTRUMENTATION)
    with tracer.start_as_current_span(
        name,
        context=current_context(traceparent, tracestate),
        kind=trace.SpanKind.CONSUMER,
        attributes=dict(attributes),
    ) as span:
        yield SpanOutcome(span)


def _nanoseconds(instant: datetime) -> int:
    return int(instant.timestamp() * 1_000_000_000)
