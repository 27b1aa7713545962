"""Telling the orchestrator how a command is going before it is answered: pick-ups and
heartbeats.

A step with a dispatch timeout asks (``pickup_by`` in the envelope) to hear that its command
was taken off the queue; a step with a heartbeat timeout asks (``heartbeat_timeout``) to hear
regularly from a long-running handler. Both travel to the replies queue as small messages the
orchestrator folds into the running attempt's due time.

Heartbeats are coalesced here: a handler may call ``ctx.heartbeat()`` in a tight loop, but at
most one is sent per third of the step's heartbeat timeout (the first at once), so two can be
lost or late and the attempt still lives; each one sent costs the orchestrator a store write.
A step without a heartbeat timeout did not ask for heartbeats, and none are sent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

import structlog

from contracts.messages import CommandEnvelope, Heartbeat, PickedUp
from plumbing.clock import Clock
from plumbing.errors import PublishFailed

log = structlog.get_logger("participant")

ProgressSink = Callable[[PickedUp | Heartbeat], Awaitable[None]]
"""Sends a pick-up or heartbeat to the orchestrator (the participant's transport)."""

DETAILS_LIMIT = 1000
"""Characters of heartbeat details sent (the wire's bound)."""


def picked_up(envelope: CommandEnvelope, now: datetime) -> PickedUp:
    """The acknowledgement that ``envelope`` was taken off the queue."""
    return PickedUp(
        message_id=f"picked_up:{envelope.message_id}",
        saga_id=envelope.saga_id,
        step=envelope.step,
        direction=envelope.direction,
        attempt=envelope.attempt,
        sent_at=now,
    )


def missed_pickup(envelope: CommandEnvelope, now: datetime) -> bool:
    """Whether ``envelope`` reached this service after its pick-up deadline.

    The orchestrator has then already given up on this attempt (it reported the step not
    picked up and retried or failed it), so the command must not start here.
    """
    return envelope.pickup_by is not None and now > envelope.pickup_by


class Beats:
    """The heartbeats of one command attempt, coalesced to what the step asked for."""

    def __init__(self, envelope: CommandEnvelope, clock: Clock, sink: ProgressSink | None):
        self._envelope = envelope
        self._clock = clock
        self._sink = sink if envelope.heartbeat_timeout is not None else None
        timeout = envelope.heartbeat_timeout or 0.0
        self._every = timedelta(seconds=timeout / 3)
        self._last: datetime | None = None
        self._sent = 0

    @property
    def sent(self) -> int:
        """How many heartbeats were sent for this attempt."""
        return self._sent

    async def beat(self, details: str | None) -> None:
        """Send a heartbeat unless one went out less than a third of the timeout ago."""
        if self._sink is None:
            return
        now = self._clock.now()
        if self._last is not None and now - self._last < self._every:
            return
        self._last = now
        self._sent += 1
        envelope = self._envelope
        message = Heartbeat(
            message_id=f"heartbeat:{envelope.message_id}:{self._sent}",
            saga_id=envelope.saga_id,
            step=envelope.step,
            direction=envelope.direction,
            attempt=envelope.attempt,
            details=None if details is None else details[:DETAILS_LIMIT],
            sent_at=now,
        )
        await send(self._sink, message)


async def send(sink: ProgressSink, message: PickedUp | Heartbeat) -> None:
    """Send a pick-up or a heartbeat; a publish that fails is logged, never raised.

    The command's work goes on regardless: a lost pick-up or heartbeat only makes this service
    look slow to the orchestrator, whose step policy then decides (and the next heartbeat, a
    third of the timeout later, may well get through).
    """
    try:
        await sink(message)
    except PublishFailed as e:
        log.warning("progress_publish_failed", kind=message.kind, error=str(e))
