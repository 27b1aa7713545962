"""The RabbitMQ transport holds a delivery before it requeues it, longer after each redelivery.

Requeued at once, a delivery comes straight back, and whatever made its handler give it back
(a reply the broker refuses while a cluster fails over) fails it again within milliseconds:
quorum queues count every requeue, so ten of them in a fraction of a second parked a sound
message as poison. These tests settle deliveries through the transport's settling path with a
stand-in for aio-pika's message and a clock that records waits, so they need no broker.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from plumbing.rabbitmq import RabbitTransport
from plumbing.transport import DeadLetter, Delivery, Disposition

Verdict = Disposition | DeadLetter


class RecordingClock:
    """A clock whose waits return at once and are written to ``events``."""

    def __init__(self, events: list[object]) -> None:
        self.events = events
        self.waits: list[float] = []

    def now(self) -> datetime:
        return datetime(2026, 1, 1, tzinfo=UTC)

    async def sleep(self, seconds: float) -> None:
        self.events.append(("sleep", seconds))
        self.waits.append(seconds)


class StandInMessage:
    """What the transport reads of an aio-pika ``IncomingMessage``; settling is recorded."""

    def __init__(self, events: list[object], delivery_count: int | None) -> None:
        self.events = events
        self.headers: dict[str, Any] = {}
        if delivery_count is not None:
            self.headers["x-delivery-count"] = delivery_count
        self.redelivered = delivery_count is not None
        self.body = b"{}"
        self.routing_key = "work"
        self.message_id = "m-1"
        self.correlation_id = None
        self.delivery_tag = 1
        self.channel = SimpleNamespace(is_closed=False)

    async def ack(self) -> None:
        self.events.append("ack")

    async def nack(self, requeue: bool = True) -> None:
        self.events.append(("nack", requeue))


async def settle(verdict: Verdict, delivery_count: int | None) -> tuple[list[object], float]:
    """Hand one delivery to a handler that returns ``verdict``: what the transport did, in
    order, and how long it waited in all."""
    events: list[object] = []
    clock = RecordingClock(events)
    transport = RabbitTransport(
        "amqp://guest:guest@127.0.0.1:1/", poison_threshold=None, clock=clock
    )

    async def handler(delivery: Delivery) -> Verdict:
        events.append("handled")
        return verdict

    message: Any = StandInMessage(events, delivery_count)
    # The path every delivery of a consumer takes; consuming itself needs a broker.
    await transport._handle("work", message, handler, asyncio.Semaphore(0))
    return events, sum(clock.waits)


@pytest.mark.parametrize(
    ("delivery_count", "held"),
    [(None, 0.1), (1, 0.2), (3, 0.8), (4, 1.6), (5, 2.0), (9, 2.0)],
)
async def test_a_requeue_is_held_back_longer_after_each_redelivery(
    delivery_count: int | None, held: float
) -> None:
    events, _ = await settle(Disposition.REQUEUE, delivery_count)
    assert events == ["handled", ("sleep", pytest.approx(held)), ("nack", True)]


async def test_ten_requeues_take_seconds_not_milliseconds() -> None:
    # Up to the tenth redelivery (the daemons' poison threshold), the holds add up to longer
    # than a cluster takes to fail over to a new node (well under a second here).
    held = 0.0
    for count in (None, *range(1, 10)):
        _, waited = await settle(Disposition.REQUEUE, count)
        held += waited
    assert held == pytest.approx(13.1)


async def test_an_ack_is_not_held() -> None:
    assert await settle(Disposition.ACK, 3) == (["handled", "ack"], 0.0)
