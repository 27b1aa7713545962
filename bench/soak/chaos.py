"""The soak's faults: SIGKILLed replicas, participants and broker, and hostile messages.

Every fault is written down in a :class:`FaultLog` with the pid it killed and when, because the
checks afterwards must explain every double effect by a kill of the process that made it.

Hostile messages go to every queue the saga processes consume (the start, query, reply and
timer queues, each participant's command queue, and through the delay ladder), over a plain
aio-pika connection with publisher confirms so that the soak knows what the broker took. Each
kind says whether the receiver must park it (malformed, or naming a saga that does not exist)
or drop it as harmless (a forged reply or timer for a real saga is stale: only the latest
attempt's reply moves a saga, and a timer is a wake-up whose due time the store decides).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import aio_pika
import aiormq

from contracts import names
from contracts.messages import (
    CommandEnvelope,
    Direction,
    Reply,
    ReplyStatus,
    StartSaga,
    TimerKind,
    TimerMessage,
)
from plumbing.delays import DelayLadder

FORGED = "forged-"
"""Saga ids of forged messages start with this; no real saga's does."""
GARBAGE = "soak-garbage-"
"""Message ids of hostile messages start with this."""
HOSTILE_HEADER = "soak-hostile"
"""Names a hostile message's kind. A parked copy keeps its headers (not its message id), so
this tells the soak's messages from any other in the parking queue."""
SERVICES = ("inventory", "payment", "shipping", "notification")


@dataclass(frozen=True)
class Fault:
    """One fault injected: what, which process (pid) and when (monotonic seconds of the run)."""

    kind: str
    target: str
    pid: int | None
    at: float
    outage: float = 0.0
    """Seconds until the target was back (for the broker: until it spoke AMQP again)."""


@dataclass
class FaultLog:
    """Every fault of a run."""

    started: float = field(default_factory=time.monotonic)
    faults: list[Fault] = field(default_factory=list)

    def add(self, kind: str, target: str, pid: int | None, outage: float = 0.0) -> None:
        """Write a fault down (now)."""
        now = time.monotonic() - self.started
        self.faults.append(Fault(kind, target, pid, now - outage, outage))

    def killed_pids(self, target_prefix: str) -> set[int]:
        """The pids of the processes killed whose name starts with ``target_prefix``."""
        return {
            f.pid
            for f in self.faults
            if f.pid is not None
            and f.kind.startswith("kill")
            and f.target.startswith(target_prefix)
        }

    def counts(self) -> dict[str, int]:
        """How many faults of each kind."""
        return dict(Counter(f.kind for f in self.faults))


@dataclass(frozen=True)
class Hostile:
    """One hostile message: where it goes and whether it must end up parked."""

    kind: str
    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    correlation_id: str | None
    parked: bool


@dataclass
class HostileLog:
    """What the broker confirmed, what it may or may not have taken, and what must park."""

    sent: Counter[str] = field(default_factory=Counter)
    uncertain: Counter[str] = field(default_factory=Counter)
    must_park: int = 0
    may_park: int = 0
    """Unconfirmed publishes (the broker was killed meanwhile) that should park if they
    arrived."""

    def total(self) -> int:
        """Hostile messages the broker confirmed."""
        return sum(self.sent.values())


def _now() -> datetime:
    return datetime.now(UTC)


def _json(model: Reply | TimerMessage | StartSaga | CommandEnvelope) -> bytes:
    return model.model_dump_json().encode()


def hostile_round(n: int, real_sagas: Sequence[str], ladder: DelayLadder) -> list[Hostile]:
    """The ``n``-th round of hostile messages: malformed ones to every queue and forged ones.

    A forged message never completes anything: replies name an attempt no saga reached (900)
    or a saga that does not exist, commands to participants name a command nobody handles or
    carry a deadline already past (refused unexecuted; the refusal names a saga that does not
    exist and parks at the orchestrator).
    """
    tag = f"{GARBAGE}{n:05d}"
    forged_saga = f"{FORGED}{n:05d}"
    real = real_sagas[n % len(real_sagas)] if real_sagas else forged_saga
    now = _now()
    queues = (
        names.START_QUEUE,
        names.REPLIES_QUEUE,
        names.TIMERS_QUEUE,
        names.QUERIES_QUEUE,
        *(names.command_queue(s) for s in SERVICES),
    )
    out: list[Hostile] = []
    junk = (b"\x00\xff not json at all", b'{"hello": "world"}', b"[1, 2, 3]", b"")
    for i, queue in enumerate(queues):
        body = junk[(n + i) % len(junk)]
        out.append(Hostile("malformed", "", queue, body, f"{tag}-junk-{i}", None, parked=True))
    if n % 10 == 0:  # one oversized body now and then (it is parked unread)
        out.append(
            Hostile(
                "oversized",
                "",
                names.REPLIES_QUEUE,
                b"x" * (1024 * 1024 + 1),
                f"{tag}-big",
                None,
                parked=True,
            )
        )
    # Through the delay ladder (2 s: levels 1 and 0), on to the timer queue.
    route = ladder.route(2, names.TIMERS_QUEUE)
    out.append(
        Hostile(
            "malformed-delayed",
            route.exchange,
            route.routing_key,
            b"\x01 junk that waited",
            f"{tag}-ladder",
            None,
            parked=True,
        )
    )

    def reply(saga_id: str, attempt: int, suffix: str) -> Reply:
        return Reply(
            message_id=f"{tag}-{suffix}",
            in_reply_to=f"{tag}-{suffix}-cmd",
            saga_id=saga_id,
            step="process_payment",
            direction=Direction.FORWARD,
            attempt=attempt,
            status=ReplyStatus.COMPLETED,
            result={"payment_id": "forged", "amount": "0"},
            sent_at=now,
        )

    forged_unknown = reply(forged_saga, 1, "reply-unknown")
    forged_stale = reply(real, 900, "reply-stale")
    out += [
        Hostile(
            "forged-reply-unknown-saga",
            names.REPLIES_EXCHANGE,
            names.REPLIES_ROUTING_KEY,
            _json(forged_unknown),
            forged_unknown.message_id,
            forged_saga,
            parked=True,
        ),
        Hostile(
            "forged-reply-stale-attempt",
            names.REPLIES_EXCHANGE,
            names.REPLIES_ROUTING_KEY,
            _json(forged_stale),
            forged_stale.message_id,
            real,
            parked=False,
        ),
    ]
    for saga_id, kind in ((real, "forged-timer-real-saga"), (forged_saga, "forged-timer-unknown")):
        timer = TimerMessage(
            message_id=f"{tag}-{kind}",
            saga_id=saga_id,
            timer=TimerKind.STEP_TIMEOUT,
            step="create_shipment",
            attempt=900,
            due_at=now - timedelta(seconds=1),
        )
        out.append(
            Hostile(kind, "", names.TIMERS_QUEUE, _json(timer), timer.message_id, saga_id, False)
        )
    unknown_type = StartSaga(saga_type="no_such_saga", saga_id=forged_saga, data={"x": 1})
    bad_data = StartSaga(saga_type="order_fulfillment", saga_id=forged_saga, data={"x": 1})
    out += [
        Hostile(
            "forged-start-unknown-type",
            names.START_EXCHANGE,
            names.START_ROUTING_KEY,
            _json(unknown_type),
            f"{tag}-start-type",
            forged_saga,
            parked=True,
        ),
        Hostile(
            "forged-start-invalid-data",
            names.START_EXCHANGE,
            names.START_ROUTING_KEY,
            _json(bad_data),
            f"{tag}-start-data",
            forged_saga,
            parked=True,
        ),
    ]
    service = SERVICES[n % len(SERVICES)]
    for kind, command, deadline in (
        ("forged-command-unknown", "no_such_command", None),
        ("forged-command-expired", "process_payment", now - timedelta(minutes=5)),
    ):
        envelope = CommandEnvelope(
            message_id=f"{tag}-{kind}",
            saga_id=forged_saga,
            saga_type="order_fulfillment",
            step="process_payment",
            command=command,
            direction=Direction.FORWARD,
            attempt=1,
            idempotency_key=f"{tag}-{kind}-key",
            payload={
                "order_id": forged_saga,
                "customer_id": "forger",
                "amount": "1.00",
                "payment_method": "card",
            },
            reply_to=names.REPLIES_ROUTING_KEY,
            sent_at=now,
            deadline=deadline,
        )
        target = "payment" if command == "process_payment" else service
        # The expired one is refused unexecuted; its refusal parks at the orchestrator.
        out.append(
            Hostile(
                kind,
                names.COMMANDS_EXCHANGE,
                target,
                _json(envelope),
                envelope.message_id,
                forged_saga,
                parked=True,
            )
        )
    return out


async def send_hostile(
    url: str, messages: Sequence[Hostile], log: HostileLog, on_error: Callable[[str], None]
) -> None:
    """Publish ``messages`` with confirms; a publish the broker did not confirm is uncertain."""
    try:
        connection = await aio_pika.connect(url, timeout=10)
    except (OSError, aiormq.exceptions.AMQPError, TimeoutError) as e:
        on_error(f"no connection for hostile messages ({type(e).__name__})")
        return
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for m in messages:
            exchange = (
                channel.default_exchange
                if m.exchange == ""
                else await channel.get_exchange(m.exchange, ensure=False)
            )
            message = aio_pika.Message(
                m.body,
                headers={HOSTILE_HEADER: m.kind},
                message_id=m.message_id,
                correlation_id=m.correlation_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            try:
                async with asyncio.timeout(10):
                    await exchange.publish(message, routing_key=m.routing_key, mandatory=True)
            except (aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPException, TimeoutError):
                log.uncertain[m.kind] += 1
                log.may_park += int(m.parked)
                return
            log.sent[m.kind] += 1
            log.must_park += int(m.parked)


def interval(rng: random.Random, bounds: tuple[float, float]) -> float:
    """A random wait between the bounds."""
    return rng.uniform(*bounds)
