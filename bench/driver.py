"""The client side of a run: start order sagas over RabbitMQ and watch them end.

Starts are ``StartSaga`` messages published to ``saga.start`` (persistent, confirmed), as any
client of the orchestrator sends them. Ends are the lifecycle events ``SagaCompleted``,
``SagaFailed`` and ``SagaStuck``, read from the ``saga.events`` topic exchange through a
queue of the driver's own, so it works the same with every store (a memory store lives inside
the daemon and cannot be read from outside).

Two load shapes: :meth:`Driver.closed_loop` keeps a fixed number of sagas in flight (a new
one starts as one ends); :meth:`Driver.open_loop` starts sagas at a fixed mean rate (Poisson
arrivals) whatever the system does, which is what a latency figure needs.

The optional taps (:meth:`Driver.tap`) bind extra, non-durable queues to ``saga.replies`` and
``saga.commands`` to see every reply and command with the instant it passed the broker.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from contracts import names
from contracts.messages import StartSaga

SAGA_TYPE = "order_fulfillment"
END_EVENTS = ("SagaCompleted", "SagaFailed", "SagaStuck")
DECLINE_EVERY = 10
"""Every tenth order is declined at payment and compensated (10%)."""
COMMANDS_PER_DECLINED = 3  # reserve, payment (refused), release
COMMANDS_PER_COMPLETED = 4


def order_data(order_id: str, n: int, simulate: dict[str, str] | None = None) -> dict[str, Any]:
    """The data of one order; every tenth is declined at payment unless ``simulate`` is given."""
    if simulate is None:
        simulate = {"process_payment": "fail"} if n % DECLINE_EVERY == DECLINE_EVERY - 1 else {}
    return {
        "order_id": order_id,
        "customer_id": f"cust-{n % 97}",
        "items": [{"sku": f"SKU-{n % 13}", "quantity": 1 + n % 3, "unit_price": "19.99"}],
        "payment_method": "card",
        "shipping_address": f"{n} Bench Street",
        "simulate": simulate,
    }


@dataclass
class RunResult:
    """What one load phase did."""

    started: int
    ended: dict[str, int]
    seconds: float
    first_start: float
    last_end: float
    timed_out: bool = False

    @property
    def finished(self) -> int:
        """Sagas that reached an end."""
        return sum(self.ended.values())


@dataclass
class TapRecord:
    """A reply or command seen by a tap queue."""

    kind: str
    saga_id: str
    step: str
    direction: str
    status: str | None
    sent_at: float
    """The sender's timestamp in the message body (reply: the participant; command: the
    orchestrator's decision time), seconds since the epoch."""
    seen_at: float
    """When the tap received it, seconds since the epoch."""


@dataclass
class Driver:
    """Starts sagas and watches them end, on one broker vhost."""

    url: str
    prefix: str
    connection: AbstractRobustConnection | None = None
    channel: AbstractChannel | None = None
    start_exchange: AbstractExchange | None = None
    _waiters: dict[str, asyncio.Future[str]] = field(default_factory=dict)
    _ended: dict[str, str] = field(default_factory=dict)
    _watched_keys: tuple[str, ...] = END_EVENTS
    taps: list[TapRecord] = field(default_factory=list)
    _counter: int = 0
    _on_event: Callable[[str, str], None] | None = None

    async def open(self, watch: tuple[str, ...] = END_EVENTS) -> None:
        """Connect, and bind a private queue to the lifecycle events in ``watch``."""
        self.connection = await aio_pika.connect_robust(self.url)
        self.channel = await self.connection.channel(publisher_confirms=True)
        self.start_exchange = await self.channel.get_exchange(names.START_EXCHANGE, ensure=True)
        events = await self.channel.get_exchange(names.EVENTS_EXCHANGE, ensure=True)
        listen = await self.connection.channel()
        await listen.set_qos(prefetch_count=1000)
        queue = await listen.declare_queue(
            f"bench.ends.{self.prefix}", exclusive=True, auto_delete=True
        )
        for event in watch:
            await queue.bind(events, routing_key=names.event_routing_key(SAGA_TYPE, event))
        self._watched_keys = watch
        await queue.consume(self._on_lifecycle, no_ack=True)

    async def close(self) -> None:
        """Disconnect."""
        if self.connection is not None:
            await self.connection.close()

    async def _on_lifecycle(self, message: AbstractIncomingMessage) -> None:
        event = json.loads(message.body)
        saga_id = str(event["saga_id"])
        name = str(event["event"])
        if self._on_event is not None:
            self._on_event(saga_id, name)
        if name not in END_EVENTS:
            return
        self._ended[saga_id] = name
        waiter = self._waiters.pop(saga_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(name)

    def next_id(self) -> tuple[str, int]:
        """A new saga id and its sequence number."""
        n = self._counter
        self._counter += 1
        return f"{self.prefix}-{n:07d}", n

    async def start(self, saga_id: str, data: dict[str, Any]) -> None:
        """Publish a start request and wait for the broker's confirm."""
        assert self.start_exchange is not None, "open() first"
        request = StartSaga(saga_type=SAGA_TYPE, saga_id=saga_id, data=data)
        message_id = f"{saga_id}:start"
        message = aio_pika.Message(
            request.model_dump_json().encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=saga_id,
            message_id=message_id,
            headers={names.HEADER_MESSAGE_ID: message_id, names.HEADER_SAGA_ID: saga_id},
        )
        await self.start_exchange.publish(message, names.START_ROUTING_KEY, mandatory=True)

    async def _one(self, simulate: dict[str, str] | None) -> str:
        saga_id, n = self.next_id()
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters[saga_id] = waiter
        await self.start(saga_id, order_data(saga_id, n, simulate))
        return await waiter

    async def closed_loop(
        self, count: int, in_flight: int, within: float, simulate: dict[str, str] | None = None
    ) -> RunResult:
        """Run ``count`` sagas with ``in_flight`` of them running at any time."""
        slots = asyncio.Semaphore(in_flight)
        ended: dict[str, int] = {}
        first = time.perf_counter()
        last = first

        async def one() -> None:
            nonlocal last
            try:
                name = await self._one(simulate)
                ended[name] = ended.get(name, 0) + 1
                last = time.perf_counter()
            finally:
                slots.release()

        timed_out = False
        started = 0
        try:
            async with asyncio.timeout(within), asyncio.TaskGroup() as group:
                for _ in range(count):
                    await slots.acquire()
                    group.create_task(one())
                    started += 1
        except TimeoutError:
            timed_out = True
        return RunResult(started, ended, last - first, first, last, timed_out)

    async def open_loop(
        self, rate: float, seconds: float, within: float, seed: int = 12
    ) -> RunResult:
        """Start sagas at ``rate`` per second (Poisson arrivals) for ``seconds``."""
        rng = random.Random(seed)
        ended: dict[str, int] = {}
        first = time.perf_counter()
        last = first
        started = 0

        async def one() -> None:
            nonlocal last
            name = await self._one(None)
            ended[name] = ended.get(name, 0) + 1
            last = time.perf_counter()

        timed_out = False
        try:
            async with asyncio.timeout(within), asyncio.TaskGroup() as group:
                due = first
                while due - first < seconds:
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    group.create_task(one())
                    started += 1
                    due += rng.expovariate(rate)
        except TimeoutError:
            timed_out = True
        return RunResult(started, ended, last - first, first, last, timed_out)

    async def park(self, count: int, hang_step: str, within: float, concurrency: int = 50) -> int:
        """Start ``count`` sagas whose ``hang_step`` never answers; wait until each started it.

        Returns how many were seen starting that step (from ``SagaStepStarted`` events; the
        driver must have been opened watching that event).
        """
        seen: set[str] = set()
        done = asyncio.Event()
        mine: set[str] = set()

        def on_event(saga_id: str, name: str) -> None:
            if name == "SagaStepStarted" and saga_id in mine:
                seen.add(saga_id)
                if len(seen) >= count:
                    done.set()

        self._on_event = on_event
        slots = asyncio.Semaphore(concurrency)

        async def one() -> None:
            try:
                saga_id, n = self.next_id()
                mine.add(saga_id)
                await self.start(saga_id, order_data(saga_id, n, {hang_step: "hang"}))
            finally:
                slots.release()

        try:
            async with asyncio.timeout(within):
                async with asyncio.TaskGroup() as group:
                    for _ in range(count):
                        await slots.acquire()
                        group.create_task(one())
                if count:
                    await done.wait()
        except TimeoutError:
            pass
        finally:
            self._on_event = None
        return len(seen)

    async def tap(self) -> list[AbstractQueue]:
        """Copy every reply and command to private non-durable queues and record them."""
        assert self.connection is not None, "open() first"
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=2000)
        replies = await channel.get_exchange(names.REPLIES_EXCHANGE, ensure=True)
        commands = await channel.get_exchange(names.COMMANDS_EXCHANGE, ensure=True)
        reply_tap = await channel.declare_queue(
            f"bench.tap.replies.{self.prefix}", exclusive=True, auto_delete=True
        )
        await reply_tap.bind(replies, routing_key=names.REPLIES_ROUTING_KEY)
        command_tap = await channel.declare_queue(
            f"bench.tap.commands.{self.prefix}", exclusive=True, auto_delete=True
        )
        for service in ("inventory", "payment", "shipping", "notification"):
            await command_tap.bind(commands, routing_key=service)
        await reply_tap.consume(self._on_tap, no_ack=True)
        await command_tap.consume(self._on_tap, no_ack=True)
        return [reply_tap, command_tap]

    async def _on_tap(self, message: AbstractIncomingMessage) -> None:
        seen = time.time()
        body = json.loads(message.body)
        self.taps.append(
            TapRecord(
                kind=str(body.get("kind")),
                saga_id=str(body["saga_id"]),
                step=str(body.get("step")),
                direction=str(body.get("direction")),
                status=body.get("status"),
                sent_at=datetime.fromisoformat(str(body["sent_at"])).timestamp(),
                seen_at=seen,
            )
        )


def expected_commands(ended: dict[str, int]) -> int:
    """Commands the participants should have handled for these ends (no retries)."""
    return (
        ended.get("SagaCompleted", 0) * COMMANDS_PER_COMPLETED
        + ended.get("SagaFailed", 0) * COMMANDS_PER_DECLINED
    )
