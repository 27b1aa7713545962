"""The client a service starts sagas with, against the real broker and a running orchestrator.

The orchestrator and the example's four services run in this process over RabbitMQ (on a
virtual host of the test's own), with the in-memory saga store.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from examples.order_fulfillment import app, inventory, notification, payment, shipping
from orchestrator.client import SagaClient
from orchestrator.runtime import Orchestrator
from orchestrator.stores.memory import MemoryStore
from plumbing.errors import InvalidSagaData, SagaNotFound, StartRefused, UnknownSagaType
from plumbing.rabbitmq import RabbitTransport

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(600)]


def order(order_id: str, **simulate: str) -> dict[str, object]:
    return {
        "order_id": order_id,
        "customer_id": "c-1",
        "items": [{"sku": "SKU-1", "quantity": 2, "unit_price": "12.50"}],
        "payment_method": "card",
        "shipping_address": "1 Main St",
        "simulate": simulate,
    }


@pytest.fixture
async def running(vhost_url: str) -> AsyncIterator[str]:
    """The orchestrator and the four services, running until the test ends."""
    transports = [RabbitTransport(vhost_url, prefetch=64) for _ in range(5)]
    orchestrator = Orchestrator(app, MemoryStore(), transports[0])
    async with asyncio.TaskGroup() as group:
        daemon = group.create_task(orchestrator.run())
        services = [
            group.create_task(service.run(transport))
            for service, transport in zip(
                (inventory, payment, shipping, notification), transports[1:], strict=True
            )
        ]
        async with asyncio.timeout(60):
            await orchestrator.ready.wait()
        try:
            yield vhost_url
        finally:
            orchestrator.stop()
            await daemon
            for task in services:
                task.cancel()
            for transport in transports:
                await transport.close()


async def test_a_started_saga_is_accepted_and_its_outcome_comes_with_the_results(
    running: str,
) -> None:
    async with SagaClient(running, app=app) as client:
        handle = await client.start("order_fulfillment", "ok-1", order("ok-1"))
        assert handle.status.value == "started"
        assert handle.version == 1
        outcome = await handle.result(timeout=60)
        assert outcome.status == "completed"
        assert outcome.results["process_payment"]["payment_id"] == "pay-ok-1"
        assert outcome.results["create_shipment"]["shipment_id"] == "shp-ok-1"
        snapshot = await client.get("ok-1")
        assert snapshot.status == "completed"
        assert [step.status for step in snapshot.steps] == ["completed"] * 4
        # The same request again is idempotent, and its outcome is known at once.
        again = await client.start("order_fulfillment", "ok-1", order("ok-1"))
        assert again.status.value == "already_started"
        assert (await again.result(timeout=60)).status == "completed"


async def test_a_failed_saga_tells_why(running: str) -> None:
    async with SagaClient(running) as client:
        handle = await client.start(
            "order_fulfillment", "no-1", order("no-1", process_payment="fail")
        )
        outcome = await handle.result(timeout=60)
        assert outcome.status == "failed"
        assert outcome.failure_reason == "step process_payment failed (PaymentDeclined)"
        assert outcome.error is not None
        assert outcome.error.type == "PaymentDeclined"
        assert set(outcome.results) == {"reserve_inventory"}


@pytest.mark.parametrize(
    ("saga_type", "data", "says"),
    [
        ("no_such_saga", order("bad-1"), "no saga type 'no_such_saga'"),
        ("order_fulfillment", {"order_id": "bad-2"}, "customer_id: Field required"),
        (
            "order_fulfillment",
            order("bad-3", process_payment="explode"),
            "use fail, hang, error:N or slow:SECONDS",
        ),
    ],
)
async def test_the_orchestrator_refuses_with_the_reason(
    running: str, saga_type: str, data: dict[str, object], says: str
) -> None:
    async with SagaClient(running) as client:  # no app: the orchestrator decides
        with pytest.raises(StartRefused, match="was refused") as refused:
            await client.start(saga_type, str(data["order_id"]), data)
        assert says in str(refused.value)
        with pytest.raises(SagaNotFound):
            await client.get(str(data["order_id"]))


async def test_an_id_used_with_other_data_is_refused(running: str) -> None:
    async with SagaClient(running) as client:
        await client.start("order_fulfillment", "dup-1", order("dup-1"))
        other = {**order("dup-1"), "customer_id": "someone-else"}
        with pytest.raises(StartRefused, match="already exists with other data"):
            await client.start("order_fulfillment", "dup-1", other)


async def test_a_client_with_the_app_refuses_before_sending(running: str) -> None:
    async with SagaClient(running, app=app) as client:
        with pytest.raises(UnknownSagaType):
            await client.start("no_such_saga", "x-1", order("x-1"))
        with pytest.raises(InvalidSagaData, match="customer_id"):
            await client.start("order_fulfillment", "x-2", {"order_id": "x-2"})


async def test_waiting_for_a_saga_started_elsewhere(running: str) -> None:
    async with SagaClient(running) as starter, SagaClient(running) as watcher:
        with pytest.raises(SagaNotFound):
            await watcher.wait("w-1", timeout=60)
        await starter.start("order_fulfillment", "w-1", order("w-1", create_shipment="slow:2"))
        outcome = await watcher.wait("w-1", timeout=120)  # in flight when it asks
        assert outcome.status == "completed"
        assert (await watcher.get("w-1")).status == "completed"


async def test_a_thousand_concurrent_starts_and_waits_from_one_client(running: str) -> None:
    async def one(n: int) -> str:
        handle = await client.start("order_fulfillment", f"k-{n}", order(f"k-{n}"))
        return (await handle.result(timeout=500)).status

    async with SagaClient(running, answer_timeout=500) as client:
        statuses = await asyncio.gather(*(one(n) for n in range(1000)))
    assert statuses == ["completed"] * 1000
