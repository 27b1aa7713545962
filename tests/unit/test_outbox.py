"""The outbox publisher: timers held back and dropped once stale, marks folded into the next
write or batched, confirms awaited together; nothing lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Mapping

import pytest

from examples.order_fulfillment import app
from orchestrator.state import SagaStatus
from orchestrator.store import SagaRecord
from orchestrator.stores.memory import MemoryStore
from orchestrator.testing import SagaHarness, hang, late
from plumbing.transport import MessageKind, Outgoing
from tests.unit.test_harness import ORDER


class CountingStore(MemoryStore):
    """Counts the writes that only mark messages published."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[int] = []
        self.dropping_saves = 0

    async def save(
        self, record: SagaRecord, expected_version: int, *, drop: Collection[str] = ()
    ) -> bool:
        if drop:
            self.dropping_saves += 1
        return await super().save(record, expected_version, drop=drop)

    async def mark_published(self, saga_id: str, message_ids: Collection[str]) -> None:
        self.marks.append(1)
        await super().mark_published(saga_id, message_ids)

    async def mark_published_many(self, published: Mapping[str, Collection[str]]) -> None:
        self.marks.append(len(published))
        await super().mark_published_many(published)


@pytest.fixture
async def harness() -> AsyncIterator[tuple[SagaHarness, CountingStore]]:
    store = CountingStore()
    async with SagaHarness(app, store=store) as h:
        publisher = asyncio.create_task(h.orchestrator.outbox.run())
        await asyncio.sleep(0)  # let it start: holding and batching begin with it
        try:
            yield h, store
        finally:
            publisher.cancel()
            await asyncio.gather(publisher, return_exceptions=True)


def timers(h: SagaHarness, saga_id: str) -> list[str]:
    return [m.message_id for m in h.published("timer") if m.correlation_id == saga_id]


async def test_timers_of_steps_that_answer_quickly_are_never_published(
    harness: tuple[SagaHarness, CountingStore],
) -> None:
    h, store = harness
    await h.start("order_fulfillment", "fast", {**ORDER, "order_id": "fast"})
    await h.advance(seconds=5)
    assert (await h.saga("fast")).status is SagaStatus.COMPLETED
    assert timers(h, "fast") == []  # four steps, no trip through the delay ladder
    record = await h.record("fast")
    assert record.outbox == ()  # the stale timers left the stored outbox too
    assert store.dropping_saves >= 3  # each transition took the last one's leftovers along


async def test_a_timer_still_needed_is_published_after_the_hold_and_fires(
    harness: tuple[SagaHarness, CountingStore],
) -> None:
    h, _ = harness
    h.participant("shipping").on("create_shipment", hang())
    await h.start("order_fulfillment", "slow", {**ORDER, "order_id": "slow"})
    await h.advance(seconds=5)
    published = [m for m in h.published("timer") if m.correlation_id == "slow"]
    assert [m.message_id for m in published] == ["slow:timer:step_timeout:create_shipment:1"]
    assert published[0].deliver_at is not None  # rides the delay ladder as before
    await h.advance(minutes=16)
    assert (await h.saga("slow")).status is SagaStatus.FAILED


async def test_marks_of_sagas_that_do_not_write_again_are_batched(
    harness: tuple[SagaHarness, CountingStore],
) -> None:
    h, store = harness
    for n in range(10):
        h.participant("inventory").on("reserve_inventory", late(60))
        await h.orchestrator.start("order_fulfillment", f"b-{n}", {**ORDER, "order_id": f"b-{n}"})
    await h.settle()
    await h.advance(seconds=1)
    assert max(store.marks, default=0) == 10  # one write marked all ten sagas
    for n in range(10):  # what is left is the timer still held back, not yet published
        left = [(m.kind, m.message_id) for m in (await h.record(f"b-{n}")).outbox]
        assert left == [(MessageKind.TIMER, f"b-{n}:timer:step_timeout:reserve_inventory:1")]


async def test_held_timers_are_published_when_the_daemon_stops(
    harness: tuple[SagaHarness, CountingStore],
) -> None:
    h, _ = harness
    h.participant("inventory").on("reserve_inventory", hang())
    await h.orchestrator.start("order_fulfillment", "stop", {**ORDER, "order_id": "stop"})
    await h.settle()
    assert timers(h, "stop") == []  # still held
    await h.orchestrator.outbox.drain()
    assert timers(h, "stop") == ["stop:timer:step_timeout:reserve_inventory:1"]
    assert (await h.record("stop")).outbox == ()
    assert all(m.kind is MessageKind.TIMER for m in h.published("timer"))


async def test_held_timers_of_many_sagas_are_published_together(
    harness: tuple[SagaHarness, CountingStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    h, _ = harness
    in_flight, most = 0, 0
    publish = h.broker.publish

    async def counted(message: Outgoing) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0)  # a confirm takes at least a turn of the loop
            await publish(message)
        finally:
            in_flight -= 1

    h.participant("inventory").on("reserve_inventory", hang())
    for n in range(20):
        await h.orchestrator.start("order_fulfillment", f"h-{n}", {**ORDER, "order_id": f"h-{n}"})
    await h.settle()
    monkeypatch.setattr(h.broker, "publish", counted)
    await h.advance(seconds=5)  # past the hold: twenty sagas' timers come due at once
    assert len(h.published("timer")) == 20
    assert most == 20  # not one confirm after another: those fall behind a busy daemon
