"""Two replicas of one participant service over real RabbitMQ and PostgreSQL.

The same command delivered to both at once (a duplicate publish) runs its handler once: the
first replica's claim makes the other wait, and the other answers from the stored outcome.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import BaseModel

from contracts import names
from contracts.messages import (
    Command,
    CommandEnvelope,
    Direction,
    Reply,
    ReplyStatus,
    command_message_id,
    idempotency_key,
)
from participants import CommandContext, Participant
from participants.idempotency_stores import PostgresIdempotency
from participants.progress import ProgressSink
from plumbing.clock import Clock
from plumbing.codec import decode
from plumbing.rabbitmq import RabbitTransport
from plumbing.topology import BindingSpec, QueuePolicy, QueueSpec, Topology, participant_topology
from plumbing.transport import Delivery, Disposition, MessageKind, Outgoing

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

REPLIES = "replicas-test.replies"


class Charge(Command):
    order_id: str


class Charged(BaseModel):
    payment_id: str
    replica: str


class Replica(Participant):
    """A payment replica that says when a command reached it (before its claim)."""

    def __init__(self, name: str, store: PostgresIdempotency, arrived: dict[str, asyncio.Event]):
        super().__init__("payment", idempotency=store)
        self.name = name
        self.arrived = arrived

    async def handle(
        self, envelope: CommandEnvelope, clock: Clock, progress: ProgressSink | None = None
    ) -> Reply | None:
        self.arrived[self.name].set()
        return await super().handle(envelope, clock, progress)


def command() -> Outgoing:
    envelope = CommandEnvelope(
        message_id=command_message_id("o-1", "charge", Direction.FORWARD, 1),
        saga_id="o-1",
        saga_type="order",
        step="charge",
        command="charge",
        direction=Direction.FORWARD,
        attempt=1,
        idempotency_key=idempotency_key("o-1", "charge", Direction.FORWARD),
        payload={"order_id": "o-1"},
        reply_to=REPLIES,
        sent_at=datetime.now(UTC),
        deadline=datetime.now(UTC) + timedelta(minutes=5),
    )
    return Outgoing(
        message_id=envelope.message_id,
        kind=MessageKind.COMMAND,
        exchange=names.COMMANDS_EXCHANGE,
        routing_key="payment",
        body=envelope.model_dump_json(),
        headers={names.HEADER_MESSAGE_ID: envelope.message_id},
        correlation_id="o-1",
        created_at=datetime.now(UTC),
    )


@pytest.mark.parametrize("transactional", [False, True], ids=["claimed", "transactional"])
async def test_the_same_command_delivered_to_two_replicas_at_once_runs_once(
    vhost_url: str, postgres_url: str, unique: str, transactional: bool
) -> None:
    table = f"idem_replicas_{unique}"
    stores = [PostgresIdempotency(postgres_url, table=table) for _ in range(2)]
    arrived = {"a": asyncio.Event(), "b": asyncio.Event()}
    calls: list[str] = []
    replicas = [Replica(name, store, arrived) for name, store in zip("ab", stores, strict=True)]
    for replica in replicas:

        async def charge(cmd: Charge, ctx: CommandContext, name: str = replica.name) -> Charged:
            calls.append(name)
            async with asyncio.timeout(30):  # both replicas hold a copy before this one ends
                await asyncio.gather(*(event.wait() for event in arrived.values()))
            if ctx.transaction is not None:
                await ctx.transaction.execute("SELECT 1")
            return Charged(payment_id="pay-1", replica=name)

        replica.handler(transactional=transactional)(charge)

    transports = [RabbitTransport(vhost_url, prefetch=1) for _ in range(3)]
    replies: list[Reply] = []
    two = asyncio.Event()

    async def on_reply(delivery: Delivery) -> Disposition:
        replies.append(decode(delivery, Reply))
        if len(replies) == 2:
            two.set()
        return Disposition.ACK

    policy = QueuePolicy()
    observer = transports[2]
    await observer.declare(
        participant_topology("payment", policy)
        + Topology(
            queues=(QueueSpec(REPLIES, policy.arguments()),),
            bindings=(BindingSpec(names.REPLIES_EXCHANGE, REPLIES, REPLIES),),
        )
    )
    try:
        async with asyncio.TaskGroup() as group:
            ready = [asyncio.Event() for _ in replicas]
            running = [
                group.create_task(replica.run(transport, ready=event))
                for replica, transport, event in zip(replicas, transports[:2], ready, strict=True)
            ]
            running.append(group.create_task(observer.consume(REPLIES, on_reply)))
            async with asyncio.timeout(60):
                for event in ready:
                    await event.wait()
                await observer.publish(command())
                await observer.publish(command())  # the duplicate (a publisher retry)
                await two.wait()
            for task in running:
                task.cancel()
    finally:
        for transport in transports:
            await transport.close()
        await stores[0].drop()
        for store in stores:
            await store.close()

    assert len(calls) == 1
    assert [r.status for r in replies] == [ReplyStatus.COMPLETED] * 2
    assert replies[0].result == replies[1].result == {"payment_id": "pay-1", "replica": calls[0]}
