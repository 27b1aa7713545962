"""The test harness as a user writes with it: scripted participants and virtual time."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from contracts.events import EventName
from examples.order_fulfillment import app
from orchestrator.metrics import Metrics
from orchestrator.state import SagaStatus, StepStatus
from orchestrator.testing import SagaHarness, error, errors_then, fail, hang, late, succeed
from plumbing.errors import SagaConflict

ORDER = {
    "order_id": "o-1",
    "customer_id": "c-1",
    "items": [{"sku": "SKU-1", "quantity": 2, "unit_price": "12.50"}],
    "payment_method": "card",
    "shipping_address": "1 Main St",
}
FORWARD = ["reserve_inventory", "process_payment", "create_shipment", "send_confirmation"]


async def test_every_step_succeeds_by_default_with_placeholder_results() -> None:
    async with SagaHarness(app) as h:
        state = await h.start("order_fulfillment", "o-1", ORDER)
        assert state.status is SagaStatus.COMPLETED
        assert h.command_names("o-1") == FORWARD
        assert state.results["process_payment"]["payment_id"] == "payment_id-o-1"


async def test_declined_payment_releases_the_stock() -> None:
    async with SagaHarness(app) as h:
        h.participant("payment").on("process_payment", fail("card declined"))
        state = await h.start("order_fulfillment", "o-1", ORDER)
        assert state.status is SagaStatus.FAILED
        assert h.command_names("o-1") == [
            "reserve_inventory",
            "process_payment",
            "release_inventory",
        ]
        release = h.commands("o-1")[-1]
        assert release.payload["reservation_id"] == "reservation_id-o-1"


async def test_transient_errors_then_success_are_retried_with_backoff() -> None:
    async with SagaHarness(app) as h:
        h.participant("payment").on("process_payment", *errors_then(2, succeed()))
        state = await h.start("order_fulfillment", "o-1", ORDER)
        assert state.status is SagaStatus.PENDING  # backing off, nothing outstanding
        await h.advance(seconds=1)
        await h.advance(seconds=2)
        state = await h.saga("o-1")
        assert state.status is SagaStatus.COMPLETED
        attempts = [c.attempt for c in h.commands("o-1") if c.command == "process_payment"]
        assert attempts == [1, 2, 3]
        retrying = [e for e in state.history if e.event is EventName.STEP_RETRYING]
        assert len(retrying) == 2


async def test_a_step_that_hangs_times_out_and_everything_before_it_is_undone() -> None:
    async with SagaHarness(app) as h:
        h.participant("shipping").on("create_shipment", hang())
        await h.start("order_fulfillment", "o-1", ORDER)
        await h.advance(minutes=14)
        assert (await h.saga("o-1")).status is SagaStatus.STARTED
        await h.advance(minutes=1)
        state = await h.saga("o-1")
        assert state.status is SagaStatus.FAILED
        assert h.command_names("o-1")[3:] == [
            "cancel_shipment",
            "refund_payment",
            "release_inventory",
        ]


async def test_a_late_reply_after_the_timeout_is_recorded_and_ignored() -> None:
    async with SagaHarness(app) as h:
        h.participant("payment").on("process_payment", late(90))
        await h.start("order_fulfillment", "o-1", ORDER)
        await h.advance(minutes=2)
        state = await h.saga("o-1")
        assert state.status is SagaStatus.FAILED
        assert [e.event for e in state.history][-1] is EventName.LATE_REPLY
        assert h.command_names("o-1") == [
            "reserve_inventory",
            "process_payment",
            "refund_payment",
            "release_inventory",
        ]


async def test_a_stuck_compensation_waits_for_the_operator() -> None:
    async with SagaHarness(app) as h:
        h.participant("payment").on("process_payment", fail())
        h.participant("inventory").on("release_inventory", error("warehouse down"))
        await h.start("order_fulfillment", "o-1", ORDER)
        await h.advance(hours=2)
        state = await h.saga("o-1")
        assert state.status is SagaStatus.STUCK
        assert state.step("reserve_inventory").status is StepStatus.COMPENSATION_FAILED
        releases = [c for c in h.commands("o-1") if c.command == "release_inventory"]
        assert len(releases) == 10  # the default compensation policy: ten attempts
        h.participant("inventory").on("release_inventory", succeed())
        state = await h.retry("o-1")
        assert state.status is SagaStatus.FAILED


async def test_operator_abort_through_the_harness() -> None:
    async with SagaHarness(app) as h:
        h.participant("shipping").on("create_shipment", hang())
        await h.start("order_fulfillment", "o-1", ORDER)
        state = await h.abort("o-1", "customer changed their mind")
        assert state.status is SagaStatus.FAILED
        assert state.failure_reason == "customer changed their mind"


async def test_a_lost_timer_is_repaired_by_the_sweep() -> None:
    async with SagaHarness(app) as h:
        h.participant("shipping").on("create_shipment", hang())
        await h.start("order_fulfillment", "o-1", ORDER)
        h.broker._delayed.clear()  # every timer lost (a purged delay queue)
        await h.advance(minutes=16)
        assert (await h.saga("o-1")).status is SagaStatus.STARTED
        assert await h.sweep() == 1
        state = await h.saga("o-1")
        assert state.status is SagaStatus.FAILED


async def test_garbage_on_the_reply_queue_is_dead_lettered_and_counted() -> None:
    registry = CollectorRegistry()
    async with SagaHarness(app, metrics=Metrics(registry)) as h:
        from plumbing.transport import Outgoing

        await h.broker.publish(
            Outgoing(
                message_id="junk",
                kind="reply",
                exchange="saga.replies",
                routing_key="saga.replies",
                body="{not json",
                created_at=h.clock.now(),
            )
        )
        await h.settle()
        assert len(h.parked) == 1
        assert "not a valid Reply" in h.parked[0][1]
        value = registry.get_sample_value(
            "saga_dead_lettered_total", {"queue": "saga.replies", "reason": "malformed"}
        )
        assert value == 1.0
        state = await h.start("order_fulfillment", "o-1", ORDER)
        assert state.status is SagaStatus.COMPLETED


async def test_starting_twice_is_idempotent_and_other_data_is_refused() -> None:
    async with SagaHarness(app) as h:
        await h.start("order_fulfillment", "o-1", ORDER)
        await h.start("order_fulfillment", "o-1", ORDER)  # the same request again
        with pytest.raises(SagaConflict, match="already exists with other data"):
            await h.start("order_fulfillment", "o-1", {**ORDER, "customer_id": "someone-else"})
        assert h.command_names("o-1") == FORWARD
        assert (await h.saga("o-1")).data["customer_id"] == "c-1"


async def test_metrics_follow_the_saga() -> None:
    registry = CollectorRegistry()
    async with SagaHarness(app, metrics=Metrics(registry)) as h:
        h.participant("shipping").on("create_shipment", hang())
        await h.start("order_fulfillment", "o-1", ORDER)
        await h.advance(minutes=16)
        await h.orchestrator.refresh_gauges()

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert sample("saga_started_total", saga_type="order_fulfillment") == 1
    assert sample("saga_failed_total", saga_type="order_fulfillment") == 1
    outcome = {"saga_type": "order_fulfillment", "step": "create_shipment", "outcome": "timed_out"}
    assert sample("saga_step_outcomes_total", **outcome) == 1
    comp = {"saga_type": "order_fulfillment", "step": "process_payment", "outcome": "completed"}
    assert sample("saga_compensations_total", **comp) == 1
    # A finished saga is counted by the totals; the gauge holds only unfinished ones.
    assert sample("saga_active", saga_type="order_fulfillment", status="failed") is None
    assert sample("saga_active", saga_type="order_fulfillment", status="stuck") == 0
    assert sample("saga_timers_fired_total", source="broker") == 1


async def test_a_store_outage_is_waited_out_not_requeued() -> None:
    from orchestrator.stores.memory import MemoryStore
    from plumbing.errors import StoreUnavailable

    class FlakyStore(MemoryStore):
        failures = 0

        def fail(self) -> None:
            if self.failures:
                self.failures -= 1
                raise StoreUnavailable("the store is restarting")

        async def load(self, saga_id: str):  # type: ignore[no-untyped-def]
            self.fail()
            return await super().load(saga_id)

        async def save(self, record, expected_version, *, drop=()):  # type: ignore[no-untyped-def]
            self.fail()
            return await super().save(record, expected_version, drop=drop)

    def step_status() -> StepStatus:
        return store.states()[0].step("process_payment").status

    store = FlakyStore()
    registry = CollectorRegistry()
    async with SagaHarness(app, store=store, metrics=Metrics(registry)) as h:
        h.participant("payment").on("process_payment", late(10))
        await h.start("order_fulfillment", "o-1", ORDER)
        store.failures = 3
        await h.advance(seconds=10)  # the reply comes; the store fails three times (1 s, 2 s, 4 s)
        assert step_status() is StepStatus.RUNNING
        await h.advance(seconds=8)
        assert step_status() is StepStatus.COMPLETED
        assert store.states()[0].status is SagaStatus.COMPLETED
    requeued = {"queue": "saga.replies", "outcome": "requeued"}
    assert registry.get_sample_value("saga_messages_total", requeued) is None
