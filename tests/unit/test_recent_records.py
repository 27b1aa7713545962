"""The orchestrator decides from the record it wrote last, skipping the load, and never acts
on a stale copy: another replica's write, a hold or an operator's action still win."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from contracts.messages import ReplyStatus
from examples.order_fulfillment import app
from orchestrator.engine import Outcome, ReplyReceived, new_saga
from orchestrator.recent import RecentRecords
from orchestrator.runtime import Orchestrator
from orchestrator.state import SagaStatus, StepStatus
from orchestrator.store import Hold, SagaRecord
from orchestrator.stores.memory import MemoryStore
from orchestrator.testing import SagaHarness, hang
from plumbing.codec import answer
from tests.unit.test_harness import ORDER


class CountingStore(MemoryStore):
    """Counts loads."""

    def __init__(self) -> None:
        super().__init__()
        self.loads = 0

    async def load(self, saga_id: str) -> SagaRecord | None:
        self.loads += 1
        return await super().load(saga_id)


@pytest.fixture
async def harness() -> AsyncIterator[tuple[SagaHarness, CountingStore]]:
    store = CountingStore()
    async with SagaHarness(app, store=store) as h:
        yield h, store


def completed(h: SagaHarness, command: str, result: dict[str, Any]) -> ReplyReceived:
    """A participant's ``completed`` answer to the last ``command`` sent."""
    envelope = [c for c in h.commands() if c.command == command][-1]
    return ReplyReceived(answer(envelope, ReplyStatus.COMPLETED, h.clock.now(), result=result))


RESERVED = {"reservation_id": "r-1"}
PAID = {"payment_id": "p-1", "amount": "42.00"}
T0 = datetime(2026, 1, 1, tzinfo=UTC)


async def reserved_by_another_replica(h: SagaHarness, *hanging: tuple[str, str]) -> ReplyReceived:
    """Start ``o-1`` here (its record kept) and let another replica apply the reservation:
    this orchestrator's copy is now one version behind. Returns the reservation's reply."""
    h.participant("inventory").on("reserve_inventory", hang())
    for service, command in hanging:
        h.participant(service).on(command, hang())
    await h.start("order_fulfillment", "o-1", ORDER)
    other = Orchestrator(app, h.store, h.broker, clock=h.clock)  # another replica
    reserved = completed(h, "reserve_inventory", RESERVED)
    await other.apply("o-1", reserved)
    assert (await h.record("o-1")).version == 2
    return reserved


async def test_a_saga_run_by_one_orchestrator_is_never_loaded(
    harness: tuple[SagaHarness, CountingStore],
) -> None:
    h, store = harness
    await h.orchestrator.start("order_fulfillment", "fast", ORDER)
    await h.advance(seconds=5)
    loads, store.loads = store.loads, 0
    assert (await h.saga("fast")).status is SagaStatus.COMPLETED
    assert loads == 0  # the start wrote once; each of the four replies wrote once
    assert len(h.orchestrator.recent) == 0  # a finished saga is not kept


async def test_a_stale_copy_that_would_write_loses_the_version_race_and_the_store_wins(
    harness: tuple[SagaHarness, CountingStore],
) -> None:
    h, _ = harness
    reserved = await reserved_by_another_replica(h, ("payment", "process_payment"))

    # Here the saga still waits for the reservation; the redelivered reply would move it on.
    duplicate = await h.orchestrator.apply("o-1", reserved)
    assert duplicate.outcome is Outcome.LATE_REPLY  # decided from the stored version 2
    assert duplicate.state.step("reserve_inventory").status is StepStatus.COMPLETED
    assert h.command_names("o-1") == ["reserve_inventory", "process_payment"]  # sent once


async def test_a_stale_copy_that_would_ignore_a_reply_is_checked_against_the_store(
    harness: tuple[SagaHarness, CountingStore],
) -> None:
    h, _ = harness
    await reserved_by_another_replica(
        h, ("payment", "process_payment"), ("shipping", "create_shipment")
    )

    # Here the payment was never asked for: from this copy alone the reply looks unexpected.
    applied = await h.orchestrator.apply("o-1", completed(h, "process_payment", PAID))
    assert applied.outcome is Outcome.APPLIED
    assert applied.state.step("process_payment").status is StepStatus.COMPLETED
    assert (await h.record("o-1")).version == 3


async def test_a_hold_set_elsewhere_is_not_overwritten_by_a_copy_from_before_it(
    harness: tuple[SagaHarness, CountingStore],
) -> None:
    h, _ = harness
    h.participant("inventory").on("reserve_inventory", hang())
    await h.start("order_fulfillment", "o-1", ORDER)
    await h.store.hold("o-1", Hold("another replica's sweep failed on it", h.clock.now()))

    reply = completed(h, "reserve_inventory", RESERVED)
    kept = await h.orchestrator.apply("o-1", reply)
    assert kept.outcome is Outcome.HELD
    record = await h.record("o-1")
    assert record.hold is not None
    assert record.hold.reason == "another replica's sweep failed on it"
    assert [r.message_id for r in record.state.inbox] == [reply.reply.message_id]


async def test_an_operator_action_is_decided_from_the_store(
    harness: tuple[SagaHarness, CountingStore],
) -> None:
    h, store = harness
    h.participant("inventory").on("reserve_inventory", hang())
    await h.start("order_fulfillment", "o-1", ORDER)
    store.loads = 0
    await h.abort("o-1")
    assert store.loads >= 1
    assert (await h.saga("o-1")).status in (SagaStatus.COMPENSATING, SagaStatus.FAILED)


def test_the_least_recently_written_records_are_dropped_first() -> None:
    recent = RecentRecords(capacity=2)
    records = {}
    for saga_id in ("a", "b", "c"):
        record = SagaRecord(new_saga(app["order_fulfillment"], saga_id, ORDER, T0))
        records[saga_id] = record
        recent.remember(record)
    assert (recent.get("a"), len(recent)) == (None, 2)
    recent.remember(records["b"])  # b written again: c is now the oldest
    recent.remember(replace(records["a"], version=2))
    assert recent.get("c") is None
    assert [recent.get(s) is not None for s in ("a", "b")] == [True, True]
    recent.forget("a")
    assert recent.get("a") is None
    assert RecentRecords(capacity=0).get("a") is None


async def test_a_timer_a_stale_copy_does_not_know_is_checked_against_the_store(
    harness: tuple[SagaHarness, CountingStore],
) -> None:
    h, _ = harness
    await reserved_by_another_replica(h, ("payment", "process_payment"))

    # The payment's 60 s timeout comes to this orchestrator, whose copy never saw the payment
    # start (and whose reservation is due only at 120 s): from the copy alone it is a stale
    # timer, from the store it is the payment timing out.
    await h.advance(seconds=61)
    assert (await h.saga("o-1")).step("process_payment").status is not StepStatus.RUNNING
