"""The RabbitMQ transport against the real broker: confirms, delays, parking, reconnects, shutdown.

Each test runs on a fresh virtual host (see ``rabbit_support``), so fixed names never collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest
from structlog.testing import capture_logs

from contracts import names
from plumbing.delays import DelayLadder
from plumbing.errors import BrokerUnavailable, ConfigError, PublishFailed, QueueNotFound
from plumbing.rabbitmq import RabbitTransport
from plumbing.topology import (
    QueuePolicy,
    QueueSpec,
    QueueType,
    Topology,
    base_topology,
    orchestrator_topology,
    participant_topology,
)
from plumbing.transport import DeadLetter, Delivery, Disposition, MessageKind, Outgoing
from tests.integration.rabbit_support import (
    queue_arguments,
    rabbitmqctl,
    temporary_vhost,
    with_vhost,
)

pytestmark = pytest.mark.rabbitmq

POLICY = QueuePolicy()
Verdict = Disposition | DeadLetter


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
def vhost(amqp_url: str) -> Iterator[str]:
    """A fresh virtual host for this test."""
    with temporary_vhost(amqp_url) as name:
        yield name


@pytest.fixture
def broker_url(amqp_url: str, vhost: str) -> str:
    """The URL of this test's virtual host."""
    return with_vhost(amqp_url, vhost)


@pytest.fixture
async def transport(broker_url: str) -> AsyncIterator[RabbitTransport]:
    """A connected transport, quick to give up on a publish and to reconnect."""
    async with RabbitTransport(
        broker_url, publish_timeout=5.0, reconnect_interval=0.5, prefetch=8
    ) as connected:
        yield connected


def work_queue(name: str) -> Topology:
    """The base topology plus one quorum work queue that parks poison messages."""
    return base_topology(POLICY) + Topology(queues=(QueueSpec(name, POLICY.arguments()),))


def message(
    routing_key: str,
    body: str = '{"ok": true}',
    *,
    message_id: str = "m-1",
    exchange: str = "",
    deliver_at: datetime | None = None,
    mandatory: bool = True,
) -> Outgoing:
    """An outgoing message like the codec builds, addressed to a queue by default."""
    return Outgoing(
        message_id=message_id,
        kind=MessageKind.EVENT,
        exchange=exchange,
        routing_key=routing_key,
        body=body,
        headers={names.HEADER_MESSAGE_ID: message_id, names.HEADER_SAGA_ID: "saga-1"},
        correlation_id="saga-1",
        mandatory=mandatory,
        deliver_at=deliver_at,
        created_at=datetime.now(UTC),
    )


@dataclass
class Recorder:
    """A handler that records deliveries (with their arrival time) and answers a verdict."""

    verdict: Callable[[Delivery], Verdict] = lambda _: Disposition.ACK
    deliveries: list[Delivery] = field(default_factory=list)
    arrivals: dict[str, datetime] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, delivery: Delivery) -> Verdict:
        self.deliveries.append(delivery)
        self.arrivals.setdefault(delivery.message_id or "", datetime.now(UTC))
        self.changed.set()
        return self.verdict(delivery)

    async def wait_for(self, count: int, within: float = 10.0) -> list[Delivery]:
        """Wait until ``count`` deliveries arrived."""
        async with asyncio.timeout(within):
            while len(self.deliveries) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.deliveries


@contextlib.asynccontextmanager
async def consuming(
    transport: RabbitTransport, queue: str, handler: Any
) -> AsyncIterator[asyncio.Task[None]]:
    """Consume ``queue`` in a task for the duration of the block, then stop it gracefully."""
    ready = asyncio.Event()
    task = asyncio.create_task(transport.consume(queue, handler, ready=ready))
    try:
        async with asyncio.timeout(10):
            await ready.wait()
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def ready_count(url: str, queue: str) -> int:
    """Messages ready in ``queue`` right now, asked over AMQP."""
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return count


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail after ``within`` seconds."""
    for _ in range(int(within / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not true within {within} s")


def broker_version() -> tuple[int, ...]:
    """The RabbitMQ server version, e.g. (3, 10, 8)."""
    return tuple(int(part) for part in rabbitmqctl("version").strip().split(".")[:3])


# --- publishing -------------------------------------------------------------------------------


async def test_a_confirmed_publish_is_consumed(transport: RabbitTransport, unique: str) -> None:
    queue = f"work-{unique}"
    await transport.declare(work_queue(queue))
    await transport.publish(message(queue, '{"n": 1}', message_id=f"id-{unique}"))
    recorder = Recorder()
    async with consuming(transport, queue, recorder):
        (delivery,) = await recorder.wait_for(1)
    assert delivery.queue == queue
    assert delivery.body == b'{"n": 1}'
    assert delivery.message_id == f"id-{unique}"
    assert delivery.correlation_id == "saga-1"
    assert delivery.routing_key == queue
    assert not delivery.redelivered


async def test_published_messages_are_persistent_json_with_a_fresh_amqp_id_per_attempt(
    transport: RabbitTransport, broker_url: str, unique: str
) -> None:
    queue = f"work-{unique}"
    await transport.declare(work_queue(queue))
    outgoing = message(queue, message_id="deterministic-1")
    await transport.publish(outgoing)
    await transport.publish(outgoing)  # an outbox retry of the same message
    async with await aio_pika.connect(broker_url) as connection:
        channel = await connection.channel()
        source = await channel.declare_queue(queue, passive=True)
        first = await source.get(no_ack=True)
        second = await source.get(no_ack=True)
    for received in (first, second):
        assert received.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert received.content_type == "application/json"
        assert received.correlation_id == "saga-1"
        assert received.headers[names.HEADER_MESSAGE_ID] == "deterministic-1"
        assert received.type == "event"
    assert first.message_id != second.message_id
    assert "deterministic-1" not in (first.message_id, second.message_id)


async def test_an_unroutable_mandatory_publish_raises_quickly(broker_url: str, unique: str) -> None:
    reasons: list[str] = []
    async with RabbitTransport(broker_url, on_publish_failure=reasons.append) as transport:
        await transport.declare(base_topology(POLICY))
        started = time.monotonic()
        with pytest.raises(PublishFailed, match=r"was returned: no queue is bound \[returned\]"):
            await transport.publish(message(f"nobody-{unique}", exchange=names.COMMANDS_EXCHANGE))
        assert time.monotonic() - started < 1.0
        assert reasons == ["returned"]
        # The channel is still good for the next publish.
        await transport.publish(message(names.PARKED_QUEUE))


async def test_an_unroutable_optional_publish_is_dropped_quietly(
    transport: RabbitTransport, unique: str
) -> None:
    await transport.declare(base_topology(POLICY))
    await transport.publish(
        message(f"saga.Nobody{unique}", exchange=names.EVENTS_EXCHANGE, mandatory=False)
    )


async def test_a_publish_to_a_missing_exchange_is_a_channel_error(
    transport: RabbitTransport, unique: str
) -> None:
    with pytest.raises(PublishFailed, match=r"no exchange .*\[channel\]"):
        await transport.publish(message("x", exchange=f"missing-{unique}"))
    await transport.declare(base_topology(POLICY))
    await transport.publish(message(names.PARKED_QUEUE))  # the robust channel came back


async def test_a_publish_without_a_confirm_times_out_and_replaces_the_channel(
    broker_url: str,
) -> None:
    reasons: list[str] = []
    async with RabbitTransport(
        broker_url, publish_timeout=0.3, on_publish_failure=reasons.append
    ) as transport:
        await transport.declare(base_topology(POLICY))
        publisher = await transport._get_publisher()

        async def wedged(*args: object, **kwargs: object) -> None:
            await asyncio.Event().wait()  # the confirm that never comes (aio-pika #689)

        publisher.publish = wedged  # type: ignore[method-assign]
        with pytest.raises(PublishFailed, match=r"not confirmed within 0.3 s \[timeout\]"):
            await transport.publish(message("svc", exchange=names.COMMANDS_EXCHANGE))
        assert reasons == ["timeout"]
        assert publisher.channel.is_closed
        await transport.publish(message(names.PARKED_QUEUE))
        assert (await transport._get_publisher()) is not publisher


# --- delays -----------------------------------------------------------------------------------


async def test_delayed_messages_are_never_early_and_all_arrive(
    transport: RabbitTransport, capsys: pytest.CaptureFixture[str]
) -> None:
    await transport.declare(work_queue(names.TIMERS_QUEUE))
    recorder = Recorder()
    rng = random.Random()
    now = datetime.now(UTC)
    due = {f"timer-{n}": now + timedelta(seconds=rng.uniform(1.0, 5.0)) for n in range(32)}
    order = list(due)
    rng.shuffle(order)
    sent: dict[str, datetime] = {}

    async def publish(key: str) -> None:
        sent[key] = datetime.now(UTC)
        await transport.publish(message(names.TIMERS_QUEUE, message_id=key, deliver_at=due[key]))

    async with consuming(transport, names.TIMERS_QUEUE, recorder):
        await asyncio.gather(*(publish(key) for key in order))
        await recorder.wait_for(len(due), within=15)
        await asyncio.sleep(0.5)  # an at-least-once duplicate would show up here
    early = {key: due[key] - at for key, at in recorder.arrivals.items() if at < due[key]}
    assert not early, f"delivered before deliver_at: {early}"
    assert set(recorder.arrivals) == set(due)
    assert all(d.routing_key == names.TIMERS_QUEUE for d in recorder.deliveries)
    lateness = sorted((recorder.arrivals[key] - due[key]).total_seconds() for key in due)
    # What the ladder adds to the whole seconds it was asked to wait: dead-lettering latency.
    overhead = sorted(
        (
            recorder.arrivals[key]
            - sent[key]
            - timedelta(seconds=transport.ladder.delay_for(due[key], sent[key]))
        ).total_seconds()
        for key in due
    )
    with capsys.disabled():
        print(  # noqa: T201 - the measured figures belong in the test output
            f"\ndelay ladder, {len(due)} timers of 1-5 s: lateness after deliver_at p50 "
            f"{statistics.median(lateness):.3f} s, max {lateness[-1]:.3f} s (rounding up to "
            f"whole seconds included); ladder overhead p50 {statistics.median(overhead):.3f} s, "
            f"max {overhead[-1]:.3f} s; {len(recorder.deliveries) - len(due)} duplicate(s)"
        )


async def test_a_timer_travels_the_same_levels_again_without_being_dropped(
    transport: RabbitTransport, broker_url: str
) -> None:
    """Regression for Celery issue 9867: x-death copied into a re-publish is a 'cycle'."""
    await transport.declare(work_queue(names.TIMERS_QUEUE))
    recorder = Recorder()
    three_seconds = DelayLadder().route(3, names.TIMERS_QUEUE)  # levels 1 and 0
    async with consuming(transport, names.TIMERS_QUEUE, recorder):
        timer = message(
            names.TIMERS_QUEUE,
            message_id="t-1",
            deliver_at=datetime.now(UTC) + timedelta(seconds=3),
        )
        await transport.publish(timer)
        (first,) = await recorder.wait_for(1)
        assert [death["queue"] for death in first.headers["x-death"]] == [
            "saga.delay.0",
            "saga.delay.1",
        ]
        # The same timer again, carrying every string header the delivery had (x-first-death-*
        # included): the transport must not let RabbitMQ's headers back in.
        carried = {k: v for k, v in first.headers.items() if isinstance(v, str)}
        again = timer.model_copy(
            update={
                "headers": {**carried, **timer.headers},
                "deliver_at": datetime.now(UTC) + timedelta(seconds=3),
            }
        )
        await transport.publish(again)
        # The control: a raw re-publish with the delivery's x-death, as Celery did.
        async with await aio_pika.connect(broker_url) as raw:
            channel = await raw.channel()
            entry = await channel.get_exchange(three_seconds.exchange)
            await entry.publish(
                aio_pika.Message(b"{}", headers={**first.headers, "saga-message-id": "raw"}),
                three_seconds.routing_key,
            )
        await recorder.wait_for(2, within=10)
        await asyncio.sleep(1.0)
    ids = [d.message_id for d in recorder.deliveries]
    assert ids.count("t-1") == 2
    if broker_version() < (3, 13):
        assert "raw" not in ids, "the broker no longer drops x-death cycles: update the docs"


async def test_a_classic_ladder_delivers_too(broker_url: str, vhost: str) -> None:
    ladder = DelayLadder(levels=4, queue_type=QueueType.CLASSIC)
    recorder = Recorder()
    async with RabbitTransport(broker_url, ladder=ladder) as transport:
        await transport.declare(work_queue(names.TIMERS_QUEUE))
        async with consuming(transport, names.TIMERS_QUEUE, recorder):
            deliver_at = datetime.now(UTC) + timedelta(seconds=2)
            await transport.publish(message(names.TIMERS_QUEUE, deliver_at=deliver_at))
            await recorder.wait_for(1)
    assert recorder.arrivals["m-1"] >= deliver_at
    declared = queue_arguments(vhost)
    assert declared["saga.delay.1"] == ladder.queue_arguments(1)
    assert declared["saga.delay.1"]["x-queue-type"] == "classic"


async def test_a_deliver_at_in_the_past_is_delivered_at_once(
    transport: RabbitTransport, unique: str
) -> None:
    queue = f"work-{unique}"
    await transport.declare(work_queue(queue))
    recorder = Recorder()
    async with consuming(transport, queue, recorder):
        started = time.monotonic()
        await transport.publish(message(queue, deliver_at=datetime.now(UTC) - timedelta(minutes=5)))
        await recorder.wait_for(1, within=2)
    assert time.monotonic() - started < 1.0


async def test_a_delayed_message_for_a_queue_without_the_ladder_is_refused(
    transport: RabbitTransport, unique: str
) -> None:
    with pytest.raises(PublishFailed, match="delayed messages must address one of"):
        await transport.publish(
            message(f"work-{unique}", deliver_at=datetime.now(UTC) + timedelta(seconds=5))
        )


# --- consuming --------------------------------------------------------------------------------


def park_if_not_json(delivery: Delivery) -> Verdict:
    """A handler verdict like the orchestrator's: undecodable bodies are parked."""
    try:
        json.loads(delivery.body)
    except ValueError as e:
        return DeadLetter(f"not JSON: {e}")
    return Disposition.ACK


async def test_garbage_is_parked_with_its_reason_and_the_consumer_keeps_going(
    transport: RabbitTransport,
) -> None:
    await transport.declare(work_queue(names.TIMERS_QUEUE))
    timers = Recorder(verdict=park_if_not_json)
    parked = Recorder()
    async with (
        consuming(transport, names.TIMERS_QUEUE, timers),
        consuming(transport, names.PARKED_QUEUE, parked),
    ):
        # Through the ladder, so that the garbage carries RabbitMQ's own x-death headers.
        await transport.publish(
            message(
                names.TIMERS_QUEUE,
                "<<garbage>>",
                message_id="bad-1",
                deliver_at=datetime.now(UTC) + timedelta(seconds=1),
            )
        )
        await timers.wait_for(1)
        await transport.publish(message(names.TIMERS_QUEUE, message_id="good-1"))
        (copy,) = await parked.wait_for(1)
        await timers.wait_for(2)
    assert [d.message_id for d in timers.deliveries] == ["bad-1", "good-1"]
    assert "x-death" in timers.deliveries[0].headers
    assert copy.body == b"<<garbage>>"
    assert copy.message_id == "bad-1"
    assert copy.correlation_id == "saga-1"
    assert copy.headers[names.HEADER_DEAD_LETTER_REASON].startswith("not JSON: ")
    assert copy.headers[names.HEADER_DEAD_LETTER_QUEUE] == names.TIMERS_QUEUE
    assert not [key for key in copy.headers if key.startswith("x-")]


async def test_a_crashing_handler_is_retried_then_parked_as_poison(
    broker_url: str, unique: str
) -> None:
    queue = f"work-{unique}"
    calls: list[int] = []

    async def crashing(delivery: Delivery) -> Verdict:
        calls.append(delivery.headers.get("x-delivery-count", 0))
        raise RuntimeError("a bug")

    parked = Recorder()
    async with RabbitTransport(broker_url, poison_threshold=3) as transport:
        await transport.declare(work_queue(queue))
        with capture_logs() as logs:
            async with (
                consuming(transport, queue, crashing),
                consuming(transport, names.PARKED_QUEUE, parked),
            ):
                await transport.publish(message(queue, message_id="poison-1"))
                (copy,) = await parked.wait_for(1)
    assert calls == [0, 1, 2]
    assert copy.message_id == "poison-1"
    assert copy.headers[names.HEADER_DEAD_LETTER_REASON] == (
        "poison message: redelivered 3 times without being acknowledged (threshold 3)"
    )
    failures = [entry for entry in logs if entry["event"] == "handler_failed"]
    assert len(failures) == 3
    assert all(entry["exc_info"] for entry in failures)
    assert any(entry["event"] == "poison_message_parked" for entry in logs)


async def test_requeue_redelivers_the_message(transport: RabbitTransport, unique: str) -> None:
    queue = f"work-{unique}"
    await transport.declare(work_queue(queue))
    recorder = Recorder(verdict=lambda d: Disposition.ACK if d.redelivered else Disposition.REQUEUE)
    async with consuming(transport, queue, recorder):
        await transport.publish(message(queue))
        first, second = await recorder.wait_for(2)
    assert (first.redelivered, second.redelivered) == (False, True)
    assert first.message_id == second.message_id == "m-1"


async def test_at_most_prefetch_handlers_run_at_once(
    transport: RabbitTransport, unique: str
) -> None:
    queue = f"work-{unique}"
    await transport.declare(work_queue(queue))
    release = asyncio.Event()
    running: list[str] = []
    most = 0
    done: list[str] = []

    async def slow(delivery: Delivery) -> Verdict:
        nonlocal most
        running.append(delivery.message_id or "")
        most = max(most, len(running))
        await release.wait()
        running.remove(delivery.message_id or "")
        done.append(delivery.message_id or "")
        return Disposition.ACK

    async with consuming(transport, queue, slow):
        try:
            for n in range(12):
                await transport.publish(message(queue, message_id=f"m-{n}"))
            await until(lambda: len(running) == transport.prefetch)
            await asyncio.sleep(0.3)
            assert len(running) == transport.prefetch == 8
        finally:
            release.set()
        await until(lambda: len(done) == 12)
    assert most == 8


async def test_publishes_started_together_reach_the_socket_together(
    transport: RabbitTransport, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With aiormq's default queue of 10 frames, the eleventh publish waited for room while
    # holding its channel's lock, and the rest then took the lock one turn of the loop at a
    # time: about one send per publish. Sends are counted where the batching writer hands its
    # bytes to the socket.
    queue = f"work-{unique}"
    await transport.declare(work_queue(queue))
    await transport.publish(message(queue, message_id="first"))  # the channel is open
    sends: list[int] = []
    real_write = asyncio.StreamWriter.write

    def counted(self: asyncio.StreamWriter, data: Any) -> None:
        sends.append(len(data))
        real_write(self, data)

    monkeypatch.setattr(asyncio.StreamWriter, "write", counted)
    await asyncio.gather(
        *(transport.publish(message(queue, message_id=f"m-{n}")) for n in range(40))
    )
    assert 1 <= len(sends) <= 4, sends


async def test_an_ack_held_for_company_leaves_on_its_own(broker_url: str, unique: str) -> None:
    # With one delivery in flight, the broker sends the next only once the ack arrived, and
    # no other frame is written meanwhile: each ack has to leave after its hold, alone.
    queue = f"work-{unique}"
    async with RabbitTransport(broker_url, prefetch=1) as transport:
        await transport.declare(work_queue(queue))
        for n in range(3):
            await transport.publish(message(queue, message_id=f"m-{n}"))
        recorder = Recorder()
        async with consuming(transport, queue, recorder):
            await recorder.wait_for(3, within=30)
    assert [d.message_id for d in recorder.deliveries] == ["m-0", "m-1", "m-2"]
    assert await ready_count(broker_url, queue) == 0


async def test_cancelling_consume_waits_for_the_in_flight_handler_and_acks_it(
    transport: RabbitTransport, broker_url: str, unique: str
) -> None:
    queue = f"work-{unique}"
    await transport.declare(work_queue(queue))
    release = asyncio.Event()
    recorder = Recorder()

    async def slow(delivery: Delivery) -> Verdict:
        await recorder(delivery)
        await release.wait()
        return Disposition.ACK

    ready = asyncio.Event()
    task = asyncio.create_task(transport.consume(queue, slow, ready=ready))
    await ready.wait()
    await transport.publish(message(queue, message_id="in-flight"))
    await recorder.wait_for(1)
    task.cancel()
    try:
        await asyncio.sleep(0.3)
        assert not task.done(), "consume returned while its handler was still running"
        await transport.publish(message(queue, message_id="after-cancel"))
        await asyncio.sleep(0.3)
    finally:
        release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [d.message_id for d in recorder.deliveries] == ["in-flight"]
    assert await ready_count(broker_url, queue) == 1  # in-flight acked, after-cancel waits


async def test_close_stops_consumers(transport: RabbitTransport, unique: str) -> None:
    queue = f"work-{unique}"
    await transport.declare(work_queue(queue))
    ready = asyncio.Event()
    task = asyncio.create_task(transport.consume(queue, Recorder(), ready=ready))
    await ready.wait()
    await transport.close()
    async with asyncio.timeout(5):
        await task  # returns without an error


async def test_consuming_a_missing_queue_says_so(transport: RabbitTransport, unique: str) -> None:
    with pytest.raises(QueueNotFound, match=f"queue 'nothing-{unique}': it does not exist"):
        await transport.consume(f"nothing-{unique}", Recorder())


async def test_consumers_resume_after_the_connection_drops(
    transport: RabbitTransport, vhost: str, unique: str
) -> None:
    queue = f"work-{unique}"
    await transport.declare(work_queue(queue))
    release = asyncio.Event()
    recorder = Recorder()

    async def first_one_slow(delivery: Delivery) -> Verdict:
        await recorder(delivery)
        if not delivery.redelivered:
            await release.wait()
        return Disposition.ACK

    reconnected = asyncio.Event()
    connection = await transport.connect()
    connection.reconnect_callbacks.add(lambda *_: reconnected.set())
    with capture_logs() as logs:
        async with consuming(transport, queue, first_one_slow):
            try:
                await transport.publish(message(queue, message_id="before"))
                await recorder.wait_for(1)
                rabbitmqctl("close_all_connections", "-p", vhost, "integration test")
                async with asyncio.timeout(15):
                    await reconnected.wait()
            finally:
                release.set()  # its ack goes to a channel that no longer exists
            redelivered = (await recorder.wait_for(2, within=15))[1]
            assert (redelivered.message_id, redelivered.redelivered) == ("before", True)
            async with asyncio.timeout(15):
                while True:  # what the outbox relay does
                    try:
                        await transport.publish(message(queue, message_id="after"))
                        break
                    except PublishFailed:
                        await asyncio.sleep(0.2)
            await recorder.wait_for(3, within=15)
    assert [d.message_id for d in recorder.deliveries] == ["before", "before", "after"]
    settle_failures = [entry for entry in logs if entry["event"] == "delivery_settle_failed"]
    assert [entry["action"] for entry in settle_failures] == ["ack"]


# --- topology ---------------------------------------------------------------------------------


async def test_declared_queue_arguments_are_what_we_asked_for(
    transport: RabbitTransport, vhost: str
) -> None:
    topology = orchestrator_topology(["inventory"], POLICY)
    await transport.declare(topology)
    await transport.declare(topology)  # idempotent
    declared = queue_arguments(vhost)
    ladder = transport.ladder
    assert declared[names.TIMERS_QUEUE] == POLICY.arguments()
    assert declared[names.command_queue("inventory")] == POLICY.arguments()
    assert declared[names.TIMERS_QUEUE]["x-delivery-limit"] == 20
    assert declared[names.PARKED_QUEUE] == {"x-queue-type": "quorum"}
    for level in range(ladder.levels):
        assert declared[ladder.level_name(level)] == ladder.queue_arguments(level)
    assert len(declared) == 6 + ladder.levels  # start, queries, replies, timers, commands, parked
    assert not [name for name, arguments in declared.items() if "x-expires" in arguments]
    assert transport.full_topology(topology).queues[: len(topology.queues)] == topology.queues


def test_a_participant_topology_gets_no_ladder() -> None:
    transport = RabbitTransport("amqp://guest:guest@localhost/")  # never connects
    topology = participant_topology("inventory", POLICY)
    assert transport.full_topology(topology) == topology


async def test_a_queue_with_other_arguments_is_a_clear_config_error(
    transport: RabbitTransport, vhost: str, unique: str
) -> None:
    queue = f"work-{unique}"
    await transport.declare(Topology(queues=(QueueSpec(queue, {"x-queue-type": "classic"}),)))
    with pytest.raises(ConfigError) as raised:
        await transport.declare(work_queue(queue))
    text = str(raised.value)
    assert f"queue '{queue}' already exists with different arguments" in text
    assert "inequivalent arg" in text
    assert f"rabbitmqctl delete_queue -p {vhost} {queue}" in text
    assert "\n" not in text


async def test_a_ladder_level_with_another_ttl_is_a_clear_config_error(
    transport: RabbitTransport,
) -> None:
    ladder = transport.ladder
    wrong = {**ladder.queue_arguments(3), "x-message-ttl": 1000}
    await transport.declare(Topology(queues=(QueueSpec("saga.delay.3", wrong),)))
    with pytest.raises(ConfigError) as raised:
        await transport.declare(work_queue(names.TIMERS_QUEUE))
    text = str(raised.value)
    assert "queue 'saga.delay.3'" in text
    assert "inequivalent arg 'x-message-ttl'" in text
    assert "8000" in text  # what we asked for
    assert "1000" in text  # what the broker has


# --- start-up ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "error", "says"),
    [
        ("wrong password", ConfigError, "refused the login"),
        ("closed port", BrokerUnavailable, "cannot connect to RabbitMQ at"),
        ("not amqp", ConfigError, "is not valid: use amqp://"),
        ("unknown vhost", ConfigError, "does not exist or the user may not access it"),
        ("not a url", ConfigError, "is not valid: use amqp://"),
    ],
)
async def test_start_up_errors_are_one_line_without_the_password(
    amqp_url: str, unique: str, case: str, error: type[Exception], says: str
) -> None:
    urls = {
        "wrong password": "amqp://guest:s3cret-pw@127.0.0.1:5672/",
        "closed port": "amqp://guest:s3cret-pw@127.0.0.1:1/",
        "not amqp": "http://guest:s3cret-pw@127.0.0.1:5672/",
        "unknown vhost": with_vhost(amqp_url, f"nowhere-{unique}"),
        "not a url": "amqp//guest:s3cret-pw@127.0.0.1",
    }
    transport = RabbitTransport(urls[case], connect_timeout=3)
    started = time.monotonic()
    with pytest.raises(error) as raised:
        await transport.connect()
    text = str(raised.value)
    assert says in text
    assert "s3cret-pw" not in text
    assert "\n" not in text
    assert time.monotonic() - started < 3.5
    await transport.close()


def test_the_password_is_hidden_in_the_url_shown() -> None:
    transport = RabbitTransport("amqp://app:hunter2@rabbit:5672/prod")
    assert transport.safe_url == "amqp://app:***@rabbit:5672/prod"


# --- untrusted sizes, counting parked messages, publishing after a reconnect -----------------


async def test_an_oversize_body_is_parked_unread_and_counted_once(
    broker_url: str, unique: str
) -> None:
    queue = f"work-{unique}"
    counted: list[tuple[str, str]] = []
    handled = Recorder()
    parked = Recorder()
    async with RabbitTransport(
        broker_url, max_body=4096, on_dead_lettered=lambda q, label: counted.append((q, label))
    ) as transport:
        await transport.declare(work_queue(queue))
        async with (
            consuming(transport, queue, handled),
            consuming(transport, names.PARKED_QUEUE, parked),
        ):
            await transport.publish(message(queue, json.dumps({"x": "y" * 5000}), message_id="big"))
            await transport.publish(message(queue, message_id="small"))
            (copy,) = await parked.wait_for(1)
            await handled.wait_for(1)
    assert [d.message_id for d in handled.deliveries] == ["small"]
    assert copy.message_id == "big"
    reason = copy.headers[names.HEADER_DEAD_LETTER_REASON]
    assert reason.startswith("the body is 5")
    assert "the limit is 4096" in reason
    assert counted == [(queue, "oversize")]


async def test_a_parked_message_is_counted_once_even_when_parking_had_to_be_retried(
    broker_url: str, unique: str
) -> None:
    queue = f"work-{unique}"
    counted: list[tuple[str, str]] = []
    attempts: list[int] = []

    async def refuse(delivery: Delivery) -> Verdict:
        attempts.append(len(attempts))
        return DeadLetter("not a valid CommandEnvelope: body: invalid JSON", label="malformed")

    parked = Recorder()
    async with RabbitTransport(
        broker_url,
        publish_timeout=5.0,
        on_dead_lettered=lambda q, label: counted.append((q, label)),
    ) as transport:
        # The work queue without the dead-letter exchange: parking fails until it exists.
        await transport.declare(Topology(queues=(QueueSpec(queue, POLICY.arguments()),)))
        async with consuming(transport, queue, refuse):
            await transport.publish(message(queue, "<<garbage>>", message_id="bad"))
            await until(lambda: len(attempts) >= 2, within=15)
            assert counted == []  # refused twice, parked never: counted never
            await transport.declare(base_topology(POLICY))
            async with consuming(transport, names.PARKED_QUEUE, parked):
                (copy,) = await parked.wait_for(1, within=15)
    assert copy.message_id == "bad"
    assert counted == [(queue, "malformed")]


async def test_after_a_reconnect_handlers_run_only_once_the_publisher_is_back(
    broker_url: str, vhost: str, unique: str
) -> None:
    # A publish may wait a minute: rabbitmqctl, which the test polls, is slow under load.
    async with RabbitTransport(broker_url, publish_timeout=60, reconnect_interval=0.5) as transport:
        await _resumes_once_the_publisher_is_back(transport, broker_url, vhost, unique)


async def _resumes_once_the_publisher_is_back(
    transport: RabbitTransport, broker_url: str, vhost: str, unique: str
) -> None:
    queue, out = f"work-{unique}", f"out-{unique}"
    await transport.declare(
        work_queue(queue) + Topology(queues=(QueueSpec(out, POLICY.arguments()),))
    )
    failures: list[str] = []
    forwarded = Recorder()

    async def forward(delivery: Delivery) -> Verdict:
        try:
            await transport.publish(message(out, message_id=f"fwd-{delivery.message_id}"))
        except PublishFailed as e:
            failures.append(str(e))
            return Disposition.REQUEUE
        return Disposition.ACK

    async with consuming(transport, queue, forward), consuming(transport, out, forwarded):
        await transport.publish(message(queue, message_id="before"))
        await forwarded.wait_for(1)
        # aio-pika restores channels one by one, in no fixed order; hold the publisher
        # channel's restoration back, so that the consumer channel surely comes back first.
        publisher = transport._publisher
        assert publisher is not None
        channel: Any = publisher.channel
        real_restore = channel.restore

        async def held(*_: object) -> None:
            return None

        channel.restore = held
        reconnected = asyncio.Event()
        connection = await transport.connect()
        connection.reconnect_callbacks.add(lambda *_: reconnected.set())
        rabbitmqctl("close_all_connections", "-p", vhost, "integration test")
        async with asyncio.timeout(30):
            await reconnected.wait()
        assert channel.is_closed
        async with await aio_pika.connect(broker_url) as other:
            side = await other.channel()
            await side.default_exchange.publish(
                aio_pika.Message(b'{"ok": true}', headers={names.HEADER_MESSAGE_ID: "after"}),
                routing_key=queue,
            )
        # "after" waits in its handler; "before" too if its ack (held up to 20 ms to leave
        # with other frames, and the loop is blocked while rabbitmqctl runs) was lost.
        await until(lambda: unacknowledged(vhost, queue) >= 1, within=30)
        channel.restore = real_restore
        await real_restore()
        await until(lambda: "fwd-after" in {d.message_id for d in forwarded.deliveries}, 30)
    assert failures == []
    # "fwd-before" may come twice: its ack could have been lost with the connection.
    assert {d.message_id for d in forwarded.deliveries} == {"fwd-before", "fwd-after"}


def unacknowledged(vhost: str, queue: str) -> int:
    """Messages of ``queue`` delivered to a consumer and not settled yet."""
    out = rabbitmqctl("list_queues", "-p", vhost, "name", "messages_unacknowledged")
    for line in out.splitlines():
        name, _, count = line.rpartition("\t")
        if name == queue:
            return int(count)
    return -1


async def test_a_publish_while_the_connection_is_reconnecting_fails_as_a_publish(
    broker_url: str, vhost: str, unique: str
) -> None:
    # Seen in a broker restart under load: while aio-pika tries to reconnect to a broker that
    # is still down, its connection has no transport, and opening the publisher channel raised
    # a bare RuntimeError("Connection was not opened"); the outbox relay took it for a bug and
    # held every saga it was relaying for an operator.
    queue = f"work-{unique}"
    async with RabbitTransport(broker_url, reconnect_interval=600) as transport:
        await transport.declare(work_queue(queue))
        connection = await transport.connect()
        rabbitmqctl("close_all_connections", "-p", vhost, "integration test")
        await until(lambda: not transport.connected, within=60)
        transport._publisher = None  # the channel a failed publish would have dropped
        connection.transport = None  # what a reconnect attempt to a broker still down leaves
        with pytest.raises(PublishFailed, match=r"is down.*\[connection\]"):
            await transport.publish(message(queue, message_id="while-down"))
