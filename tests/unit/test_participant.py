"""The participant SDK: typed handlers, idempotency, tombstones, deadlines, dead letters."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import pytest
from pydantic import BaseModel

from contracts.messages import (
    Command,
    CommandEnvelope,
    Direction,
    ReplyStatus,
    command_message_id,
    idempotency_key,
)
from participants import CommandContext, NoReply, Participant
from participants.idempotency import ClaimResult, MemoryIdempotency
from participants.service import STORE_WAIT
from plumbing.errors import (
    DefinitionError,
    MessageRejected,
    ParticipantError,
    StoreUnavailable,
)
from plumbing.memory import MemoryBroker, VirtualClock
from plumbing.topology import QueuePolicy, orchestrator_topology
from plumbing.transport import DeadLetter, Delivery, Disposition


class Charge(Command):
    order_id: str
    amount: int


class Refund(Command):
    order_id: str


class Charged(BaseModel):
    payment_id: str


def envelope(
    command: type[Command],
    payload: dict[str, object],
    *,
    clock: VirtualClock,
    direction: Direction = Direction.FORWARD,
    attempt: int = 1,
    step: str = "charge",
    deadline_in: float = 60,
) -> CommandEnvelope:
    return CommandEnvelope(
        message_id=command_message_id("s-1", step, direction, attempt),
        saga_id="s-1",
        saga_type="t",
        step=step,
        command=command.name(),
        direction=direction,
        attempt=attempt,
        idempotency_key=idempotency_key("s-1", step, direction),
        payload=payload,
        reply_to="saga.replies",
        sent_at=clock.now(),
        deadline=clock.now() + timedelta(seconds=deadline_in),
    )


class Payments:
    """A service that counts handler calls and does what it is told."""

    def __init__(self) -> None:
        self.service = Participant("payment")
        self.calls: list[str] = []
        self.behaviour = "ok"
        self.service.handler(self.charge)
        self.service.handler(self.refund)

    async def charge(self, cmd: Charge, ctx: CommandContext) -> Charged:
        self.calls.append(f"charge#{ctx.attempt}")
        if self.behaviour == "decline":
            raise ParticipantError("card declined", type="PaymentDeclined")
        if self.behaviour == "flaky":
            raise ParticipantError("bank busy", non_retryable=False)
        if self.behaviour == "bug":
            raise KeyError("oops")
        if self.behaviour == "silent":
            raise NoReply
        return Charged(payment_id=f"pay-{cmd.order_id}")

    async def refund(self, cmd: Refund) -> None:
        self.calls.append("refund")


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


async def test_a_completed_command_is_answered_once_and_then_from_the_store(
    clock: VirtualClock,
) -> None:
    p = Payments()
    first = await p.service.handle(
        envelope(Charge, {"order_id": "o", "amount": 5}, clock=clock), clock
    )
    assert first is not None
    assert first.status is ReplyStatus.COMPLETED
    assert first.result == {"payment_id": "pay-o"}
    again = await p.service.handle(
        envelope(Charge, {"order_id": "o", "amount": 5}, clock=clock, attempt=2), clock
    )
    assert again is not None
    assert again.status is ReplyStatus.COMPLETED
    assert again.attempt == 2  # answers the attempt that asked, so the saga accepts it
    assert again.result == first.result
    assert p.calls == ["charge#1"]


async def test_a_business_failure_is_stored_and_repeated(clock: VirtualClock) -> None:
    p = Payments()
    p.behaviour = "decline"
    for attempt in (1, 2):
        reply = await p.service.handle(
            envelope(Charge, {"order_id": "o", "amount": 5}, clock=clock, attempt=attempt), clock
        )
        assert reply is not None
        assert reply.status is ReplyStatus.FAILED
        assert reply.error is not None
        assert reply.error.type == "PaymentDeclined"
    assert p.calls == ["charge#1"]


@pytest.mark.parametrize(
    ("behaviour", "error_type"), [("flaky", "ParticipantError"), ("bug", "KeyError")]
)
async def test_errors_are_not_stored_so_the_next_attempt_runs_again(
    clock: VirtualClock, behaviour: str, error_type: str
) -> None:
    p = Payments()
    p.behaviour = behaviour
    reply = await p.service.handle(
        envelope(Charge, {"order_id": "o", "amount": 5}, clock=clock), clock
    )
    assert reply is not None
    assert reply.status is ReplyStatus.ERROR
    assert reply.error is not None
    assert reply.error.type == error_type
    p.behaviour = "ok"
    reply = await p.service.handle(
        envelope(Charge, {"order_id": "o", "amount": 5}, clock=clock, attempt=2), clock
    )
    assert reply is not None
    assert reply.status is ReplyStatus.COMPLETED
    assert p.calls == ["charge#1", "charge#2"]


async def test_no_reply_acknowledges_without_answering(clock: VirtualClock) -> None:
    p = Payments()
    p.behaviour = "silent"
    assert (
        await p.service.handle(envelope(Charge, {"order_id": "o", "amount": 5}, clock=clock), clock)
        is None
    )


async def test_a_command_past_its_deadline_is_not_executed(clock: VirtualClock) -> None:
    p = Payments()
    late = envelope(Charge, {"order_id": "o", "amount": 5}, clock=clock, deadline_in=10)
    await clock.sleep(0)
    clock.set(clock.now() + timedelta(seconds=11))
    reply = await p.service.handle(late, clock)
    assert reply is not None
    assert reply.status is ReplyStatus.ERROR
    assert reply.error is not None
    assert reply.error.type == "DeadlineExceeded"
    assert p.calls == []


async def test_a_compensation_before_its_forward_command_leaves_a_tombstone(
    clock: VirtualClock,
) -> None:
    p = Payments()
    undo = await p.service.handle(
        envelope(Refund, {"order_id": "o"}, clock=clock, direction=Direction.COMPENSATION), clock
    )
    assert undo is not None
    assert undo.status is ReplyStatus.COMPLETED
    late_forward = await p.service.handle(
        envelope(Charge, {"order_id": "o", "amount": 5}, clock=clock), clock
    )
    assert late_forward is not None
    assert late_forward.status is ReplyStatus.FAILED
    assert late_forward.error is not None
    assert late_forward.error.type == "Cancelled"
    assert p.calls == ["refund"]


async def test_a_compensation_after_its_forward_command_leaves_the_outcome_alone(
    clock: VirtualClock,
) -> None:
    p = Payments()
    await p.service.handle(envelope(Charge, {"order_id": "o", "amount": 5}, clock=clock), clock)
    await p.service.handle(
        envelope(Refund, {"order_id": "o"}, clock=clock, direction=Direction.COMPENSATION), clock
    )
    duplicate = await p.service.handle(
        envelope(Charge, {"order_id": "o", "amount": 5}, clock=clock, attempt=2), clock
    )
    assert duplicate is not None
    assert duplicate.status is ReplyStatus.COMPLETED
    assert p.calls == ["charge#1", "refund"]


async def test_an_unknown_command_or_bad_payload_is_rejected(clock: VirtualClock) -> None:
    p = Payments()

    class Other(Command):
        x: int

    with pytest.raises(MessageRejected, match="no handler for command 'other'"):
        await p.service.handle(envelope(Other, {"x": 1}, clock=clock), clock)
    with pytest.raises(MessageRejected, match="not a valid Charge"):
        await p.service.handle(envelope(Charge, {"order_id": "o"}, clock=clock), clock)


async def test_malformed_deliveries_are_dead_lettered(clock: VirtualClock) -> None:
    p = Payments()
    broker = MemoryBroker(clock)
    verdict = await p.service.on_command(
        Delivery(queue="saga.payment.commands", body=b"{not json"), broker, clock
    )
    assert isinstance(verdict, DeadLetter)
    assert "not a valid CommandEnvelope" in verdict.reason


def test_handlers_must_name_their_command() -> None:
    service = Participant("x")

    async def untyped(cmd):  # type: ignore[no-untyped-def]
        return None

    with pytest.raises(DefinitionError, match=r"must take a contracts\.Command subclass"):
        service.handler(untyped)

    async def charge(cmd: Charge) -> None:
        return None

    service.handler(charge)
    with pytest.raises(DefinitionError, match="two handlers for 'charge'"):
        service.handler(charge)


async def test_outcomes_are_forgotten_after_their_retention() -> None:
    from datetime import UTC, datetime

    from participants.idempotency import MemoryIdempotency, OutcomeKind, StoredOutcome

    store = MemoryIdempotency(retention=timedelta(days=7))
    now = datetime(2026, 3, 1, tzinfo=UTC)
    await store.put("old", StoredOutcome(OutcomeKind.COMPLETED, stored_at=now - timedelta(days=8)))
    await store.put("new", StoredOutcome(OutcomeKind.COMPLETED, stored_at=now - timedelta(days=6)))
    assert await store.purge(now) == 1
    assert await store.get("old") is None
    assert await store.get("new") is not None


async def test_an_unexpected_exception_crosses_the_bus_as_its_type_and_a_bounded_line(
    clock: VirtualClock,
) -> None:
    from structlog.testing import capture_logs

    service = Participant("payment", error_message_limit=40)

    @service.handler
    async def charge(cmd: Charge) -> Charged:
        raise ConnectionError(
            "could not reach db://admin:hunter2@10.0.0.5 after three tries; the pool is "
            "exhausted and every one of its connections is busy\nTraceback (most recent...)"
        )

    with capture_logs() as logs:
        reply = await service.handle(
            envelope(Charge, {"order_id": "o", "amount": 5}, clock=clock), clock
        )

    assert reply is not None
    assert reply.error is not None
    assert reply.status is ReplyStatus.ERROR
    assert reply.error.type == "ConnectionError"
    assert len(reply.error.message) <= 40
    assert "Traceback" not in reply.error.message
    (logged,) = [entry for entry in logs if entry["event"] == "command_errored"]
    assert logged["exc_info"] is True
    assert logged["error_type"] == "ConnectionError"

    service.error_message_limit = 0
    reply = await service.handle(
        envelope(Charge, {"order_id": "o", "amount": 5}, clock=clock, attempt=2), clock
    )
    assert reply is not None
    assert reply.error is not None
    assert (reply.error.type, reply.error.message) == ("ConnectionError", "")


async def test_a_result_too_large_for_a_reply_is_an_error_not_a_poison_message(
    clock: VirtualClock,
) -> None:
    service = Participant("payment")

    @service.handler
    async def charge(cmd: Charge) -> dict[str, object]:
        return {"blob": "x" * 300_000}

    reply = await service.handle(
        envelope(Charge, {"order_id": "o", "amount": 5}, clock=clock), clock
    )

    assert reply is not None
    assert reply.error is not None
    assert (reply.status, reply.error.type) == (ReplyStatus.ERROR, "ValueError")
    assert "larger than" in reply.error.message


async def test_transactional_handlers_need_ctx_and_a_store_with_transactions() -> None:
    from participants.idempotency import MemoryIdempotency
    from plumbing.errors import ConfigError

    service = Participant("payment")
    with pytest.raises(DefinitionError, match="must take a second parameter"):

        @service.handler(transactional=True)
        async def charge(cmd: Charge) -> None:
            return None

    class NoTransactions(MemoryIdempotency):
        transaction = None  # type: ignore[assignment]

    service = Participant("payment", idempotency=NoTransactions())

    @service.handler(transactional=True)
    async def refund(cmd: Refund, ctx: CommandContext) -> None:
        return None

    with pytest.raises(ConfigError, match=r"transactional handlers \(refund\)"):
        service.check_store()


class Outage(MemoryIdempotency):
    """An idempotency store that is unreachable for its first ``failures`` claims."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def claim(self, key: str, claimant: str, now: datetime, lease: timedelta) -> ClaimResult:
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailable(
                "the idempotency store at postgresql://db/ refused the connection"
            )
        return await super().claim(key, claimant, now, lease)


async def handled_while_time_passes(
    p: Payments, clock: VirtualClock, broker: MemoryBroker
) -> Disposition | DeadLetter:
    command = envelope(Charge, {"order_id": "o", "amount": 5}, clock=clock, deadline_in=3600)
    delivery = Delivery(queue="saga.payment.commands", body=command.model_dump_json().encode())
    task = asyncio.create_task(p.service.on_command(delivery, broker, clock))
    while not task.done():  # virtual time moves only when told: a second per loop turn
        await asyncio.sleep(0)
        clock.set(clock.now() + timedelta(seconds=1))
    return task.result()


async def test_a_store_outage_is_waited_out_not_requeued(clock: VirtualClock) -> None:
    p = Payments()
    p.service.idempotency = Outage(failures=3)
    broker = MemoryBroker(clock)
    await broker.declare(orchestrator_topology(["payment"], QueuePolicy()))  # the replies queue
    verdict = await handled_while_time_passes(p, clock, broker)
    assert verdict is Disposition.ACK  # not requeued: a requeue counts toward the poison limit
    assert p.calls == ["charge#1"]
    assert [m.kind for m in broker.published] == ["reply"]


async def test_a_long_store_outage_gives_the_command_back_after_a_while(
    clock: VirtualClock,
) -> None:
    p = Payments()
    p.service.idempotency = Outage(failures=1000)
    started = clock.now()
    verdict = await handled_while_time_passes(p, clock, MemoryBroker(clock))
    assert verdict is Disposition.REQUEUE
    assert clock.now() - started >= timedelta(seconds=STORE_WAIT)
    assert p.calls == []
