"""A parallel group over real RabbitMQ: both members dispatched together, joined, and undone
when one of them fails; the participant SDK acknowledges pick-ups and sends heartbeats.
The orchestrator and the services run in this process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from pydantic import BaseModel

from contracts.messages import Command
from orchestrator.client import SagaClient
from orchestrator.definition import App, Parallel, RetryPolicy, Saga, Step, StepKind
from orchestrator.state import StepStatus
from orchestrator.stores.memory import MemoryStore
from participants import CommandContext, Participant, ParticipantError
from tests.integration.in_process import running

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(600)]


class Trip(BaseModel):
    """What a booking saga starts with."""

    trip_id: str
    card: str = "ok"


class ReserveSeat(Command):
    """Hold a seat."""

    trip_id: str


class ReleaseSeat(Command):
    """Give the seat back."""

    trip_id: str


class ChargeCard(Command):
    """Charge the card, slowly, with heartbeats."""

    trip_id: str
    card: str


class RefundCard(Command):
    """Give the money back."""

    trip_id: str


class SendTicket(Command):
    """Mail the ticket."""

    trip_id: str


TIMEOUT = 60.0
ONCE = RetryPolicy(max_attempts=1)
APP = App(
    [
        Saga(
            "booking",
            data=Trip,
            steps=[
                Parallel(
                    Step(
                        "reserve_seat",
                        service="seats",
                        command=ReserveSeat,
                        compensation=ReleaseSeat,
                        dispatch_timeout=60.0,
                        timeout=TIMEOUT,
                        retry=ONCE,
                    ),
                    Step(
                        "charge_card",
                        service="cards",
                        command=ChargeCard,
                        compensation=RefundCard,
                        heartbeat_timeout=30.0,
                        timeout=TIMEOUT,
                        retry=ONCE,
                    ),
                ),
                Step(
                    "send_ticket",
                    service="mail",
                    command=SendTicket,
                    kind=StepKind.PIVOT,
                    timeout=TIMEOUT,
                    retry=ONCE,
                ),
            ],
        )
    ]
)


@dataclass
class Services:
    done: list[str]
    seat_held: asyncio.Event


def services() -> tuple[list[Participant], Services]:
    seats, cards, mail = Participant("seats"), Participant("cards"), Participant("mail")
    log = Services([], asyncio.Event())

    @seats.handler
    async def reserve_seat(cmd: ReserveSeat) -> dict[str, str]:
        log.done.append(f"reserve {cmd.trip_id}")
        log.seat_held.set()
        return {"seat": "12A"}

    @seats.handler
    async def release_seat(cmd: ReleaseSeat) -> None:
        log.done.append(f"release {cmd.trip_id}")

    @cards.handler
    async def charge_card(cmd: ChargeCard, ctx: CommandContext) -> dict[str, str]:
        # The seat is reserved while this runs: both commands were out at once.
        async with asyncio.timeout(60):
            await log.seat_held.wait()
        await ctx.heartbeat("asking the bank")
        if cmd.card == "declined":
            raise ParticipantError("card declined", type="CardDeclined")
        log.done.append(f"charge {cmd.trip_id}")
        return {"payment": f"pay-{cmd.trip_id}"}

    @cards.handler
    async def refund_card(cmd: RefundCard) -> None:
        log.done.append(f"refund {cmd.trip_id}")

    @mail.handler
    async def send_ticket(cmd: SendTicket) -> None:
        log.done.append(f"ticket {cmd.trip_id}")

    return [seats, cards, mail], log


@dataclass
class Run:
    client: SagaClient
    store: MemoryStore
    log: Services


@pytest.fixture
async def run(vhost_url: str) -> AsyncIterator[Run]:
    store = MemoryStore()
    participants, log = services()
    async with (
        running(vhost_url, APP, store, participants),
        SagaClient(vhost_url, app=APP) as client,
    ):
        yield Run(client, store, log)


async def test_a_group_is_dispatched_together_joined_then_followed(run: Run) -> None:
    handle = await run.client.start("booking", "t-1", Trip(trip_id="t-1"))
    outcome = await handle.result(timeout=120)
    assert outcome.status == "completed"
    assert outcome.results["reserve_seat"] == {"seat": "12A"}
    assert outcome.results["charge_card"] == {"payment": "pay-t-1"}
    assert run.log.done == ["reserve t-1", "charge t-1", "ticket t-1"]
    record = await run.store.load("t-1")
    assert record is not None
    seat, card, ticket = record.state.steps
    assert seat.group == card.group == "reserve_seat+charge_card"
    assert ticket.group is None
    assert seat.picked_up_at is not None  # acknowledged by the SDK: it had a dispatch timeout
    assert card.heartbeat == "asking the bank"  # sent by ctx.heartbeat() over the broker
    assert seat.started_at is not None
    assert card.started_at is not None
    assert seat.finished_at is not None
    assert card.started_at <= seat.finished_at  # both out before either answered


async def test_a_member_that_fails_undoes_the_other_and_the_rest_never_runs(run: Run) -> None:
    handle = await run.client.start("booking", "t-2", Trip(trip_id="t-2", card="declined"))
    outcome = await handle.result(timeout=120)
    assert outcome.status == "failed"
    assert outcome.error is not None
    assert outcome.error.type == "CardDeclined"
    assert run.log.done == ["reserve t-2", "release t-2"]  # no ticket, nothing charged
    record = await run.store.load("t-2")
    assert record is not None
    statuses = [step.status for step in record.state.steps]
    assert statuses == [StepStatus.COMPENSATED, StepStatus.FAILED, StepStatus.NOT_STARTED]
