"""Exactly-once effects under SIGKILL: a real participant process, real RabbitMQ, PostgreSQL.

The ledger service (``tests/e2e/ledger_app.py``) writes each entry in the transaction that
records the command's outcome. The test sends commands straight to its queue, kills the
process with SIGKILL at random points (inside the transaction, between the commit and the
reply, between commands), restarts it, and in the end checks the ledger: every entry exactly
once, and every command answered ``completed``.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from datetime import UTC, datetime

import asyncpg
import pytest

from contracts import names
from contracts.messages import (
    CommandEnvelope,
    Direction,
    Reply,
    ReplyStatus,
    command_message_id,
    idempotency_key,
)
from orchestrator.processes import Daemon, free_port
from plumbing.codec import decode
from plumbing.rabbitmq import RabbitTransport
from plumbing.topology import (
    BindingSpec,
    QueuePolicy,
    QueueSpec,
    Topology,
    participant_topology,
)
from plumbing.transport import Delivery, Disposition, MessageKind, Outgoing

pytestmark = [
    pytest.mark.slow,
    pytest.mark.rabbitmq,
    pytest.mark.postgres,
    pytest.mark.timeout(900),
]

COMMANDS = 40
KILLS = 12
REPLIES = "ledger-test.replies"


def command(n: int, rng: random.Random) -> Outgoing:
    saga_id = f"entry-{n:03d}"
    envelope = CommandEnvelope(
        message_id=command_message_id(saga_id, "post", Direction.FORWARD, 1),
        saga_id=saga_id,
        saga_type="ledger",
        step="post",
        command="post_entry",
        direction=Direction.FORWARD,
        attempt=1,
        idempotency_key=idempotency_key(saga_id, "post", Direction.FORWARD),
        payload={
            "entry": saga_id,
            "amount": n,
            "hold": round(rng.uniform(0, 0.25), 3),
            "after_commit": round(rng.uniform(0, 0.1), 3),
        },
        reply_to=REPLIES,
        sent_at=datetime.now(UTC),
    )
    return Outgoing(
        message_id=envelope.message_id,
        kind=MessageKind.COMMAND,
        exchange=names.COMMANDS_EXCHANGE,
        routing_key="ledger",
        body=envelope.model_dump_json(),
        headers={names.HEADER_MESSAGE_ID: envelope.message_id, names.HEADER_SAGA_ID: saga_id},
        correlation_id=saga_id,
        created_at=datetime.now(UTC),
    )


async def test_every_entry_is_in_the_ledger_exactly_once_across_sigkills(
    vhost_url: str, database_url: str
) -> None:
    rng = random.Random(10)
    db = await asyncpg.connect(database_url)
    await db.execute("CREATE TABLE ledger_entries (entry text NOT NULL, amount integer NOT NULL)")
    policy = QueuePolicy()
    transport = RabbitTransport(vhost_url)
    replies: list[Reply] = []
    progress = asyncio.Event()

    async def on_reply(delivery: Delivery) -> Disposition:
        replies.append(decode(delivery, Reply))
        progress.set()
        return Disposition.ACK

    port = free_port()
    daemon = Daemon(
        "ledger",
        ("participant", "--app", "tests.e2e.ledger_app:ledger"),
        {
            "SAGA_AMQP_URL": vhost_url,
            "SAGA_IDEMPOTENCY_URL": database_url,
            "SAGA_HTTP_PORT": str(port),
            "SAGA_PREFETCH": "2",
            # A claim left by a killed process is a rolled-back row in PostgreSQL: nothing to
            # wait out. The lease only matters for non-transactional handlers.
            "SAGA_IDEMPOTENCY_LEASE": "5",
            "SAGA_LOG_LEVEL": "error",
        },
        port,
    )
    kills = 0
    try:
        await transport.declare(
            participant_topology("ledger", policy)
            + Topology(
                queues=(QueueSpec(REPLIES, policy.arguments()),),
                bindings=(BindingSpec(names.REPLIES_EXCHANGE, REPLIES, REPLIES),),
            )
        )
        for n in range(COMMANDS):
            await transport.publish(command(n, rng))
        consumer = asyncio.create_task(transport.consume(REPLIES, on_reply))
        try:
            async with asyncio.timeout(600):
                while kills < KILLS and len({r.saga_id for r in replies}) < COMMANDS:
                    await daemon.start()
                    await daemon.wait_ready(within=60)
                    # Kill only after some progress, so no command is killed forever; the
                    # random delay puts the kill inside a transaction, after a commit, or
                    # between commands.
                    progress.clear()
                    await progress.wait()
                    await asyncio.sleep(rng.uniform(0, 0.3))
                    await daemon.kill()
                    kills += 1
                await daemon.start()
                while len({r.saga_id for r in replies}) < COMMANDS:
                    progress.clear()
                    await progress.wait()
            await daemon.stop()
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
        rows = await db.fetch("SELECT entry, count(*) AS n FROM ledger_entries GROUP BY entry")
        outcomes = await db.fetchval("SELECT count(*) FROM saga_idempotency WHERE kind IS NOT NULL")
    finally:
        if daemon.process is not None and daemon.process.returncode is None:
            await daemon.kill()
        await transport.close()
        await db.close()

    assert kills == KILLS
    ledger = {row["entry"]: row["n"] for row in rows}
    assert sorted(ledger) == [f"entry-{n:03d}" for n in range(COMMANDS)]
    assert set(ledger.values()) == {1}, {e: n for e, n in ledger.items() if n != 1}
    assert outcomes == COMMANDS
    assert {r.status for r in replies} == {ReplyStatus.COMPLETED}
    answered = Counter(r.saga_id for r in replies)  # twice: killed after its commit
    assert all(answered[f"entry-{n:03d}"] >= 1 for n in range(COMMANDS))
