"""What the console's API and browser tests share: a populated store, a parked message made by
the real orchestrator, and waiting for a condition without sleeping blindly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import aio_pika

from contracts import names
from examples.order_fulfillment import app
from orchestrator.runtime import Orchestrator
from orchestrator.state import SagaStatus
from orchestrator.store import SagaStore
from orchestrator.stores.memory import MemoryStore
from orchestrator.testing import SagaHarness, fail
from plumbing.rabbitmq import RabbitTransport
from tests.unit.test_harness import ORDER

BAD_START = b'{"saga_type": "order_fulfillment", "saga_id": 7}'
"""A start request the orchestrator cannot read: it parks it with the reason."""


def order(saga_id: str, **simulate: str) -> dict[str, object]:
    """The example order's data for ``saga_id``."""
    return {**ORDER, "order_id": saga_id, **({"simulate": simulate} if simulate else {})}


async def populate(store: SagaStore) -> None:
    """One completed saga, one rolled back and two stuck on reserve_inventory's compensation."""
    async with SagaHarness(app, store=store, start=datetime.now(UTC)) as h:
        await h.start("order_fulfillment", "o-ok", order("o-ok"))
        h.participant("payment").on("process_payment", fail("card declined"))
        await h.start("order_fulfillment", "o-failed", order("o-failed"))
        h.participant("inventory").on("release_inventory", fail("the warehouse lost it"))
        for saga_id in ("o-stuck-1", "o-stuck-2"):
            await h.start("order_fulfillment", saga_id, order(saga_id))
            assert (await h.saga(saga_id)).status is SagaStatus.STUCK


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, *, within: float = 60.0
) -> None:
    """Wait until ``check()`` holds, asking again every tenth of a second, for at most
    ``within`` seconds (generous: the machine may be loaded)."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {within:g}s")
        await asyncio.sleep(0.1)


async def queue_depth(url: str, queue: str) -> int:
    """Messages ready in ``queue``."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        return count or 0


async def park_a_bad_start_request(url: str) -> None:
    """Publish an unreadable start request and let the real orchestrator's handler park it."""
    transport = RabbitTransport(url)
    engine = Orchestrator(app, MemoryStore(), transport)
    try:
        await transport.declare(engine.topology)
        before = await queue_depth(url, names.PARKED_QUEUE)
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await channel.default_exchange.publish(
                aio_pika.Message(BAD_START, content_type="application/json", message_id="bad-1"),
                routing_key=names.START_QUEUE,
            )
        async with asyncio.TaskGroup() as group:
            consumer = group.create_task(transport.consume(names.START_QUEUE, engine.on_start))

            async def parked() -> bool:
                return await queue_depth(url, names.PARKED_QUEUE) == before + 1

            await eventually(parked, "parking the bad start request")
            consumer.cancel()
    finally:
        await transport.close()
