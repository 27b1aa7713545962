"""What a decision asks the shell to do, and the messages that carry it out.

The pure core (:mod:`orchestrator.engine`) returns effects; the shell appends the message of
each one to the saga's outbox (:func:`outgoing`) and publishes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from contracts import names
from contracts.events import LifecycleEvent
from contracts.messages import CommandEnvelope, TimerMessage
from plumbing.codec import message_headers
from plumbing.transport import MessageKind, Outgoing


@dataclass(frozen=True)
class SendCommand:
    """Publish a command to a participant service's queue."""

    service: str
    envelope: CommandEnvelope


@dataclass(frozen=True)
class ScheduleTimer:
    """Publish a delayed wake-up that arrives at ``message.due_at``."""

    message: TimerMessage


@dataclass(frozen=True)
class PublishEvent:
    """Publish a lifecycle event to observers."""

    event: LifecycleEvent


Effect = SendCommand | ScheduleTimer | PublishEvent
"""Everything the shell must do after saving a decision."""


def outgoing(effect: Effect, now: datetime) -> Outgoing:
    """The message that carries out one effect of a decision."""
    match effect:
        case SendCommand(service=service, envelope=envelope):
            return Outgoing(
                message_id=envelope.message_id,
                kind=MessageKind.COMMAND,
                exchange=names.COMMANDS_EXCHANGE,
                routing_key=service,
                body=envelope.model_dump_json(),
                headers=message_headers(
                    envelope.saga_id, envelope.message_id, MessageKind.COMMAND, envelope.traceparent
                ),
                correlation_id=envelope.saga_id,
                created_at=now,
            )
        case ScheduleTimer(message=timer):
            headers = message_headers(
                timer.saga_id, timer.message_id, MessageKind.TIMER, timer.traceparent
            )
            headers[names.HEADER_DUE_AT] = timer.due_at.isoformat()
            return Outgoing(
                message_id=timer.message_id,
                kind=MessageKind.TIMER,
                exchange="",
                routing_key=names.TIMERS_QUEUE,
                body=timer.model_dump_json(),
                headers=headers,
                correlation_id=timer.saga_id,
                deliver_at=timer.due_at,
                created_at=now,
            )
        case PublishEvent(event=event):
            return Outgoing(
                message_id=event.event_id,
                kind=MessageKind.EVENT,
                exchange=names.EVENTS_EXCHANGE,
                routing_key=names.event_routing_key(event.saga_type, event.event.value),
                body=event.model_dump_json(),
                headers=message_headers(
                    event.saga_id, event.event_id, MessageKind.EVENT, event.traceparent
                ),
                correlation_id=event.saga_id,
                mandatory=False,  # observers are optional; nobody bound is not an error
                created_at=now,
            )
