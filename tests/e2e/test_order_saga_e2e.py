"""The order saga end to end: real RabbitMQ, real PostgreSQL, the daemon and the four services
as separate processes, under failures and chaos.

200 orders mixing success, ``fail`` at each step, ``hang`` at each step (3-second timeouts set
through ``SAGA_STEP_TIMEOUTS``), ``error:N`` below and above the retry budget, a compensation
that errors before it succeeds, and one that refuses (stuck). Meanwhile the orchestrator is
killed with SIGKILL and restarted, RabbitMQ is restarted, and garbage is published to the reply
queue. Every saga must reach the right terminal status with its compensations in reverse order.

The broker restart happens on a private node of the test's own (``tests/support/rabbit_nodes``),
never on the machine's shared RabbitMQ.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass

import aio_pika
import pytest

from contracts import names
from contracts.events import EventName
from contracts.messages import StartSaga
from orchestrator.processes import SagaProcesses
from orchestrator.state import SagaState
from orchestrator.store import SagaStore
from orchestrator.stores import open_store
from plumbing.clock import SystemClock
from plumbing.codec import start_message
from plumbing.errors import PublishFailed
from plumbing.rabbitmq import RabbitTransport
from plumbing.topology import QueuePolicy, orchestrator_topology
from tests.support.rabbit_nodes import RabbitNode

pytestmark = [
    pytest.mark.slow,
    pytest.mark.rabbitmq,
    pytest.mark.postgres,
    pytest.mark.timeout(600),
]

APP = "examples.order_fulfillment:app"
SERVICES = tuple(
    f"examples.order_fulfillment:{name}"
    for name in ("inventory", "payment", "shipping", "notification")
)
STEPS = ("reserve_inventory", "process_payment", "create_shipment", "send_confirmation")
TIMEOUTS = {f"order_fulfillment.{step}": 3 for step in STEPS}


@dataclass(frozen=True)
class Scenario:
    """What an order simulates and what must come of it."""

    name: str
    simulate: dict[str, str]
    status: str
    undone: tuple[str, ...]  # steps compensated, in order


SCENARIOS = (
    Scenario("ok", {}, "completed", ()),
    Scenario("fail@reserve", {"reserve_inventory": "fail"}, "failed", ()),
    Scenario("fail@pay", {"process_payment": "fail"}, "failed", ("reserve_inventory",)),
    Scenario(
        "fail@ship", {"create_shipment": "fail"}, "failed", ("process_payment", "reserve_inventory")
    ),
    Scenario("hang@reserve", {"reserve_inventory": "hang"}, "failed", ("reserve_inventory",)),
    Scenario(
        "hang@pay", {"process_payment": "hang"}, "failed", ("process_payment", "reserve_inventory")
    ),
    Scenario(
        "hang@ship",
        {"create_shipment": "hang"},
        "failed",
        ("create_shipment", "process_payment", "reserve_inventory"),
    ),
    Scenario("error:2@pay", {"process_payment": "error:2"}, "completed", ()),
    Scenario(
        "error:5@ship",
        {"create_shipment": "error:5"},
        "failed",
        ("process_payment", "reserve_inventory"),
    ),
    Scenario("error:3@confirm", {"send_confirmation": "error:3"}, "completed", ()),
    Scenario(
        "refund-errors",
        {"create_shipment": "fail", "refund_payment": "error:2"},
        "failed",
        ("process_payment", "reserve_inventory"),
    ),
    Scenario(
        "release-refused",
        {"process_payment": "fail", "release_inventory": "fail"},
        "stuck",
        (),
    ),
)


def orders(count: int) -> list[tuple[str, Scenario, dict[str, object]]]:
    """``count`` orders cycling through the scenarios."""
    made = []
    for n, scenario in zip(range(count), itertools.cycle(SCENARIOS), strict=False):
        order_id = f"e2e-{n:03d}-{scenario.name}"
        data = {
            "order_id": order_id,
            "customer_id": f"cust-{n % 17}",
            "items": [{"sku": f"SKU-{n % 5}", "quantity": 1 + n % 3, "unit_price": "9.99"}],
            "payment_method": "card",
            "shipping_address": f"{n} Test Street",
            "simulate": scenario.simulate,
        }
        made.append((order_id, scenario, data))
    return made


async def send_starts(
    transport: RabbitTransport, batch: list[tuple[str, Scenario, dict[str, object]]]
) -> None:
    """Publish start requests, retrying each while the broker is unreachable (as a client
    with an outbox would)."""
    for order_id, _, data in batch:
        request = StartSaga(saga_type="order_fulfillment", saga_id=order_id, data=data)
        async with asyncio.timeout(60):
            while True:
                try:
                    await transport.publish(start_message(request, SystemClock().now()))
                    break
                except PublishFailed:
                    await asyncio.sleep(0.5)


async def wait_until_settled(
    store: SagaStore, count: int, within: float
) -> dict[tuple[str, str], int]:
    """Poll the store until ``count`` sagas exist and none is active."""
    active = {"started", "pending", "compensating"}
    async with asyncio.timeout(within):
        while True:
            counts = await store.count_by_status()
            total = sum(counts.values())
            if total == count and not any(status in active for _, status in counts):
                return counts
            await asyncio.sleep(0.5)


def compensated_steps(state: SagaState) -> list[str]:
    return [
        entry.step or ""
        for entry in state.history
        if entry.event is EventName.COMPENSATION_COMPLETED
    ]


async def restart_rabbitmq(node: RabbitNode) -> None:
    """Stop the test's own broker node gracefully and start it again on the same data."""
    await asyncio.to_thread(node.restart, hard=False)


def environment(amqp: str, database: str, timeout: float) -> dict[str, str]:
    """Settings shared by every process of one run."""
    return {
        "SAGA_AMQP_URL": amqp,
        "SAGA_STORE_URL": database,
        "SAGA_IDEMPOTENCY_URL": database,
        "SAGA_STEP_TIMEOUTS": json.dumps({f"order_fulfillment.{s}": timeout for s in STEPS}),
        "SAGA_SWEEP_INTERVAL": "1",
        "SAGA_RELAY_INTERVAL": "1",
        "SAGA_OUTBOX_GRACE": "2",
        "SAGA_LOG_LEVEL": "error",
    }


async def check_outcomes(
    store: SagaStore, work: list[tuple[str, Scenario, dict[str, object]]]
) -> dict[tuple[str, str], int]:
    """Every saga ended as its scenario says, with its compensations in that order."""
    counts = await wait_until_settled(store, len(work), within=240)
    wrong = []
    for order_id, scenario, _ in work:
        record = await store.load(order_id)
        assert record is not None, f"{order_id} was lost"
        undone = tuple(compensated_steps(record.state))
        if record.state.status.value != scenario.status or undone != scenario.undone:
            wrong.append((order_id, record.state.status.value, undone))
    assert wrong == [], f"{len(wrong)} sagas ended wrongly: {wrong[:5]}"
    expected_stuck = sum(1 for _, s, _ in work if s.status == "stuck")
    assert counts.get(("order_fulfillment", "stuck"), 0) == expected_stuck
    return counts


async def test_200_orders_reach_the_right_end_and_garbage_is_parked(
    vhost_url: str, database_url: str
) -> None:
    processes = SagaProcesses(APP, SERVICES, environment(vhost_url, database_url, timeout=3))
    store = open_store(database_url)
    transport = RabbitTransport(vhost_url)
    work = orders(200)
    try:
        await processes.start()
        await transport.declare(orchestrator_topology((), QueuePolicy()))
        await send_starts(transport, work[:100])
        await publish_garbage_reply(vhost_url)
        await send_starts(transport, work[100:])
        await check_outcomes(store, work)
        parked = await parked_reasons(vhost_url)
        assert len(parked) == 1, parked
        assert "not a valid Reply" in parked[0]
        codes = await processes.stop()  # SIGTERM: finish in flight, flush, exit cleanly
        assert set(codes.values()) == {0}, codes
    finally:
        await processes.stop()
        await transport.close()
        await store.close()


async def test_200_orders_survive_a_killed_replica_and_a_broker_restart(
    private_rabbit: RabbitNode, database_url: str
) -> None:
    # Timeouts well beyond the outages, so that no step times out because of them and every
    # saga must end exactly as its scenario says. Two orchestrator replicas share the broker
    # and the store; one of them is killed.
    broker_url = private_rabbit.url  # a node of this test's own: the test restarts it
    processes = SagaProcesses(
        APP, SERVICES, environment(broker_url, database_url, timeout=30), replicas=2
    )
    store = open_store(database_url)
    transport = RabbitTransport(broker_url)
    work = orders(200)
    try:
        await processes.start()
        await transport.declare(orchestrator_topology((), QueuePolicy()))

        await send_starts(transport, work[:80])
        await asyncio.sleep(1.5)
        assert await processes.orchestrator.kill() == -9  # mid-run, sagas in every state
        await send_starts(transport, work[80:130])  # queued while no orchestrator runs
        await processes.orchestrator.start()
        await processes.orchestrator.wait_ready()

        await asyncio.sleep(1)
        await restart_rabbitmq(private_rabbit)
        await send_starts(transport, work[130:])

        await check_outcomes(store, work)
        assert await parked_reasons(broker_url) == []  # nothing was given up on
    finally:
        await processes.stop()
        await transport.close()
        await store.close()


async def publish_garbage_reply(url: str) -> None:
    """A message on the reply queue that is not a reply at all."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(names.REPLIES_EXCHANGE)
        garbage = aio_pika.Message(b"\x00 definitely not a reply", message_id="garbage-1")
        await exchange.publish(garbage, routing_key=names.REPLIES_ROUTING_KEY)


async def parked_reasons(url: str) -> list[str]:
    """The dead-letter reasons of every message in the parking queue."""
    reasons = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(names.PARKED_QUEUE)
        while (message := await queue.get(fail=False)) is not None:
            reasons.append(str(message.headers.get(names.HEADER_DEAD_LETTER_REASON, "")))
            await message.ack()
    return reasons
