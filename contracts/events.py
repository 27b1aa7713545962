"""Lifecycle events the orchestrator publishes to the ``saga.events`` topic exchange.

Observers bind with routing keys ``<saga_type>.<EventName>`` (``order_fulfillment.SagaFailed``,
``*.SagaStuck``, ``#``) and never couple to the orchestrator's internals. The same names are
used in every saga's stored history, so a timeline and an event stream read alike.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from contracts.messages import Contract, ErrorDetail, JsonObject, ReplyStatus


class EventName(StrEnum):
    """The name of every lifecycle event; also the ``event`` of every history entry."""

    SAGA_STARTED = "SagaStarted"
    STEP_STARTED = "SagaStepStarted"
    STEP_COMPLETED = "SagaStepCompleted"
    STEP_FAILED = "SagaStepFailed"
    STEP_TIMED_OUT = "SagaStepTimedOut"
    STEP_NOT_PICKED_UP = "SagaStepNotPickedUp"
    STEP_RETRYING = "SagaStepRetrying"
    COMPENSATION_STARTED = "SagaCompensationStarted"
    COMPENSATION_COMPLETED = "SagaCompensationCompleted"
    COMPENSATION_FAILED = "SagaCompensationFailed"
    SAGA_COMPLETED = "SagaCompleted"
    SAGA_FAILED = "SagaFailed"
    SAGA_STUCK = "SagaStuck"
    LATE_REPLY = "SagaLateReply"


class LifecycleEvent(Contract):
    """Fields every lifecycle event carries."""

    event: EventName
    event_id: str = Field(description="Deterministic: '<saga_id>:<history index>'.")
    saga_id: str
    saga_type: str
    at: datetime
    step: str | None = Field(
        default=None,
        description="The step concerned; a compensation event names the step it undoes.",
    )
    attempt: int | None = None
    detail: str | None = None
    traceparent: str | None = None


class SagaStarted(LifecycleEvent):
    """A saga was accepted and its first step is being dispatched."""

    event: Literal[EventName.SAGA_STARTED] = EventName.SAGA_STARTED
    data: JsonObject = Field(default_factory=dict)


class SagaStepStarted(LifecycleEvent):
    """A step's command (one attempt) was sent."""

    event: Literal[EventName.STEP_STARTED] = EventName.STEP_STARTED


class SagaStepCompleted(LifecycleEvent):
    """A step's participant replied ``completed``."""

    event: Literal[EventName.STEP_COMPLETED] = EventName.STEP_COMPLETED
    result: JsonObject | None = None


class SagaStepFailed(LifecycleEvent):
    """A step failed for good (business failure, or errors past its retry policy)."""

    event: Literal[EventName.STEP_FAILED] = EventName.STEP_FAILED
    error: ErrorDetail | None = None


class SagaStepTimedOut(LifecycleEvent):
    """A step attempt got no reply within its timeout."""

    event: Literal[EventName.STEP_TIMED_OUT] = EventName.STEP_TIMED_OUT


class SagaStepNotPickedUp(LifecycleEvent):
    """No participant picked a step's command up within its dispatch timeout (a service down,
    a queue backed up)."""

    event: Literal[EventName.STEP_NOT_PICKED_UP] = EventName.STEP_NOT_PICKED_UP


class SagaStepRetrying(LifecycleEvent):
    """A step will be tried again at ``retry_at``; ``attempt`` is the attempt that will run."""

    event: Literal[EventName.STEP_RETRYING] = EventName.STEP_RETRYING
    retry_at: datetime | None = None
    error: ErrorDetail | None = None


class SagaCompensationStarted(LifecycleEvent):
    """A compensation command (one attempt) was sent for ``step``."""

    event: Literal[EventName.COMPENSATION_STARTED] = EventName.COMPENSATION_STARTED


class SagaCompensationCompleted(LifecycleEvent):
    """``step`` was undone (or resolved by an operator)."""

    event: Literal[EventName.COMPENSATION_COMPLETED] = EventName.COMPENSATION_COMPLETED


class SagaCompensationFailed(LifecycleEvent):
    """A compensation attempt for ``step`` failed, errored or timed out."""

    event: Literal[EventName.COMPENSATION_FAILED] = EventName.COMPENSATION_FAILED
    error: ErrorDetail | None = None


class SagaCompleted(LifecycleEvent):
    """Every step completed."""

    event: Literal[EventName.SAGA_COMPLETED] = EventName.SAGA_COMPLETED


class SagaFailed(LifecycleEvent):
    """The saga was rolled back: every completed step has been compensated."""

    event: Literal[EventName.SAGA_FAILED] = EventName.SAGA_FAILED


class SagaStuck(LifecycleEvent):
    """A compensation kept failing; the saga is parked until an operator acts."""

    event: Literal[EventName.SAGA_STUCK] = EventName.SAGA_STUCK


class SagaLateReply(LifecycleEvent):
    """A reply arrived for an attempt the saga no longer waits for; it changed nothing."""

    event: Literal[EventName.LATE_REPLY] = EventName.LATE_REPLY
    status: ReplyStatus | None = None


AnyLifecycleEvent = Annotated[
    SagaStarted
    | SagaStepStarted
    | SagaStepCompleted
    | SagaStepFailed
    | SagaStepTimedOut
    | SagaStepNotPickedUp
    | SagaStepRetrying
    | SagaCompensationStarted
    | SagaCompensationCompleted
    | SagaCompensationFailed
    | SagaCompleted
    | SagaFailed
    | SagaStuck
    | SagaLateReply,
    Field(discriminator="event"),
]
"""Any lifecycle event, discriminated by its ``event`` field."""

LIFECYCLE_EVENTS: tuple[type[LifecycleEvent], ...] = (
    SagaStarted,
    SagaStepStarted,
    SagaStepCompleted,
    SagaStepFailed,
    SagaStepTimedOut,
    SagaStepNotPickedUp,
    SagaStepRetrying,
    SagaCompensationStarted,
    SagaCompensationCompleted,
    SagaCompensationFailed,
    SagaCompleted,
    SagaFailed,
    SagaStuck,
    SagaLateReply,
)
"""Every lifecycle event class, in the order of :class:`EventName`."""

EVENT_CLASSES: dict[EventName, type[LifecycleEvent]] = {
    EventName(cls.model_fields["event"].default): cls for cls in LIFECYCLE_EVENTS
}
"""The class of each event name."""

lifecycle_event_adapter: TypeAdapter[AnyLifecycleEvent] = TypeAdapter(AnyLifecycleEvent)
"""Parses any lifecycle event from JSON or a dict."""
