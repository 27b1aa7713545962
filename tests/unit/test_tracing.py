"""W3C trace context flows from the start request through every message of the saga."""

from __future__ import annotations

from examples.order_fulfillment import app, inventory, notification, payment, shipping
from orchestrator.testing import SagaHarness, hang
from plumbing import tracing
from plumbing.memory import MemoryBroker
from tests.unit.test_harness import ORDER

CALLER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_helpers_follow_the_spec() -> None:
    assert tracing.valid(CALLER)
    assert not tracing.valid("00-" + "0" * 32 + "-00f067aa0ba902b7-01")
    assert not tracing.valid("garbage")
    assert tracing.continue_or_start(CALLER) == CALLER
    fresh = tracing.continue_or_start("garbage")
    assert tracing.valid(fresh)
    assert fresh != tracing.continue_or_start(None)
    span = tracing.child(CALLER, "m-1")
    assert tracing.trace_id(span) == tracing.trace_id(CALLER)
    assert span == tracing.child(CALLER, "m-1") != tracing.child(CALLER, "m-2")
    assert tracing.trace_id(CALLER.encode()) == "4bf92f3577b34da6a3ce929d0e0e4736"


def trace_ids(broker: MemoryBroker) -> set[str | None]:
    return {tracing.trace_id(m.headers.get("traceparent")) for m in broker.published}


async def test_every_message_of_a_saga_carries_the_callers_trace() -> None:
    async with SagaHarness(app).mount(inventory, payment, shipping, notification) as h:
        await h.orchestrator.start("order_fulfillment", "o-1", ORDER, traceparent=CALLER)
        await h.settle()
        kinds = {m.kind for m in h.broker.published}
        assert kinds == {"command", "timer", "event", "reply"}
        assert trace_ids(h.broker) == {"4bf92f3577b34da6a3ce929d0e0e4736"}
        spans = [m.headers["traceparent"] for m in h.broker.published]
        assert len(set(spans)) == len(spans)  # a span per message
        for message in h.broker.published:
            assert message.headers["traceparent"] in message.body  # header and body agree


async def test_a_saga_started_without_a_trace_gets_one() -> None:
    async with SagaHarness(app) as h:
        h.participant("shipping").on("create_shipment", hang())
        await h.start("order_fulfillment", "o-1", ORDER)
        await h.advance(minutes=16)
        ids = trace_ids(h.broker)
        assert len(ids) == 1
        assert None not in ids
