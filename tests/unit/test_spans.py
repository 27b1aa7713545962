"""OpenTelemetry: one trace per saga, with a span per step attempt, compensation and saga."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from contracts.messages import Reply
from examples.order_fulfillment import app, inventory, notification, payment, shipping
from orchestrator.testing import SagaHarness, errors_then, fail, succeed
from tests.unit.test_harness import ORDER

CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
EXPORTER = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
trace.set_tracer_provider(_provider)  # once per process: OpenTelemetry refuses a second


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    EXPORTER.clear()
    yield EXPORTER
    EXPORTER.clear()


async def test_each_saga_is_one_trace_of_its_attempts_and_compensations(
    spans: InMemorySpanExporter,
) -> None:
    caller = CALLER
    async with SagaHarness(app) as h:
        h.participant("payment").on("process_payment", *errors_then(1, succeed()))
        h.participant("shipping").on("create_shipment", fail("no address"))
        await h.orchestrator.start(
            "order_fulfillment",
            "o-1",
            {**ORDER, "order_id": "o-1"},
            traceparent=caller,
            tracestate="vendor=abc",
        )
        await h.settle()
        await h.advance(seconds=5)
        await h.start("order_fulfillment", "o-2", {**ORDER, "order_id": "o-2"})
    finished = spans.get_finished_spans()
    one = [s for s in finished if s.attributes and s.attributes["saga.id"] == "o-1"]
    two = [s for s in finished if s.attributes and s.attributes["saga.id"] == "o-2"]
    assert {s.context.trace_id for s in one} == {int("0af7651916cd43dd8448eb211c80319c", 16)}
    assert len({s.context.trace_id for s in two}) == 1  # its own trace, not o-1's
    assert {s.context.trace_id for s in two}.isdisjoint({s.context.trace_id for s in one})
    assert [s.name for s in one] == [
        "order_fulfillment.reserve_inventory #1",
        "order_fulfillment.process_payment #1",
        "order_fulfillment.process_payment #2",
        "order_fulfillment.create_shipment #1",
        "order_fulfillment.process_payment compensation #1",
        "order_fulfillment.reserve_inventory compensation #1",
        "saga order_fulfillment",
    ]
    errors = [s.name for s in one if s.status.status_code is StatusCode.ERROR]
    assert errors == [
        "order_fulfillment.process_payment #1",
        "order_fulfillment.create_shipment #1",
        "saga order_fulfillment",
    ]
    for span in one:
        assert span.parent is not None
        assert span.parent.span_id == int("b7ad6b7169203331", 16)  # children of the caller
        assert span.start_time is not None
        assert span.end_time is not None
        assert span.end_time >= span.start_time
    assert dict(one[0].parent.trace_state) == {"vendor": "abc"}  # type: ignore[union-attr]


async def test_participant_handlers_are_spans_of_the_sagas_trace(
    spans: InMemorySpanExporter,
) -> None:
    caller = CALLER
    inside: list[int] = []

    async with SagaHarness(app).mount(inventory, payment, shipping, notification) as h:
        await h.orchestrator.start(
            "order_fulfillment",
            "spans-1",  # the example services are shared: an id no other test ran
            {**ORDER, "order_id": "spans-1"},
            traceparent=caller,
            tracestate="vendor=abc",
        )
        await h.settle()
        inside.append(trace.get_current_span().get_span_context().trace_id)
    handled = [s for s in spans.get_finished_spans() if s.kind is SpanKind.CONSUMER]
    assert [s.name for s in handled] == [
        "inventory.reserve_inventory",
        "payment.process_payment",
        "shipping.create_shipment",
        "notification.send_confirmation",
    ]
    commands = {c.command: c for c in h.commands("spans-1")}
    for span in handled:
        assert span.attributes is not None
        command = commands[span.name.split(".")[1]]
        assert command.traceparent is not None
        assert span.context.trace_id == int("0af7651916cd43dd8448eb211c80319c", 16)
        assert span.parent is not None
        # A child of the command's own context: the orchestrator sent it, the service ran it.
        assert span.parent.span_id == int(command.traceparent.split("-")[2], 16)
        assert dict(span.parent.trace_state) == {"vendor": "abc"}
        assert span.attributes["saga.attempt"] == command.attempt
    assert inside == [0]  # no span leaks into the caller's context
    replies = [m for m in h.published("reply") if m.message_id.startswith("reply:")]
    assert replies
    assert {Reply.model_validate_json(m.body).tracestate for m in replies} == {"vendor=abc"}


def test_no_span_is_built_until_the_application_sets_a_tracer_provider() -> None:
    """The API alone records nothing: building its spans would be work for nothing, but a
    handler still runs in the command's trace context."""
    check = (
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from plumbing import telemetry\n"
        f"parent = {CALLER!r}\n"
        "def handled() -> tuple[bool, int]:\n"
        "    with telemetry.live_span('h', traceparent=parent, tracestate=None, attributes={}):\n"
        "        span = trace.get_current_span()\n"
        "        return span.is_recording(), span.get_span_context().trace_id\n"
        "caller_trace = int(parent.split('-')[1], 16)\n"
        "assert not telemetry.enabled()\n"
        "# no span, but the handler's own calls still carry the command's trace\n"
        "assert handled() == (False, caller_trace)\n"
        "assert not trace.get_current_span().get_span_context().is_valid\n"
        "trace.set_tracer_provider(TracerProvider())\n"
        "assert telemetry.enabled()\n"
        "assert handled() == (True, caller_trace)\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", check], check=True, cwd=root, timeout=60)
