"""The in-memory broker follows RabbitMQ's routing rules, so code tested on it holds up."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from plumbing.errors import PublishFailed
from plumbing.memory import MemoryBroker, VirtualClock, _topic_match
from plumbing.topology import BindingSpec, ExchangeSpec, QueueSpec, Topology
from plumbing.transport import Delivery, Disposition, Outgoing


def message(exchange: str, key: str, **extra: object) -> Outgoing:
    fields: dict[str, object] = {
        "message_id": f"{exchange}:{key}",
        "kind": "event",
        "exchange": exchange,
        "routing_key": key,
        "body": "{}",
        "created_at": VirtualClock().now(),
    }
    fields.update(extra)
    return Outgoing(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("a.b", "a.b", True),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.#", "a", True),
        ("a.#", "a.b.c", True),
        ("#.c", "a.b.c", True),
        ("#", "", True),
        ("*.1.#", "0.1.0.saga.timers", True),
        ("*.1.#", "1.0.0.saga.timers", False),
        ("#.saga.timers", "0.0.saga.timers", True),
        ("#.saga.timers", "0.0.saga.replies", False),
    ],
)
def test_topic_matching(pattern: str, key: str, matches: bool) -> None:
    assert _topic_match(tuple(pattern.split(".")), tuple(key.split("."))) is matches


async def test_routing_follows_bindings_and_unroutable_mandatory_raises() -> None:
    broker = MemoryBroker(VirtualClock())
    await broker.declare(
        Topology(
            exchanges=(ExchangeSpec("events", "topic"), ExchangeSpec("fan", "fanout")),
            queues=(QueueSpec("q1"), QueueSpec("q2")),
            bindings=(
                BindingSpec("events", "q1", "order.*"),
                BindingSpec("events", "fan", "#.Failed", to_exchange=True),
                BindingSpec("fan", "q2", ""),
            ),
        )
    )
    await broker.publish(message("events", "order.Started"))
    await broker.publish(message("events", "order.Failed"))
    assert broker.depth("q1") == 2
    assert broker.depth("q2") == 1
    with pytest.raises(PublishFailed, match="no queue is bound"):
        await broker.publish(message("events", "payment.Started.x"))
    await broker.publish(message("events", "payment.Started.x", mandatory=False))
    with pytest.raises(PublishFailed, match="no exchange"):
        await broker.publish(message("nowhere", "x"))


async def test_delayed_messages_arrive_when_due_never_before() -> None:
    clock = VirtualClock()
    broker = MemoryBroker(clock)
    await broker.declare(Topology(queues=(QueueSpec("timers"),)))
    seen: list[str] = []

    async def handler(delivery: Delivery) -> Disposition:
        seen.append(f"{delivery.message_id}@{(clock.now() - start).total_seconds():g}")
        return Disposition.ACK

    start = clock.now()
    for seconds in (30, 5, 10):
        await broker.publish(
            message(
                "",
                "timers",
                message_id=f"t{seconds}",
                deliver_at=start + timedelta(seconds=seconds),
            )
        )
    async with asyncio.TaskGroup() as group:
        consumer = group.create_task(broker.consume("timers", handler))
        await broker.advance(timedelta(seconds=9))
        assert seen == ["t5@5"]
        await broker.advance(timedelta(seconds=60))
        assert seen == ["t5@5", "t10@10", "t30@30"]
        consumer.cancel()


async def test_settle_waits_for_handlers_but_not_for_sleepers() -> None:
    clock = VirtualClock()
    broker = MemoryBroker(clock)
    await broker.declare(Topology(queues=(QueueSpec("q"),)))
    done: list[str] = []

    async def handler(delivery: Delivery) -> Disposition:
        await clock.sleep(60)
        done.append(delivery.message_id or "")
        return Disposition.ACK

    async with asyncio.TaskGroup() as group:
        consumer = group.create_task(broker.consume("q", handler))
        await broker.publish(message("", "q"))
        await broker.settle()
        assert done == []
        await broker.advance(timedelta(seconds=60))
        assert done == [":q"]
        consumer.cancel()
