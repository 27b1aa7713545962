"""What a decision asks the shell to do, and the messages that carry it out.

The pure core (:mod:`orchestrator.engine`) returns effects, built by :class:`MessageBuilder`;
the shell appends the message of each one to the saga's outbox (:func:`outgoing`) and
publishes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from contracts import names
from contracts.client import SagaOutcome
from contracts.events import EVENT_CLASSES, EventName, LifecycleEvent
from contracts.messages import (
    Command,
    CommandEnvelope,
    Direction,
    JsonObject,
    TimerKind,
    TimerMessage,
    command_message_id,
    idempotency_key,
    timer_message_id,
)
from orchestrator.definition import Step
from orchestrator.state import SagaState
from plumbing import tracing
from plumbing.codec import answer_message, wire_message
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


@dataclass(frozen=True)
class NotifyOutcome:
    """Tell a client that watches the saga how it ended."""

    reply_to: str
    outcome: SagaOutcome


Effect = SendCommand | ScheduleTimer | PublishEvent | NotifyOutcome
"""Everything the shell must do after saving a decision."""


def outgoing(effect: Effect, now: datetime) -> Outgoing:
    """The message that carries out one effect of a decision."""
    match effect:
        case SendCommand(service=service, envelope=envelope):
            return wire_message(
                MessageKind.COMMAND,
                message_id=envelope.message_id,
                saga_id=envelope.saga_id,
                traceparent=envelope.traceparent,
                exchange=names.COMMANDS_EXCHANGE,
                routing_key=service,
                body=envelope.model_dump_json(),
                now=now,
            )
        case ScheduleTimer(message=timer):
            return wire_message(
                MessageKind.TIMER,
                message_id=timer.message_id,
                saga_id=timer.saga_id,
                traceparent=timer.traceparent,
                exchange="",
                routing_key=names.TIMERS_QUEUE,
                body=timer.model_dump_json(),
                now=now,
                deliver_at=timer.due_at,
                extra_headers={names.HEADER_DUE_AT: timer.due_at.isoformat()},
            )
        case PublishEvent(event=event):
            return wire_message(
                MessageKind.EVENT,
                message_id=event.event_id,
                saga_id=event.saga_id,
                traceparent=event.traceparent,
                exchange=names.EVENTS_EXCHANGE,
                routing_key=names.event_routing_key(event.saga_type, event.event.value),
                body=event.model_dump_json(),
                now=now,
                mandatory=False,  # observers are optional; nobody bound is not an error
            )
        case NotifyOutcome(reply_to=reply_to, outcome=outcome):
            return answer_message(outcome, reply_to, now)


class MessageBuilder:
    """Builds the messages of one decision about one saga: ids, trace context and envelopes.

    The rules (:mod:`orchestrator.engine`) say *what* to send; this says how each message
    looks, so that every id is deterministic and every message continues the saga's trace.
    """

    def __init__(self, state: SagaState, now: datetime) -> None:
        self.saga_id = state.saga_id
        self.saga_type = state.saga_type
        self.traceparent = state.traceparent
        self.tracestate = state.tracestate
        self.now = now

    def span(self, message_id: str) -> str | None:
        """The trace context of one message: the saga's trace, a span per message id."""
        root = self.traceparent
        return None if root is None else tracing.child(root, message_id)

    def event(
        self,
        name: EventName,
        sequence: int,
        *,
        step: str | None,
        attempt: int | None,
        detail: str | None,
        **extra: object,
    ) -> PublishEvent:
        """Lifecycle event ``name``, the ``sequence``-th entry of the saga's history.

        ``extra`` holds the event's own fields (``result``, ``error``, ...); pydantic refuses
        any that the event does not have.
        """
        event_id = f"{self.saga_id}:{sequence}"
        return PublishEvent(
            EVENT_CLASSES[name](
                event_id=event_id,
                saga_id=self.saga_id,
                saga_type=self.saga_type,
                at=self.now,
                step=step,
                attempt=attempt,
                detail=detail,
                traceparent=self.span(event_id),
                **extra,
            )
        )

    def command(
        self,
        step: Step,
        *,
        command: type[Command],
        direction: Direction,
        attempt: int,
        context: JsonObject,
        deadline: datetime,
        generation: int = 1,
        pickup_by: datetime | None = None,
        heartbeat_timeout: timedelta | None = None,
    ) -> SendCommand:
        """One attempt of ``step``'s command (or compensation), built from ``context``.

        ``deadline`` is when the participant must no longer start it; ``pickup_by`` asks for
        a pick-up acknowledgement before then, and ``heartbeat_timeout`` for heartbeats.

        Raises:
            pydantic.ValidationError: the context does not make a valid command.
        """
        payload = command.model_validate(context).model_dump(mode="json")
        message_id = command_message_id(self.saga_id, step.name, direction, attempt)
        envelope = CommandEnvelope(
            message_id=message_id,
            saga_id=self.saga_id,
            saga_type=self.saga_type,
            step=step.name,
            command=command.name(),
            direction=direction,
            attempt=attempt,
            idempotency_key=idempotency_key(self.saga_id, step.name, direction, generation),
            payload=payload,
            reply_to=names.REPLIES_ROUTING_KEY,
            sent_at=self.now,
            deadline=deadline,
            pickup_by=pickup_by,
            heartbeat_timeout=(
                None if heartbeat_timeout is None else heartbeat_timeout.total_seconds()
            ),
            traceparent=self.span(message_id),
            tracestate=self.tracestate,
        )
        return SendCommand(step.service, envelope)

    def timer(
        self, kind: TimerKind, step: str | None, attempt: int, due: datetime
    ) -> ScheduleTimer:
        """A wake-up for ``step``'s ``attempt`` (or the saga), due at ``due``."""
        message_id = timer_message_id(self.saga_id, kind, step, attempt)
        return ScheduleTimer(
            TimerMessage(
                message_id=message_id,
                saga_id=self.saga_id,
                timer=kind,
                step=step,
                attempt=attempt,
                due_at=due,
                traceparent=self.span(message_id),
            )
        )

    def outcomes(self, state: SagaState) -> tuple[NotifyOutcome, ...]:
        """The outcome of ``state`` for each client that watches it."""
        # The error that ended it: the stuck compensation's, or the step that failed.
        errors = [step.error for step in reversed(state.steps) if step.error is not None]
        outcome = SagaOutcome(
            saga_id=state.saga_id,
            saga_type=state.saga_type,
            status=state.status.value,  # only ever completed, failed or stuck here
            results=state.results,
            failure_reason=state.failure_reason,
            error=errors[0] if errors else None,
            finished_at=self.now,
        )
        return tuple(NotifyOutcome(reply_to, outcome) for reply_to in state.watchers)
