"""A participant whose effect is a database write in the transaction that records its outcome.

``saga participant --app tests.e2e.ledger_app:ledger`` with ``SAGA_IDEMPOTENCY_URL`` set to a
PostgreSQL database that has a ``ledger_entries`` table. Each ``post_entry`` command inserts
one row through ``ctx.transaction``; the test kills the process with SIGKILL at random points
and checks that every entry is in the ledger exactly once.

Two pauses widen the windows the kills should land in, both read from the command: ``hold``
keeps the transaction open after the insert (killed there, the server rolls the row back),
and ``after_commit`` waits between the commit and the reply (killed there, the redelivered
command is answered from the stored outcome).
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from contracts.messages import Command, CommandEnvelope, Reply
from participants import CommandContext, Participant
from participants.progress import ProgressSink
from plumbing.clock import Clock


class PostEntry(Command):
    """Write one ledger entry."""

    entry: str
    amount: int
    hold: float = 0.0
    after_commit: float = 0.0


class EntryPosted(BaseModel):
    """The entry is in the ledger."""

    entry: str


class _PausingAfterCommit(Participant):
    """A participant that waits between storing an outcome and publishing its reply."""

    async def handle(
        self, envelope: CommandEnvelope, clock: Clock, progress: ProgressSink | None = None
    ) -> Reply | None:
        reply = await super().handle(envelope, clock, progress)
        pause = envelope.payload.get("after_commit", 0)
        if isinstance(pause, int | float) and pause > 0:
            await asyncio.sleep(pause)
        return reply


ledger = _PausingAfterCommit("ledger")


@ledger.handler(transactional=True)
async def post_entry(cmd: PostEntry, ctx: CommandContext) -> EntryPosted:
    """Insert the entry in the ledger, in the transaction that records the outcome."""
    await ctx.transaction.execute(
        "INSERT INTO ledger_entries (entry, amount) VALUES ($1, $2)", cmd.entry, cmd.amount
    )
    if cmd.hold:
        await asyncio.sleep(cmd.hold)
    return EntryPosted(entry=cmd.entry)
