"""A failure isolates one saga, never the daemon.

The orchestrator runs (consumers and every background loop) over a real PostgreSQL store
while sagas that cannot be handled are injected: a document whose state does not validate
(the sweep meets it), one whose outbox does not (the relay meets it), one whose steps do not
match its definition (deciding about it raises), and a store whose purge and gauge queries
fail once. The daemon stays ready, the bad sagas are held for an operator with the reason,
the loops count their errors, and a healthy saga is still swept on time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from contracts import names
from examples.order_fulfillment import app
from orchestrator.metrics import Metrics
from orchestrator.runtime import EngineConfig, Orchestrator
from orchestrator.state import SagaStatus, StepState, StepStatus
from orchestrator.store import SagaRecord
from orchestrator.stores.postgres import PostgresStore
from plumbing.memory import MemoryBroker, VirtualClock
from plumbing.transport import Delivery, Disposition
from tests.support.stores import own_table

pytestmark = pytest.mark.postgres

ORDER = {
    "customer_id": "c-1",
    "items": [{"sku": "SKU-1", "quantity": 2, "unit_price": "12.50"}],
    "payment_method": "card",
    "shipping_address": "1 Main St",
}


class FlakyStore(PostgresStore):
    """A store whose purge and status count fail the first time, as a bug would."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failed: set[str] = set()

    async def purge(self, now: datetime) -> int:
        if "purge" not in self.failed:
            self.failed.add("purge")
            raise RuntimeError("a bug in the purge")
        return await super().purge(now)

    async def count_by_status(self) -> dict[tuple[str, str], int]:
        if "gauges" not in self.failed:
            self.failed.add("gauges")
            raise RuntimeError("a bug in the gauges")
        return await super().count_by_status()


@pytest.fixture
async def store(postgres_url: str, unique: str) -> AsyncIterator[FlakyStore]:
    async with own_table(FlakyStore(postgres_url, table=f"saga_isolation_{unique}")) as store:
        yield store


async def insert_raw(store: PostgresStore, saga_id: str, state: object, outbox: object) -> None:
    """A row written by hand, due now and with an outbox waiting: what a damaged row looks like."""
    past = datetime(2025, 1, 1, tzinfo=VirtualClock().now().tzinfo)
    async with store.pool.connection() as connection:
        await connection.execute(
            f"""INSERT INTO "{store.table}" (saga_id, saga_type, status, version, state, outbox,
                    next_due_at, outbox_since, created_at, updated_at)
                VALUES ($1, 'order_fulfillment', 'started', 1, $2, $3, $4, $4, $4, $4)""",
            saga_id,
            state,
            outbox,
            past,
        )


async def held_reason(store: PostgresStore, saga_id: str) -> str | None:
    async with store.pool.connection() as connection:
        reason: str | None = await connection.fetchval(
            f'SELECT held_reason FROM "{store.table}" WHERE saga_id = $1',
            saga_id,
        )
    return reason


async def test_poisoned_sagas_are_held_and_every_loop_keeps_running(store: FlakyStore) -> None:
    clock = VirtualClock()
    broker = MemoryBroker(clock)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    config = EngineConfig(
        sweep_interval=1, relay_interval=1, purge_interval=1, gauge_interval=1, outbox_grace=0
    )
    orchestrator = Orchestrator(app, store, broker, clock=clock, config=config, metrics=metrics)
    await broker.declare(orchestrator.topology)

    # A healthy saga whose first step will time out: the sweep must still reach it.
    await orchestrator.start("order_fulfillment", "healthy", {**ORDER, "order_id": "healthy"})
    # A damaged state, met by the sweep; a damaged outbox, met by the relay.
    await insert_raw(store, "bad-state", {"saga_id": "bad-state", "garbage": True}, [])
    await insert_raw(store, "bad-outbox", {"saga_id": "bad-outbox"}, [{"not": "a message"}])
    # A valid document whose steps do not match its definition: deciding about it raises.
    good = await store.load("healthy")
    assert good is not None
    extra = StepState(name="gone", status=StepStatus.RUNNING, attempt=1, due_at=clock.now())
    mismatched = replace(good.state, saga_id="mismatched", steps=(*good.state.steps, extra))
    assert await store.create(SagaRecord(mismatched, 1))

    async def unanswered(delivery: Delivery) -> Disposition:
        return Disposition.ACK  # participants that never answer: steps time out

    task = asyncio.create_task(orchestrator.run())
    services = [
        asyncio.create_task(broker.consume(names.command_queue(service), unanswered))
        for service in sorted(app.services)
    ]
    try:
        async with asyncio.timeout(60):
            await orchestrator.ready.wait()
        await broker.advance(timedelta(minutes=3))  # every loop runs many rounds
        assert orchestrator.ready.is_set()
        assert not task.done()

        for saga_id, why in (
            ("bad-state", "state cannot be read"),
            ("bad-outbox", "outbox cannot be read"),
            ("mismatched", "failed"),
        ):
            reason = await held_reason(store, saga_id)
            assert reason is not None, f"{saga_id} was not held"
            assert why in reason
        healthy = await store.load("healthy")
        assert healthy is not None
        assert healthy.state.status is SagaStatus.COMPENSATING  # its timeout fired on time
        assert registry.get_sample_value("saga_loop_errors_total", {"loop": "purge"}) == 1
        assert registry.get_sample_value("saga_loop_errors_total", {"loop": "gauges"}) == 1
        held = registry.get_sample_value(
            "saga_held", {"saga_type": "order_fulfillment", "waiting_for": "operator"}
        )
        assert held == 3
    finally:
        orchestrator.stop()
        async with asyncio.timeout(60):
            await task
        for service in services:
            service.cancel()
        await asyncio.gather(*services, return_exceptions=True)
    assert json.dumps(store.failed, default=sorted) == '["gauges", "purge"]'
