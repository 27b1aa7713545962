"""The embedded in-memory broker and a virtual clock: the demo and the test harness run on them.

The broker follows RabbitMQ's routing rules (direct, topic and fanout exchanges, exchange to
exchange bindings, the default exchange addressing a queue by name) and raises on an
unroutable mandatory publish, so code that works here does not meet new failure modes on
RabbitMQ. Delayed messages wait on the broker's clock.

With a :class:`VirtualClock`, the broker and the clock count outstanding work together: a
message queued or being handled is *busy*, a handler sleeping on the virtual clock is not.
``settle()`` waits until nothing is busy, and ``advance()`` moves time to the next due
message or sleeper, so a saga with a fifteen-minute timeout runs in milliseconds.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from plumbing.errors import PublishFailed, QueueNotFound
from plumbing.topology import BindingSpec, Topology
from plumbing.transport import DeadLetter, Delivery, Disposition, Handler, Outgoing

_QUICK_TURNS = 1000  # event-loop turns before settle() starts sleeping between checks


class VirtualClock:
    """A clock that only moves when told to, and knows which tasks are busy."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._sleepers: list[
            tuple[datetime, int, asyncio.Future[None], asyncio.Task[Any] | None]
        ] = []
        self._sequence = itertools.count()
        self.busy = 0
        self._counted: set[asyncio.Task[Any]] = set()

    def now(self) -> datetime:
        """The virtual instant."""
        return self._now

    async def sleep(self, seconds: float) -> None:
        """Wait until the clock has been advanced past ``seconds`` from now."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.current_task()
        heapq.heappush(
            self._sleepers,
            (self._now + timedelta(seconds=seconds), next(self._sequence), future, task),
        )
        self.release(task)
        await future

    # --- busy accounting (shared with MemoryBroker) ---

    def hold(self, task: asyncio.Task[Any] | None) -> None:
        """Count ``task`` as busy (until it sleeps again or ends)."""
        if task is not None and task not in self._counted:
            self._counted.add(task)
            self.busy += 1
            # A task woken from a sleep may be cancelled before it sleeps again (a claim's
            # renewal when its handler returns): ending must stop counting it too.
            task.add_done_callback(self.release)

    def release(self, task: asyncio.Task[Any] | None) -> None:
        """Stop counting ``task`` as busy."""
        if task is not None and task in self._counted:
            self._counted.discard(task)
            self.busy -= 1
            task.remove_done_callback(self.release)

    def next_wake(self) -> datetime | None:
        """When the earliest live sleeper wakes."""
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
        return self._sleepers[0][0] if self._sleepers else None

    def cancel_sleepers(self) -> None:
        """Cancel every sleep in progress (shutting down: the time they wait for never comes)."""
        for _, _, future, _ in self._sleepers:
            future.cancel()
        self._sleepers.clear()

    def set(self, instant: datetime) -> None:
        """Move the clock (never backwards) and wake every sleeper now due."""
        self._now = max(self._now, instant)
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future, task = heapq.heappop(self._sleepers)
            if not future.done():
                self.hold(task)  # it will run: busy until it sleeps again or finishes
                future.set_result(None)


@dataclass
class _Queue:
    name: str
    items: deque[Delivery] = field(default_factory=deque)
    waiter: asyncio.Event = field(default_factory=asyncio.Event)


class MemoryBroker:
    """An in-process message broker that implements :class:`~plumbing.transport.Transport`.

    Args:
        clock: the clock delayed messages wait on; a :class:`VirtualClock` also gets busy
            accounting for :meth:`settle`.
        prefetch: how many deliveries one consumer handles at once.
    """

    def __init__(
        self,
        clock: VirtualClock,
        *,
        prefetch: int = 16,
        on_dead_lettered: Callable[[str, str], None] | None = None,
    ) -> None:
        self.clock = clock
        self.prefetch = prefetch
        self.on_dead_lettered = on_dead_lettered
        """Called with the queue and label of every labelled message parked (a metric)."""
        self._exchanges: dict[str, str] = {"": "direct"}
        self._queues: dict[str, _Queue] = {}
        self._bindings: list[BindingSpec] = []
        self._delayed: list[tuple[datetime, int, Outgoing]] = []
        self._sequence = itertools.count()
        self.published: list[Outgoing] = []
        """Every message accepted, in order (immediate and delayed)."""
        self.parked: list[tuple[Delivery, str]] = []
        """Dead-lettered deliveries with their reasons."""

    # --- Transport ---

    async def declare(self, topology: Topology) -> None:
        """Add exchanges, queues and bindings (idempotent)."""
        for exchange in topology.exchanges:
            self._exchanges.setdefault(exchange.name, exchange.type)
        for queue in topology.queues:
            self._queues.setdefault(queue.name, _Queue(queue.name))
        for binding in topology.bindings:
            if binding not in self._bindings:
                self._bindings.append(binding)

    async def publish(self, message: Outgoing) -> None:
        """Route now, or hold until ``deliver_at``; raise on an unroutable mandatory message."""
        if message.exchange not in self._exchanges:
            raise PublishFailed(f"no exchange {message.exchange!r} (channel would be closed: 404)")
        if message.deliver_at is not None and message.deliver_at > self.clock.now():
            if message.exchange != "" or message.routing_key not in self._queues:
                raise PublishFailed(
                    f"delayed messages must address a declared queue, not {message.routing_key!r}"
                )
            heapq.heappush(self._delayed, (message.deliver_at, next(self._sequence), message))
            self.published.append(message)
            return
        queues = self._route(message.exchange, message.routing_key, set())
        if not queues and message.mandatory:
            raise PublishFailed(
                f"message {message.message_id} to {message.exchange or '(default)'}/"
                f"{message.routing_key} was returned: no queue is bound"
            )
        self.published.append(message)
        for queue in queues:
            self._enqueue(queue, message)

    async def consume(
        self, queue: str, handler: Handler, *, ready: asyncio.Event | None = None
    ) -> None:
        """Hand deliveries to ``handler`` (up to ``prefetch`` at once) until cancelled.

        On cancellation the consumer stops taking deliveries and waits for those in flight.
        """
        if queue not in self._queues:
            raise QueueNotFound(f"cannot consume from undeclared queue {queue!r}")
        source = self._queues[queue]
        slots = asyncio.Semaphore(self.prefetch)
        in_flight: set[asyncio.Task[None]] = set()
        if ready is not None:
            ready.set()
        try:
            while True:
                while not source.items:
                    source.waiter.clear()
                    await source.waiter.wait()
                await slots.acquire()
                if not source.items:
                    slots.release()
                    continue
                delivery = source.items.popleft()
                task = asyncio.create_task(self._handle(source, delivery, handler, slots))
                self.clock.hold(task)
                self.clock.busy -= 1  # the queued message's unit moves to its handler task
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        finally:
            if in_flight:
                await asyncio.shield(asyncio.gather(*in_flight, return_exceptions=True))

    async def close(self) -> None:
        """Nothing to release."""

    # --- internals ---

    async def _handle(
        self, source: _Queue, delivery: Delivery, handler: Handler, slots: asyncio.Semaphore
    ) -> None:
        try:
            verdict = await handler(delivery)
            if verdict is Disposition.REQUEUE:
                source.items.appendleft(
                    Delivery(
                        queue=delivery.queue,
                        body=delivery.body,
                        headers=delivery.headers,
                        message_id=delivery.message_id,
                        correlation_id=delivery.correlation_id,
                        routing_key=delivery.routing_key,
                        redelivered=True,
                    )
                )
                self.clock.busy += 1
                source.waiter.set()
            elif isinstance(verdict, DeadLetter):
                self.parked.append((delivery, verdict.reason))
                if verdict.label is not None and self.on_dead_lettered is not None:
                    self.on_dead_lettered(delivery.queue, verdict.label)
        finally:
            slots.release()
            self.clock.release(asyncio.current_task())

    def _enqueue(self, queue: str, message: Outgoing) -> None:
        target = self._queues[queue]
        target.items.append(
            Delivery(
                queue=queue,
                body=message.body.encode(),
                headers=dict(message.headers),
                message_id=message.message_id,
                correlation_id=message.correlation_id,
                routing_key=message.routing_key,
            )
        )
        self.clock.busy += 1
        target.waiter.set()

    def _route(self, exchange: str, routing_key: str, visited: set[str]) -> set[str]:
        if exchange == "":
            return {routing_key} if routing_key in self._queues else set()
        visited.add(exchange)
        kind = self._exchanges.get(exchange, "direct")
        queues: set[str] = set()
        for binding in self._bindings:
            if binding.source != exchange or not _matches(kind, binding.routing_key, routing_key):
                continue
            if binding.to_exchange:
                if binding.destination not in visited:
                    queues |= self._route(binding.destination, routing_key, visited)
            elif binding.destination in self._queues:
                queues.add(binding.destination)
        return queues

    def next_delivery(self) -> datetime | None:
        """When the earliest delayed message is due."""
        return self._delayed[0][0] if self._delayed else None

    def release_due(self) -> None:
        """Deliver every delayed message whose time has come."""
        now = self.clock.now()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, message = heapq.heappop(self._delayed)
            self._enqueue(message.routing_key, message)

    # --- helpers for tests and the demo ---

    def depth(self, queue: str) -> int:
        """Messages waiting in ``queue``."""
        return len(self._queues[queue].items)

    async def settle(self, limit: float = 30.0) -> None:
        """Wait until no message is queued or being handled (sleepers excepted).

        Handlers over a real store await real I/O, so after the first quick turns of the event
        loop this waits in small real sleeps, up to ``limit`` seconds.
        """
        loop = asyncio.get_running_loop()
        give_up = loop.time() + limit
        turns = 0
        while self.clock.busy > 0:
            turns += 1
            await asyncio.sleep(0 if turns < _QUICK_TURNS else 0.001)
            if loop.time() > give_up:
                raise RuntimeError(
                    f"the in-memory broker did not settle within {limit}s: a handler is "
                    "waiting on something other than the virtual clock"
                )

    async def advance(self, delta: timedelta) -> None:
        """Move virtual time forward by ``delta``, delivering timers and waking sleepers."""
        target = self.clock.now() + delta
        while True:
            await self.settle()
            upcoming = [t for t in (self.next_delivery(), self.clock.next_wake()) if t is not None]
            if not upcoming or min(upcoming) > target:
                break
            self.clock.set(min(upcoming))
            self.release_due()
        self.clock.set(target)
        self.release_due()
        await self.settle()


def _matches(kind: str, pattern: str, routing_key: str) -> bool:
    if kind == "fanout":
        return True
    if kind == "direct":
        return pattern == routing_key
    return _topic_match(tuple(pattern.split(".")), tuple(routing_key.split(".")))


@functools.lru_cache(maxsize=4096)
def _topic_match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` zero or more."""
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_topic_match(rest, words[skip:]) for skip in range(len(words) + 1))
    if not words:
        return False
    return (head in ("*", words[0])) and _topic_match(rest, words[1:])
