"""The transactional payment example through the harness, on PostgreSQL and in memory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import pytest

from examples.order_fulfillment import app
from examples.order_fulfillment import payment_ledger as example
from orchestrator.state import SagaStatus
from orchestrator.testing import SagaHarness, fail
from participants.idempotency import MemoryIdempotency
from participants.idempotency_stores import PostgresIdempotency

ORDER = {
    "customer_id": "c-1",
    "items": [{"sku": "SKU-1", "quantity": 2, "unit_price": "12.50"}],
    "payment_method": "card",
    "shipping_address": "1 Main St",
}


@pytest.fixture
async def on_postgres(database_url: str) -> AsyncIterator[str]:
    """The example's service on a PostgreSQL idempotency store of its own."""
    store = PostgresIdempotency(database_url)
    example.payment.idempotency = store
    example._schema_ready = False
    try:
        yield database_url
    finally:
        example.payment.idempotency = MemoryIdempotency()
        await store.close()


@pytest.mark.postgres
async def test_charges_and_refunds_are_rows_in_the_outcomes_transaction(on_postgres: str) -> None:
    async with SagaHarness(app).mount(example.payment) as h:
        h.participant("shipping").on("create_shipment", fail("no such street"), fail())
        await h.start("order_fulfillment", "o-ok", {**ORDER, "order_id": "o-ok"})
        await h.start("order_fulfillment", "o-undone", {**ORDER, "order_id": "o-undone"})
        states = [await h.saga(saga_id) for saga_id in ("o-ok", "o-undone")]
    assert [s.status for s in states] == [SagaStatus.FAILED, SagaStatus.FAILED]
    db = await asyncpg.connect(on_postgres)
    try:
        rows = await db.fetch("SELECT order_id, kind, amount FROM payments ORDER BY at, kind")
        outcomes = await db.fetchval(
            "SELECT count(*) FROM saga_idempotency WHERE kind = 'completed'"
        )
    finally:
        await db.close()
    assert sorted((r["order_id"], r["kind"], r["amount"]) for r in rows) == [
        ("o-ok", "charge", Decimal("25.00")),
        ("o-ok", "refund", Decimal("25.00")),
        ("o-undone", "charge", Decimal("25.00")),
        ("o-undone", "refund", Decimal("25.00")),
    ]
    assert outcomes == 4


async def test_without_a_database_the_rows_go_to_memory() -> None:
    async with SagaHarness(app).mount(example.payment) as h:
        await h.start("order_fulfillment", "o-mem", {**ORDER, "order_id": "o-mem"})
        assert (await h.saga("o-mem")).status is SagaStatus.COMPLETED
    assert example.in_memory["o-mem"] == [("charge", Decimal("25.00"))]
