"""The orchestrator over the PostgreSQL store: completing, recovering from a crash between
commit and publish, recovering from a lost timer, and two replicas racing on one saga."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from contracts import names
from contracts.events import EventName
from contracts.messages import Reply, ReplyStatus
from examples.order_fulfillment import app, order_fulfillment
from orchestrator.effects import outgoing
from orchestrator.engine import start_saga
from orchestrator.metrics import Metrics
from orchestrator.runtime import EngineConfig, Orchestrator
from orchestrator.state import SagaState, SagaStatus, StepStatus
from orchestrator.store import SagaRecord
from orchestrator.stores.postgres import PostgresStore
from orchestrator.testing import SagaHarness, hang
from plumbing.transport import Delivery, Disposition, Outgoing
from tests.support.stores import own_table

pytestmark = pytest.mark.postgres

ORDER = {
    "customer_id": "c-1",
    "items": [{"sku": "SKU-1", "quantity": 2, "unit_price": "12.50"}],
    "payment_method": "card",
    "shipping_address": "1 Main St",
}
ALL_STEPS = ["reserve_inventory", "process_payment", "create_shipment", "send_confirmation"]


def order(order_id: str) -> dict[str, object]:
    return {**ORDER, "order_id": order_id}


async def start(h: SagaHarness, saga_id: str) -> SagaState:
    """Start an order saga and let everything that follows at this instant happen."""
    await h.orchestrator.start("order_fulfillment", saga_id, order(saga_id))
    await h.settle()
    return await h.saga(saga_id)


def harness(store: PostgresStore, **options: Any) -> SagaHarness:
    """The harness over ``store``."""
    return SagaHarness(app, store=store, **options)


def first_sends(commands: list[str]) -> list[str]:
    """Command names in the order they were first sent (delivery is at least once)."""
    return list(dict.fromkeys(commands))


@pytest.fixture
async def store(postgres_url: str, unique: str) -> AsyncIterator[PostgresStore]:
    """A PostgreSQL store on a table of its own, dropped afterwards."""
    async with own_table(PostgresStore(postgres_url, table=f"saga_engine_{unique}")) as store:
        yield store


async def test_a_saga_completes(store: PostgresStore) -> None:
    async with harness(store) as h:
        state = await start(h, "o-1")

        assert state.status is SagaStatus.COMPLETED
        assert first_sends(h.command_names("o-1")) == ALL_STEPS

    record = await store.load("o-1")
    assert record is not None
    assert record.state == state
    assert record.outbox == ()  # every message was published and marked
    assert await store.outbox_backlog() == (0, None)


async def test_the_relay_publishes_an_outbox_a_crash_left_behind(store: PostgresStore) -> None:
    async with harness(store) as h:
        now = h.clock.now()
        decision = start_saga(order_fulfillment, "o-2", order("o-2"), now)
        # Committed, then the process died before publishing anything.
        left = SagaRecord(decision.state, 1, tuple(outgoing(e, now) for e in decision.effects))
        assert await store.create(left)
        await h.advance(seconds=5)
        assert await h.orchestrator.relay_once() == 0  # still within the grace period
        await h.advance(seconds=10)

        relayed = await h.orchestrator.relay_once()
        await h.settle()

        assert relayed >= len(left.outbox)
        assert first_sends(h.command_names("o-2")) == ALL_STEPS
        assert (await h.saga("o-2")).status is SagaStatus.COMPLETED
    assert await store.outbox_backlog() == (0, None)


async def test_the_sweep_times_out_a_step_whose_timer_was_lost(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with harness(store) as h:
        h.participant("payment").on("process_payment", hang())
        lost: list[Outgoing] = []
        publish = h.broker.publish

        async def losing_timers(message: Outgoing) -> None:
            if message.kind == "timer":  # confirmed by the broker, then lost
                lost.append(message)
                return
            await publish(message)

        monkeypatch.setattr(h.broker, "publish", losing_timers)
        await start(h, "o-3")
        await h.advance(minutes=5)  # the payment step times out after one minute
        assert (await h.saga("o-3")).status is SagaStatus.STARTED  # nobody noticed

        assert await h.orchestrator.sweep_once() == 1
        await h.settle()

        state = await h.saga("o-3")
        assert state.status is SagaStatus.FAILED
        assert state.step("process_payment").status is StepStatus.COMPENSATED  # it was in doubt
        assert first_sends(h.command_names("o-3")) == [
            "reserve_inventory",
            "process_payment",
            "refund_payment",
            "release_inventory",
        ]
        assert {timer.routing_key for timer in lost} == {names.TIMERS_QUEUE}


async def test_two_orchestrators_applying_replies_concurrently_lose_no_update(
    store: PostgresStore, postgres_url: str
) -> None:
    replica_store = PostgresStore(postgres_url, table=store.table)  # another process's pool
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    copies = 40  # redeliveries of one reply: the first completes the step
    # Each reply commits exactly once, so one can lose the version race at most copies - 1
    # times: this budget lets every one through, where the default (25) can run out.
    config = EngineConfig(conflict_retries=copies)
    try:
        async with harness(store, metrics=metrics, config=config) as h:
            h.participant("inventory").on("reserve_inventory", hang())
            h.participant("payment").on("process_payment", hang())
            await start(h, "o-4")
            replica = Orchestrator(
                app, replica_store, h.broker, clock=h.clock, config=config, metrics=metrics
            )
            command = h.commands("o-4")[0]
            deliveries = [
                Delivery(
                    queue=names.REPLIES_QUEUE,
                    body=Reply(
                        message_id=f"reply:{command.message_id}:{n}",
                        in_reply_to=command.message_id,
                        saga_id="o-4",
                        step=command.step,
                        direction=command.direction,
                        attempt=command.attempt,
                        status=ReplyStatus.COMPLETED,
                        result={"reservation_id": "res-o-4"},
                        sent_at=h.clock.now(),
                    )
                    .model_dump_json()
                    .encode(),
                )
                for n in range(copies)
            ]
            orchestrators = (h.orchestrator, replica)

            dispositions = await asyncio.gather(
                *(orchestrators[n % 2].on_reply(d) for n, d in enumerate(deliveries))
            )
            await h.settle()

            assert dispositions == [Disposition.ACK] * copies
            record = await store.load("o-4")
            assert record is not None
            assert record.version == 1 + copies  # every reply was one committed transition
            history = [entry.event for entry in record.state.history]
            assert history.count(EventName.STEP_COMPLETED) == 1
            assert history.count(EventName.LATE_REPLY) == copies - 1
            assert record.state.step("reserve_inventory").status is StepStatus.COMPLETED
            assert record.state.step("process_payment").status is StepStatus.RUNNING
            assert record.outbox == ()
            conflicts = registry.get_sample_value("saga_version_conflicts_total")
            assert conflicts, "the replicas never raced, so the test proved nothing"
    finally:
        await replica_store.close()


async def test_each_command_is_sent_once_when_nothing_fails(store: PostgresStore) -> None:
    async with harness(store) as h:
        for n in range(3):
            await start(h, f"dup-{n}")

        for n in range(3):
            assert h.command_names(f"dup-{n}") == ALL_STEPS
