"""Turning decisions into outgoing messages, and incoming bytes into validated messages."""

from __future__ import annotations

from datetime import datetime
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from contracts import names
from contracts.messages import (
    CommandEnvelope,
    ErrorDetail,
    JsonObject,
    Reply,
    ReplyStatus,
    StartSaga,
)
from orchestrator import tracing
from orchestrator.engine import Effect, PublishEvent, ScheduleTimer, SendCommand
from orchestrator.errors import MessageRejected
from orchestrator.transport import Delivery, Outgoing

M = TypeVar("M", bound=BaseModel)


def _headers(saga_id: str, message_id: str, kind: str, traceparent: str | None) -> dict[str, str]:
    headers = {
        names.HEADER_SAGA_ID: saga_id,
        names.HEADER_MESSAGE_ID: message_id,
        names.HEADER_MESSAGE_KIND: kind,
    }
    if traceparent:
        headers[names.HEADER_TRACEPARENT] = traceparent
    return headers


def outgoing(effect: Effect, now: datetime) -> Outgoing:
    """The message that carries out one effect of a decision."""
    match effect:
        case SendCommand(service=service, envelope=envelope):
            return Outgoing(
                message_id=envelope.message_id,
                kind="command",
                exchange=names.COMMANDS_EXCHANGE,
                routing_key=service,
                body=envelope.model_dump_json(),
                headers=_headers(
                    envelope.saga_id, envelope.message_id, "command", envelope.traceparent
                ),
                correlation_id=envelope.saga_id,
                created_at=now,
            )
        case ScheduleTimer(message=timer):
            headers = _headers(timer.saga_id, timer.message_id, "timer", timer.traceparent)
            headers[names.HEADER_DUE_AT] = timer.due_at.isoformat()
            return Outgoing(
                message_id=timer.message_id,
                kind="timer",
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
                kind="event",
                exchange=names.EVENTS_EXCHANGE,
                routing_key=names.event_routing_key(event.saga_type, event.event.value),
                body=event.model_dump_json(),
                headers=_headers(event.saga_id, event.event_id, "event", event.traceparent),
                correlation_id=event.saga_id,
                mandatory=False,  # observers are optional; nobody bound is not an error
                created_at=now,
            )


def answer(
    envelope: CommandEnvelope,
    status: ReplyStatus,
    now: datetime,
    *,
    result: JsonObject | None = None,
    error: ErrorDetail | None = None,
) -> Reply:
    """The reply to one command attempt, continuing its trace."""
    message_id = f"reply:{envelope.message_id}"
    return Reply(
        message_id=message_id,
        in_reply_to=envelope.message_id,
        saga_id=envelope.saga_id,
        step=envelope.step,
        direction=envelope.direction,
        attempt=envelope.attempt,
        status=status,
        result=result,
        error=error,
        sent_at=now,
        traceparent=tracing.child(envelope.traceparent, message_id)
        if envelope.traceparent
        else None,
    )


def reply_message(reply: Reply, routing_key: str, now: datetime) -> Outgoing:
    """The message that carries a participant's reply."""
    return Outgoing(
        message_id=reply.message_id,
        kind="reply",
        exchange=names.REPLIES_EXCHANGE,
        routing_key=routing_key,
        body=reply.model_dump_json(),
        headers=_headers(reply.saga_id, reply.message_id, "reply", reply.traceparent),
        correlation_id=reply.saga_id,
        created_at=now,
    )


def start_message(start: StartSaga, now: datetime) -> Outgoing:
    """The message that asks the orchestrator to start a saga."""
    message_id = f"{start.saga_id}:start"
    return Outgoing(
        message_id=message_id,
        kind="start",
        exchange=names.START_EXCHANGE,
        routing_key=names.START_ROUTING_KEY,
        body=start.model_dump_json(),
        headers=_headers(start.saga_id, message_id, "start", start.traceparent),
        correlation_id=start.saga_id,
        created_at=now,
    )


def decode(delivery: Delivery, model: type[M]) -> M:
    """Validate a delivery's body as ``model``.

    Raises:
        MessageRejected: the body is not JSON or does not match the model; the reason says
            which field is wrong, and ends up in the dead-letter header.
    """
    try:
        return model.model_validate_json(delivery.body)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in e.errors()[:5]
        )
        raise MessageRejected(f"not a valid {model.__name__}: {problems}") from e
