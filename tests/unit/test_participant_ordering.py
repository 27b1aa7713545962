"""Issue 10's two money-losing defects, and the claims that replace the in-process guesswork.

1. A command redelivered after its deadline, having been executed, must answer from the store
   (``completed``), never ``DeadlineExceeded`` (which the orchestrator reads as "not executed",
   so the charge would never be refunded).
2. Commands of one saga run one at a time however many wait: a compensation never overtakes
   the forward command it undoes.

Plus the claim protocol in one process with several "replicas" sharing one store: the same
command given to two replicas at once runs once, and a crashed claimant's lease runs out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import timedelta
from typing import Any

from pydantic import BaseModel

from contracts.messages import (
    Command,
    CommandEnvelope,
    Direction,
    ReplyStatus,
    command_message_id,
    idempotency_key,
)
from examples.order_fulfillment import app
from examples.order_fulfillment.services import payment, payment_ledger
from orchestrator.state import SagaStatus, StepStatus
from orchestrator.testing import SagaHarness, fail
from participants import CommandContext, Participant
from participants.idempotency import MemoryIdempotency
from plumbing.clock import Clock
from plumbing.errors import PublishFailed
from plumbing.memory import VirtualClock
from plumbing.topology import Topology
from plumbing.transport import DeadLetter, Delivery, Disposition, Handler, Outgoing, Transport

SAGA = "s-1"


class Charge(Command):
    order_id: str


class Refund(Command):
    order_id: str


class Step(Command):
    n: int


class Charged(BaseModel):
    payment_id: str


def envelope(
    command: type[Command],
    clock: Clock,
    *,
    direction: Direction = Direction.FORWARD,
    attempt: int = 1,
    deadline_in: float = 60,
) -> CommandEnvelope:
    return CommandEnvelope(
        message_id=command_message_id(SAGA, "charge", direction, attempt),
        saga_id=SAGA,
        saga_type="t",
        step="charge",
        command=command.name(),
        direction=direction,
        attempt=attempt,
        idempotency_key=idempotency_key(SAGA, "charge", direction),
        payload={"order_id": "o-1"},
        reply_to="saga.replies",
        sent_at=clock.now(),
        deadline=clock.now() + timedelta(seconds=deadline_in),
    )


class Bank:
    """A payment service whose charges can be held open, with a ledger of what happened."""

    def __init__(self, store: MemoryIdempotency | None = None, name: str = "payment") -> None:
        self.service = Participant(name, idempotency=store or MemoryIdempotency())
        self.ledger: list[str] = []
        self.gates: dict[int, asyncio.Event] = {}
        self.entered: dict[int, asyncio.Event] = {}
        self.transient: set[int] = set()
        self.service.handler(self.charge)
        self.service.handler(self.refund)

    def gate(self, attempt: int) -> asyncio.Event:
        self.entered.setdefault(attempt, asyncio.Event())
        return self.gates.setdefault(attempt, asyncio.Event())

    async def charge(self, cmd: Charge, ctx: CommandContext) -> Charged:
        if ctx.attempt in self.gates:
            self.entered[ctx.attempt].set()
            await self.gates[ctx.attempt].wait()
        if ctx.attempt in self.transient:
            raise TimeoutError("the gateway did not answer")
        self.ledger.append("charged")
        return Charged(payment_id="pay-1")

    async def refund(self, cmd: Refund, ctx: CommandContext) -> None:
        if "charged" in self.ledger:
            self.ledger.append("refunded")
        else:
            self.ledger.append("refund-of-nothing")


async def drain(turns: int = 100) -> None:
    """Let every task that can run do so: with in-memory stores nothing waits on I/O, so a
    task still unfinished after this is waiting on something (a lock, an event)."""
    for _ in range(turns):
        await asyncio.sleep(0)


async def test_a_compensation_never_overtakes_its_forward_command() -> None:
    clock = VirtualClock()
    bank = Bank()
    bank.transient.add(1)  # attempt 1 is the duplicate that ends in a gateway timeout
    first_gate, second_gate = bank.gate(1), bank.gate(2)
    handle = bank.service.handle

    first = asyncio.create_task(handle(envelope(Charge, clock, attempt=1), clock))
    await bank.entered[1].wait()
    second = asyncio.create_task(handle(envelope(Charge, clock, attempt=2), clock))
    await drain()  # attempt 2 now waits for the saga's lock
    first_gate.set()
    assert (await first).status is ReplyStatus.ERROR  # type: ignore[union-attr]
    # Attempt 2 has been woken to take the lock; the refund arrives right now.
    refund = asyncio.create_task(
        handle(envelope(Refund, clock, direction=Direction.COMPENSATION), clock)
    )
    await drain()
    second_gate.set()
    charged, refunded = await asyncio.gather(second, refund)

    assert bank.ledger == ["charged", "refunded"]
    assert charged is not None
    assert charged.status is ReplyStatus.COMPLETED
    assert refunded is not None
    assert refunded.status is ReplyStatus.COMPLETED
    assert not bank.service._locks  # forgotten once nobody holds or waits for it


async def test_a_saga_lock_holds_for_any_number_of_waiters() -> None:
    clock = VirtualClock()
    service = Participant("svc")
    running = 0
    most = 0

    @service.handler
    async def step(cmd: Step) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0)
        running -= 1

    def command(n: int) -> CommandEnvelope:
        return CommandEnvelope(
            message_id=f"m-{n}",
            saga_id=SAGA,
            saga_type="t",
            step=f"step-{n}",
            command="step",
            direction=Direction.FORWARD,
            attempt=1,
            idempotency_key=f"fwd:{SAGA}:step-{n}",
            payload={"n": n},
            reply_to="saga.replies",
            sent_at=clock.now(),
        )

    await asyncio.gather(*(service.handle(command(n), clock) for n in range(12)))

    assert most == 1
    assert not service._locks


async def test_an_executed_command_redelivered_past_its_deadline_answers_from_the_store() -> None:
    clock = VirtualClock()
    bank = Bank()
    executed = await bank.service.handle(envelope(Charge, clock, deadline_in=10), clock)
    assert executed is not None
    assert executed.status is ReplyStatus.COMPLETED
    clock.set(clock.now() + timedelta(seconds=11))

    again = await bank.service.handle(envelope(Charge, clock, deadline_in=-1), clock)

    assert again is not None
    assert (again.status, again.result) == (ReplyStatus.COMPLETED, {"payment_id": "pay-1"})
    assert bank.ledger == ["charged"]


async def test_a_command_never_executed_is_refused_past_its_deadline() -> None:
    clock = VirtualClock()
    bank = Bank()
    late = envelope(Charge, clock, deadline_in=10)
    clock.set(clock.now() + timedelta(seconds=11))

    reply = await bank.service.handle(late, clock)

    assert reply is not None
    assert reply.status is ReplyStatus.ERROR
    assert reply.error is not None
    assert reply.error.type == "DeadlineExceeded"
    assert bank.ledger == []
    # Refusing it claimed nothing: the key is free for a later attempt within its deadline.
    assert await bank.service.idempotency.get(late.idempotency_key) is None
    assert (await bank.service.handle(envelope(Charge, clock), clock)).status is (  # type: ignore[union-attr]
        ReplyStatus.COMPLETED
    )


async def test_a_stale_forward_command_after_its_compensation_is_still_refused() -> None:
    clock = VirtualClock()
    bank = Bank()
    undo = await bank.service.handle(
        envelope(Refund, clock, direction=Direction.COMPENSATION), clock
    )
    late = await bank.service.handle(envelope(Charge, clock, deadline_in=-5), clock)

    assert undo is not None
    assert undo.status is ReplyStatus.COMPLETED
    assert late is not None
    assert late.error is not None
    assert (late.status, late.error.type) == (ReplyStatus.FAILED, "Cancelled")
    assert bank.ledger == ["refund-of-nothing"]


# --- claims across replicas (one process, one shared store) ----------------------------------


async def test_the_same_command_given_to_two_replicas_at_once_runs_once() -> None:
    clock = VirtualClock()
    store = MemoryIdempotency()
    replicas = [Bank(store), Bank(store)]
    for replica in replicas:
        replica.gate(1)
    calls = [replica.service.handle(envelope(Charge, clock), clock) for replica in replicas]
    tasks = [asyncio.create_task(call) for call in calls]
    entered = [asyncio.create_task(r.entered[1].wait()) for r in replicas]
    _, waiting = await asyncio.wait(entered, return_when=asyncio.FIRST_COMPLETED)
    for task in waiting:
        task.cancel()
    await drain()  # the other replica found the claim and waits (on the virtual clock)
    for replica in replicas:
        replica.gates[1].set()
    replies = await _with_time_moving(clock, asyncio.gather(*tasks))

    assert sum(len(r.ledger) for r in replicas) == 1
    assert [reply.status for reply in replies] == [ReplyStatus.COMPLETED] * 2  # type: ignore[union-attr]
    assert replies[0].result == replies[1].result  # type: ignore[union-attr]


async def test_a_crashed_claimants_command_runs_again_once_its_lease_runs_out() -> None:
    clock = VirtualClock()
    store = MemoryIdempotency()
    crashed = envelope(Charge, clock, deadline_in=5)
    # A replica claimed it and died without an outcome (SIGKILL): its lease is not renewed.
    await store.claim(crashed.idempotency_key, "dead-replica", clock.now(), timedelta(seconds=30))
    bank = Bank(store)

    reply = await _with_time_moving(clock, bank.service.handle(crashed, clock))

    # Past its deadline by now, but it may have run before: it runs again, not "expired".
    assert clock.now() > crashed.deadline  # type: ignore[operator]
    assert reply is not None
    assert reply.status is ReplyStatus.COMPLETED
    assert bank.ledger == ["charged"]


async def test_a_compensation_waits_for_its_forward_command_on_another_replica() -> None:
    clock = VirtualClock()
    store = MemoryIdempotency()
    charging, refunding = Bank(store), Bank(store)
    gate = charging.gate(1)
    forward = asyncio.create_task(charging.service.handle(envelope(Charge, clock), clock))
    await charging.entered[1].wait()
    compensation = asyncio.create_task(
        refunding.service.handle(envelope(Refund, clock, direction=Direction.COMPENSATION), clock)
    )
    await drain()
    assert not compensation.done()  # the forward command's live claim holds it back
    gate.set()
    replies = await _with_time_moving(clock, asyncio.gather(forward, compensation))

    assert [r.status for r in replies] == [ReplyStatus.COMPLETED] * 2  # type: ignore[union-attr]
    assert charging.ledger == ["charged"]
    # The refund ran after the charge was stored (its own ledger is separate here).
    assert await store.get(idempotency_key(SAGA, "charge", Direction.FORWARD)) is not None


async def test_a_long_handler_keeps_its_claim() -> None:
    clock = VirtualClock()
    store = MemoryIdempotency()
    slow, other = Bank(store), Bank(store)
    slow.service.lease = other.service.lease = timedelta(seconds=3)
    slow.gate(1)
    first = asyncio.create_task(slow.service.handle(envelope(Charge, clock), clock))
    await slow.entered[1].wait()
    # Far past the lease: the running claimant renews it every second.
    for _ in range(20):
        await drain()
        clock.set(clock.now() + timedelta(seconds=1))
    second = asyncio.create_task(other.service.handle(envelope(Charge, clock, attempt=2), clock))
    await drain()
    assert not second.done()
    slow.gates[1].set()
    replies = await _with_time_moving(clock, asyncio.gather(first, second))

    assert slow.ledger == ["charged"]
    assert other.ledger == []
    assert [r.status for r in replies] == [ReplyStatus.COMPLETED] * 2  # type: ignore[union-attr]


async def _with_time_moving(clock: VirtualClock, work: Awaitable[Any]) -> Any:
    """Await ``work`` while moving the virtual clock a second at a time (for waiters)."""
    task = asyncio.ensure_future(work)
    for _ in range(600):
        await drain()
        if task.done():
            return task.result()
        clock.set(clock.now() + timedelta(seconds=1))
    task.cancel()
    raise AssertionError("the work did not finish within 600 virtual seconds")


# --- the defect end to end: the orchestrator and the real payment service ---------------------


class _BrokerDied:
    """The payment service on the harness broker, whose first ``completed`` reply cannot be
    published (the broker died) and whose redelivery is held back until the test lets it go."""

    def __init__(self, participant: Participant) -> None:
        self.participant = participant
        self.service = participant.service
        self.held: list[tuple[Delivery, Handler]] = []
        self.failed_once = False

    async def run(self, transport: Transport, *, clock: Clock | None = None) -> None:
        await self.participant.run(_Flaky(transport, self), clock=clock)

    async def redeliver(self) -> Disposition | DeadLetter:
        delivery, handler = self.held.pop()
        return await handler(delivery)


class _Flaky:
    def __init__(self, inner: Transport, outer: _BrokerDied) -> None:
        self.inner = inner
        self.outer = outer

    async def declare(self, topology: Topology) -> None:
        await self.inner.declare(topology)

    async def publish(self, message: Outgoing) -> None:
        completed = '"status":"completed"' in message.body
        if message.kind == "reply" and completed and not self.outer.failed_once:
            self.outer.failed_once = True
            raise PublishFailed("the broker closed the connection [connection]")
        await self.inner.publish(message)

    async def consume(
        self, queue: str, handler: Handler, *, ready: asyncio.Event | None = None
    ) -> None:
        async def holding(delivery: Delivery) -> Disposition | DeadLetter:
            verdict = await handler(delivery)
            if verdict is Disposition.REQUEUE:
                self.outer.held.append((delivery, handler))
                return Disposition.ACK  # redelivered by the test, once the deadline passed
            return verdict

        await self.inner.consume(queue, holding, ready=ready)

    async def close(self) -> None:
        await self.inner.close()


async def test_an_executed_charge_redelivered_after_its_deadline_is_compensated() -> None:
    order = {
        "order_id": "o-deadline",
        "customer_id": "c-1",
        "items": [{"sku": "SKU-1", "quantity": 1, "unit_price": "30.00"}],
        "payment_method": "card",
        "shipping_address": "1 Main St",
        # The gateway times out twice: the charge runs on the step's third and last attempt.
        "simulate": {"process_payment": "error:2"},
    }
    flaky = _BrokerDied(payment)
    async with SagaHarness(app).mount(flaky) as h:
        h.participant("shipping").on("create_shipment", fail("no such street"))
        await h.start("order_fulfillment", "o-deadline", order)
        await h.advance(seconds=30)  # the two retries' backoffs
        # The charge ran and its outcome is stored; the reply was lost with the broker.
        assert payment_ledger.applied["o-deadline"] == "pay-o-deadline"
        assert flaky.held
        step = (await h.saga("o-deadline")).step("process_payment")
        assert step.attempt == 3  # the last one the policy allows
        # The broker is back after the step's deadline; its timer is late (it was down too).
        assert step.due_at is not None
        h.clock.set(step.due_at + timedelta(seconds=1))
        assert await flaky.redeliver() is Disposition.ACK
        await h.settle()
        await h.advance(minutes=30)  # the late timer, and anything else due
        saga = await h.saga("o-deadline")

    assert saga.status is SagaStatus.FAILED
    assert saga.step("process_payment").status is StepStatus.COMPENSATED
    assert "o-deadline" in payment_ledger.undone  # the charge was refunded
    assert h.command_names("o-deadline") == [
        "reserve_inventory",
        "process_payment",
        "process_payment",
        "process_payment",
        "create_shipment",
        "refund_payment",
        "release_inventory",
    ]
