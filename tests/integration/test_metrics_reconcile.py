"""The counters agree with the store after a mixed run, operator actions included.

Sagas complete, roll back, get stuck on a refused compensation, time out compensating, and are
retried, resolved and aborted by an operator; then every ``saga_*_total`` is checked against
what the store holds: sagas by status and the histories they recorded.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry

from contracts.events import EventName
from examples.order_fulfillment import app
from orchestrator.engine import Action
from orchestrator.metrics import Metrics
from orchestrator.operations import Operations
from orchestrator.state import HistoryEntry, SagaStatus
from orchestrator.store import SagaFilter
from orchestrator.stores import open_store
from orchestrator.testing import SagaHarness, fail, hang, succeed
from tests.unit.test_harness import ORDER

KIND = {"saga_type": "order_fulfillment"}


def order(saga_id: str) -> dict[str, object]:
    return {**ORDER, "order_id": saga_id}


def recorded_outcomes(histories: list[tuple[HistoryEntry, ...]]) -> Counter[str]:
    """Compensation outcomes and completed steps as the sagas' histories tell them."""
    recorded: Counter[str] = Counter()
    for entry in (entry for history in histories for entry in history):
        if entry.event is EventName.COMPENSATION_FAILED:
            timed_out = (entry.detail or "").startswith("CompensationTimeout")
            recorded["timed_out" if timed_out else "failed"] += 1
        elif entry.event is EventName.COMPENSATION_COMPLETED:
            recorded["completed"] += 1
        elif entry.event is EventName.STEP_COMPLETED:
            recorded["step_completed"] += 1
    return recorded


async def test_a_mixed_runs_counters_equal_the_stores_counts(store_url: str) -> None:
    registry = CollectorRegistry()
    store = open_store(store_url)
    async with SagaHarness(
        app, store=store, metrics=Metrics(registry), start=datetime.now(UTC)
    ) as h:
        operations = Operations(h.orchestrator)
        inventory, payment = h.participant("inventory"), h.participant("payment")

        await h.start("order_fulfillment", "ok", order("ok"))
        payment.on("process_payment", fail("declined"))
        await h.start("order_fulfillment", "rolled-back", order("rolled-back"))
        inventory.on("release_inventory", fail("the warehouse lost it"))
        for saga_id in ("to-retry", "to-resolve", "left-stuck"):
            await h.start("order_fulfillment", saga_id, order(saga_id))
            assert (await h.saga(saga_id)).status is SagaStatus.STUCK
        inventory.on("release_inventory", hang())
        await h.start("order_fulfillment", "undo-times-out", order("undo-times-out"))
        await h.advance(hours=6)
        assert (await h.saga("undo-times-out")).status is SagaStatus.STUCK

        inventory.on("release_inventory", succeed())
        await operations.act("to-retry", Action.RETRY, by="ada")
        await operations.act("to-resolve", Action.RESOLVE, by="ada", reason="refunded by hand")
        inventory.on("reserve_inventory", hang())
        await h.start("order_fulfillment", "aborted", order("aborted"))
        await operations.act("aborted", Action.ABORT, by="grace")
        await h.settle()
        await h.orchestrator.refresh_gauges()

        counts = await h.store.count_by_status()
        histories = [
            (await h.record(listed.state.saga_id)).state.history
            for listed in await h.store.find(SagaFilter())
        ]
    await store.close()

    assert counts == {
        ("order_fulfillment", "completed"): 1,
        ("order_fulfillment", "failed"): 4,
        ("order_fulfillment", "stuck"): 2,
    }

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, {**KIND, **labels}) or 0.0

    def total(name: str, **labels: str) -> float:
        return sum(
            s.value
            for metric in registry.collect()
            for s in metric.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def by_status(status: str) -> int:
        return counts.get(("order_fulfillment", status), 0)

    assert sample("saga_started_total") == sum(counts.values())
    assert sample("saga_completed_total") == by_status("completed")
    assert sample("saga_failed_total") == by_status("failed")
    retried_or_resolved = sample("saga_operator_actions_total", action="retry") + sample(
        "saga_operator_actions_total", action="resolve"
    )
    assert sample("saga_stuck_total") - retried_or_resolved == by_status("stuck")
    for action in ("retry", "abort", "resolve"):
        assert sample("saga_operator_actions_total", action=action) == 1
    for status in ("started", "pending", "compensating", "stuck"):
        assert sample("saga_active", status=status) == by_status(status)
    for status in ("completed", "failed"):  # finished sagas are the totals' business
        assert registry.get_sample_value("saga_active", {**KIND, "status": status}) is None

    recorded = recorded_outcomes(histories)
    assert recorded["timed_out"] > 0
    for outcome in ("completed", "failed", "timed_out"):
        counted = total("saga_compensations_total", outcome=outcome)
        assert counted == recorded[outcome], outcome
    assert total("saga_step_outcomes_total", outcome="completed") == recorded["step_completed"]

    operators = {entry.by for history in histories for entry in history if entry.by}
    assert operators == {"ada", "grace"}
