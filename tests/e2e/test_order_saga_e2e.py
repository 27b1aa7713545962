"""The order saga end to end: real RabbitMQ, a real saga store (PostgreSQL, then MongoDB), the
daemon and the four services as separate processes, under failures and chaos.

200 orders mixing success, ``fail`` at each step, ``hang`` at each step, ``error:N`` below and
above the retry budget, a compensation that errors before it succeeds, and one that refuses
(stuck). Meanwhile the orchestrator is killed with SIGKILL and restarted, RabbitMQ is restarted,
and garbage is published to the reply queue. Every saga must reach the right terminal status
with its compensations in reverse order. The participants keep their idempotency outcomes in
the same store as the sagas.

Outcomes must not depend on the machine's speed: a hang never answers, so it times out however
long the timeout is, while a step that does answer must never be outlived by its timeout. So
the step timeouts (30 s and 60 s) are more than ten times what a step takes on a loaded
two-core machine (1-2.5 s seen at load 4-5), and start requests are paced so that at most
``IN_FLIGHT`` sagas are unfinished: a command never waits in a queue for longer than a bounded
backlog takes, whatever the number of orders. On SecantusDB, a MongoDB-compatible server in
Python whose commands share one interpreter lock, the runs take fewer orders (every scenario
four times) and a smaller backlog.

The broker restart happens on a private node of the test's own (``tests/support/rabbit_nodes``),
never on the machine's shared RabbitMQ.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pytest
from pymongo import AsyncMongoClient

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
from tests.integration.test_json_logs import json_lines
from tests.support.rabbit_nodes import RabbitNode

pytestmark = [
    pytest.mark.slow,
    pytest.mark.rabbitmq,
    pytest.mark.timeout(1200),
]

APP = "examples.order_fulfillment:app"
SERVICES = tuple(
    f"examples.order_fulfillment:{name}"
    for name in ("inventory", "payment", "shipping", "notification")
)
STEPS = ("reserve_inventory", "process_payment", "create_shipment", "send_confirmation")
IN_FLIGHT = 40
"""Unfinished sagas at most while start requests are sent (see the module docstring)."""
SECANTUS_ORDERS = 48
SECANTUS_IN_FLIGHT = 12
SETTLE_WITHIN = 600.0
"""Seconds for every saga to end once all are sent: about 30 s idle, 10x for a slow machine."""


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


Work = list[tuple[str, Scenario, dict[str, object]]]


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
            # Each poll reads every saga: on SecantusDB, a Python server whose commands share one
            # interpreter lock, polling twice a second took about a quarter of its time.
            await asyncio.sleep(2)


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
    counts = await wait_until_settled(store, len(work), within=SETTLE_WITHIN)
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


async def is_secantusdb(store_url: str) -> bool:
    """Whether the saga store is SecantusDB (fewer orders there: see the module docstring)."""
    if not store_url.startswith("mongodb"):
        return False
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
        store_url, serverSelectionTimeoutMS=10_000
    )
    try:
        info = await client.admin.command("buildInfo")
    finally:
        await client.close()
    return "secantusVersion" in info


async def sized_for(store_url: str) -> tuple[Work, int]:
    """The orders of a run on this store and how many may be unfinished at once."""
    if await is_secantusdb(store_url):
        return orders(SECANTUS_ORDERS), SECANTUS_IN_FLIGHT
    return orders(200), IN_FLIGHT


FINISHED = {"completed", "failed", "stuck"}


async def finished(store: SagaStore) -> int:
    """How many sagas have ended (completed, failed or stuck)."""
    counts = await store.count_by_status()
    return sum(n for (_, status), n in counts.items() if status in FINISHED)


async def send_paced(
    transport: RabbitTransport,
    store: SagaStore,
    work: Work,
    start: int,
    stop: int,
    *,
    in_flight: int = IN_FLIGHT,
) -> None:
    """Send the start requests of ``work[start:stop]``, keeping at most ``in_flight`` sagas
    unfinished.

    A command carries a deadline of its step timeout and a participant refuses it past that,
    so the outcome of a saga holds only while no command waits that long in a queue. A burst
    of hundreds of sagas on a loaded two-core machine breaks that (seen: commands over 60 s
    late); a bounded backlog keeps every outcome independent of the machine's speed.
    """
    async with asyncio.timeout(SETTLE_WITHIN):
        for n in range(start, stop):
            await wait_for(lambda sent=n: room_for_one(store, sent, in_flight))
            await send_starts(transport, work[n : n + 1])


async def room_for_one(store: SagaStore, sent: int, in_flight: int) -> bool:
    """Whether fewer than ``in_flight`` of the ``sent`` sagas are unfinished."""
    return sent - await finished(store) < in_flight


async def wait_for(condition: Callable[[], Awaitable[bool]], poll: float = 0.2) -> None:
    """Poll until ``condition()`` holds (the caller bounds the wait with a timeout)."""
    while not await condition():  # noqa: ASYNC110 - the store has no change feed to await
        await asyncio.sleep(poll)


async def test_200_orders_reach_the_right_end_and_garbage_is_parked(
    vhost_url: str, store_url: str
) -> None:
    work, in_flight = await sized_for(store_url)
    processes = SagaProcesses(APP, SERVICES, environment(vhost_url, store_url, timeout=30))
    store = open_store(store_url)
    transport = RabbitTransport(vhost_url)
    half = len(work) // 2
    try:
        await processes.start()
        await transport.declare(orchestrator_topology((), QueuePolicy()))
        await send_paced(transport, store, work, 0, half, in_flight=in_flight)
        await publish_garbage_reply(vhost_url)
        await send_paced(transport, store, work, half, len(work), in_flight=in_flight)
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
    private_rabbit: RabbitNode, store_url: str, tmp_path: Path
) -> None:
    work, in_flight = await sized_for(store_url)
    # Timeouts well beyond the outages, so that no step times out because of them and every
    # saga must end exactly as its scenario says. Two orchestrator replicas share the broker
    # and the store; one of them is killed.
    broker_url = private_rabbit.url  # a node of this test's own: the test restarts it
    # At info, so that the logs hold what a broker restart makes everyone say.
    env = {**environment(broker_url, store_url, timeout=60), "SAGA_LOG_LEVEL": "info"}
    processes = SagaProcesses(APP, SERVICES, env, replicas=2, log_dir=tmp_path)
    store = open_store(store_url)
    transport = RabbitTransport(broker_url)
    first, second = len(work) * 2 // 5, len(work) * 13 // 20
    try:
        await processes.start()
        await transport.declare(orchestrator_topology((), QueuePolicy()))

        await send_paced(transport, store, work, 0, first, in_flight=in_flight)
        # Mid-run, with sagas in every state: some finished, the rest on their way.
        async with asyncio.timeout(SETTLE_WITHIN):
            await wait_for(lambda: some_finished(store, first // 4))
        assert await processes.orchestrator.kill() == -9
        # Queued while no orchestrator runs: sent at once, not paced (nothing would finish).
        await send_starts(transport, work[first:second])
        await processes.orchestrator.start()
        await processes.orchestrator.wait_ready(within=180)

        async with asyncio.timeout(SETTLE_WITHIN):
            await wait_for(lambda: some_finished(store, first // 2))
        await restart_rabbitmq(private_rabbit)
        await send_paced(transport, store, work, second, len(work), in_flight=in_flight)

        await check_outcomes(store, work)
        assert await parked_reasons(broker_url) == []  # nothing was given up on
    finally:
        await processes.stop()
        await transport.close()
        await store.close()
    records = every_log_line_is_json(tmp_path)
    # aio-pika's and aiormq's own complaints about the lost connection came through as JSON.
    assert any(str(r.get("logger", "")).startswith(("aio_pika", "aiormq")) for r in records)


def every_log_line_is_json(log_dir: Path) -> list[dict[str, object]]:
    """Every line every daemon wrote, parsed; fails on the first that is not a JSON object."""
    return [record for log in sorted(log_dir.glob("*.log")) for record in json_lines(log)]


async def some_finished(store: SagaStore, count: int) -> bool:
    """Whether at least ``count`` sagas have ended."""
    return await finished(store) >= count


async def publish_garbage_reply(url: str) -> None:
    """A message on the reply queue that is not a reply at all."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(names.REPLIES_EXCHANGE)
        garbage = aio_pika.Message(b"\x00 definitely not a reply", message_id="garbage-1")
        await exchange.publish(garbage, routing_key=names.REPLIES_ROUTING_KEY)


async def parked_reasons(url: str) -> list[str]:
    """The dead-letter reason of every message in the parking queue, each followed by the
    queue it was parked from and its message id (what a failure needs to find it in logs)."""
    reasons = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(names.PARKED_QUEUE)
        while (message := await queue.get(fail=False)) is not None:
            headers = message.headers
            reasons.append(
                f"{headers.get(names.HEADER_DEAD_LETTER_REASON, '')} "
                f"[from {headers.get(names.HEADER_DEAD_LETTER_QUEUE, '?')}, "
                f"message {headers.get(names.HEADER_MESSAGE_ID, message.message_id)}]"
            )
            await message.ack()
    return reasons
