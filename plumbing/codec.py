"""The wire codec both sides share: replies and start requests as messages, bytes as models.

The orchestrator turns its decisions into messages in :mod:`orchestrator.effects`; what
participants and clients send, and how any process validates what it receives, lives here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, TypeVar

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from contracts import names
from contracts.client import (
    OperateSaga,
    OperationAnswer,
    QuerySaga,
    SagaOutcome,
    SagaSnapshot,
    StartAnswer,
)
from contracts.messages import (
    WIRE_CONTEXT,
    CommandEnvelope,
    ErrorDetail,
    Heartbeat,
    JsonObject,
    PickedUp,
    Reply,
    ReplyStatus,
    StartSaga,
)
from plumbing import tracing
from plumbing.errors import MessageRejected
from plumbing.transport import Delivery, MessageKind, Outgoing

M = TypeVar("M", bound=BaseModel)


def wire_message(
    kind: MessageKind,
    *,
    message_id: str,
    saga_id: str,
    traceparent: str | None,
    exchange: str,
    routing_key: str,
    body: str,
    now: datetime,
    mandatory: bool = True,
    deliver_at: datetime | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> Outgoing:
    """One of our messages: the saga id as correlation id, and our message id, the kind and
    the trace context in headers, so every receiver can drop duplicates and continue the trace.
    """
    headers = {
        names.HEADER_SAGA_ID: saga_id,
        names.HEADER_MESSAGE_ID: message_id,
        names.HEADER_MESSAGE_KIND: kind,
        **(extra_headers or {}),
    }
    if traceparent:
        headers[names.HEADER_TRACEPARENT] = traceparent
    # Built from typed values we made ourselves: validating them again is pure overhead on
    # the hot path (every message of every transition).
    return Outgoing.model_construct(
        message_id=message_id,
        kind=kind,
        exchange=exchange,
        routing_key=routing_key,
        body=body,
        headers=headers,
        correlation_id=saga_id,
        mandatory=mandatory,
        deliver_at=deliver_at,
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
        tracestate=envelope.tracestate if envelope.traceparent else None,
    )


def reply_message(reply: Reply, routing_key: str, now: datetime) -> Outgoing:
    """The message that carries a participant's reply."""
    return wire_message(
        MessageKind.REPLY,
        message_id=reply.message_id,
        saga_id=reply.saga_id,
        traceparent=reply.traceparent,
        exchange=names.REPLIES_EXCHANGE,
        routing_key=routing_key,
        body=reply.model_dump_json(),
        now=now,
    )


def answer_message(
    answer: StartAnswer | SagaSnapshot | SagaOutcome | OperationAnswer,
    reply_to: str,
    now: datetime,
    request: str | None = None,
) -> Outgoing:
    """The message that carries the orchestrator's answer to a client's own queue; its id
    names the ``request`` answered when there may be several (an operator's actions).

    Through the default exchange and not mandatory: a client that went away misses it, and
    can ask again.
    """
    return wire_message(
        MessageKind.ANSWER,
        message_id=f"{request or answer.saga_id}:{answer.kind}:{reply_to}",
        saga_id=answer.saga_id,
        traceparent=None,
        exchange="",
        routing_key=reply_to,
        body=answer.model_dump_json(),
        now=now,
        mandatory=False,
    )


def query_message(query: QuerySaga | OperateSaga, message_id: str, now: datetime) -> Outgoing:
    """The message that asks the orchestrator about a saga: its state, or an operator's action
    applied."""
    return wire_message(
        MessageKind.QUERY,
        message_id=message_id,
        saga_id=query.saga_id,
        traceparent=None,
        exchange="",
        routing_key=names.QUERIES_QUEUE,
        body=query.model_dump_json(),
        now=now,
    )


def start_message(start: StartSaga, now: datetime) -> Outgoing:
    """The message that asks the orchestrator to start a saga."""
    return wire_message(
        MessageKind.START,
        message_id=f"{start.saga_id}:start",
        saga_id=start.saga_id,
        traceparent=start.traceparent,
        exchange=names.START_EXCHANGE,
        routing_key=names.START_ROUTING_KEY,
        body=start.model_dump_json(),
        now=now,
    )


def validation_summary(error: ValidationError, limit: int = 5) -> str:
    """The first ``limit`` problems of a validation error on one line: ``field: what``.

    A field name can come from the input (an unknown key), so control characters are shown
    escaped and each name is cut short: the summary ends up in logs and message headers.
    """
    return "; ".join(
        f"{_printable('.'.join(str(part) for part in problem['loc'])[:200]) or 'body'}: "
        f"{_printable(problem['msg'])}"
        for problem in error.errors(include_url=False)[:limit]
    )


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
"""A ``\\u0000`` escape in JSON text (an escaped backslash before ``u0000`` is not one)."""


def decode(delivery: Delivery, model: type[M]) -> M:
    """Validate a delivery's body as ``model``, strictly and within the wire bounds.

    Strict: a number must be a JSON number (``"attempt": "2"`` is refused), an instant an ISO
    8601 string with its offset, an enum one of its values. Bounded: the limits in
    :mod:`contracts.messages` (lengths of ids and names, sizes of payloads and results). And no
    string may hold a NUL character anywhere: PostgreSQL cannot store one, so it would fail at
    the store, be requeued and parked only after many attempts; here it is parked at once.

    Raises:
        MessageRejected: the body is not JSON or does not match the model; the reason says
            which field is wrong, and ends up in the dead-letter header.
    """
    body = _without_nul(delivery.body, model.__name__)
    try:
        return model.model_validate_json(body, strict=True, context=WIRE_CONTEXT)
    except ValidationError as e:
        raise MessageRejected(f"not a valid {model.__name__}: {validation_summary(e)}") from e


def _without_nul(body: bytes, name: str) -> bytes:
    # The regular expression costs about 20 us on a 600-byte body (its look-behind is tried at
    # every position); the plain search for its text first costs well under 1.
    if b"\x00" in body or (b"\\u0000" in body and _NUL_ESCAPE.search(body)):
        raise MessageRejected(f"not a valid {name}: a string holds a NUL character")
    return body


_PARTICIPANT_MESSAGE: TypeAdapter[Reply | PickedUp | Heartbeat] = TypeAdapter(
    Annotated[Reply | PickedUp | Heartbeat, Field(discriminator="kind")]
)


def decode_answer(delivery: Delivery) -> Reply | PickedUp | Heartbeat:
    """What a participant sent to the replies queue: a reply, a pick-up or a heartbeat, decoded
    as strictly and within the same bounds as :func:`decode`.

    Raises:
        MessageRejected: the body is none of them; the reason says what is wrong.
    """
    body = _without_nul(delivery.body, "Reply")
    try:
        return _PARTICIPANT_MESSAGE.validate_json(body, strict=True, context=WIRE_CONTEXT)
    except ValidationError as e:
        raise MessageRejected(f"not a valid Reply: {validation_summary(e)}") from e


def progress_message(progress: PickedUp | Heartbeat, routing_key: str, now: datetime) -> Outgoing:
    """The message that carries a participant's pick-up or heartbeat to the orchestrator."""
    return wire_message(
        MessageKind.REPLY,
        message_id=progress.message_id,
        saga_id=progress.saga_id,
        traceparent=None,
        exchange=names.REPLIES_EXCHANGE,
        routing_key=routing_key,
        body=progress.model_dump_json(),
        now=now,
    )
