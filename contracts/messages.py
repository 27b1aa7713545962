"""The wire messages every saga process exchanges.

Each message is a pydantic model carrying ``schema_version`` so that a consumer can refuse a
message written by a newer producer instead of misreading it. All of them are JSON on the wire.

Identity rules (the receivers depend on them to drop duplicates):

* ``saga_id`` is the correlation id of every message of a saga.
* ``message_id`` is deterministic: the same logical message always has the same id, so a
  re-publish (outbox relay, publisher retry) is recognisable.
* ``idempotency_key`` on a command is stable per saga, step and direction (``fwd:`` or
  ``comp:``), the same on every attempt, so a participant executes a step at most once.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION: Literal[1] = 1
"""The version of every message defined here; bumped on an incompatible change."""

JsonObject = dict[str, Any]


class Contract(BaseModel):
    """Base of every wire model: immutable and strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION


class Command(BaseModel):
    """Base of a participant command's payload (``ReserveInventory``, ``RefundPayment``, ...).

    The command's name on the wire is the snake_case class name unless ``command_name`` is set.
    Unknown fields are ignored so that a command can be built from the whole saga context.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    command_name: ClassVar[str] = ""

    @classmethod
    def name(cls) -> str:
        """The command's name on the wire."""
        return cls.command_name or _snake_case(cls.__name__)


class Direction(StrEnum):
    """Whether a command does a step or undoes it."""

    FORWARD = "forward"
    COMPENSATION = "compensation"


class ReplyStatus(StrEnum):
    """How a participant answered a command.

    ``failed`` is a business refusal (card declined): retrying will not help. ``error`` is a
    transient or unexpected error (a timeout to a downstream service): the step's retry policy
    decides whether to try again.
    """

    COMPLETED = "completed"
    FAILED = "failed"
    ERROR = "error"


class ErrorDetail(BaseModel):
    """Why a command failed or errored."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str = Field(description="Error type, e.g. 'PaymentDeclined' or 'TimeoutError'.")
    message: str = ""
    code: str | None = None

    @property
    def summary(self) -> str:
        """``type: message``, or the type alone when there is no message."""
        return f"{self.type}: {self.message}" if self.message else self.type


class CommandEnvelope(Contract):
    """A command from the orchestrator to a participant service."""

    kind: Literal["command"] = "command"
    message_id: str
    saga_id: str
    saga_type: str
    step: str
    command: str = Field(description="The command's name, e.g. 'reserve_inventory'.")
    direction: Direction
    attempt: int = Field(ge=1)
    idempotency_key: str
    payload: JsonObject
    reply_to: str = Field(description="Routing key the reply must be published with.")
    sent_at: datetime
    deadline: datetime | None = Field(
        default=None, description="After this instant the participant must not execute it."
    )
    pickup_by: datetime | None = Field(
        default=None,
        description="Set when the step has a dispatch timeout: the participant acknowledges "
        "picking the command up (PickedUp) and must not start it after this instant.",
    )
    heartbeat_timeout: float | None = Field(
        default=None,
        gt=0,
        description="Set when the step expects heartbeats: seconds without one after which "
        "the attempt times out.",
    )
    traceparent: str | None = None
    tracestate: str | None = Field(default=None, max_length=512)


class PickedUp(Contract):
    """A participant took a command off its queue (sent only when the command asks)."""

    kind: Literal["picked_up"] = "picked_up"
    message_id: str
    saga_id: str
    step: str
    direction: Direction
    attempt: int = Field(ge=1)
    sent_at: datetime


class Heartbeat(Contract):
    """A long-running handler is still working on a command attempt."""

    kind: Literal["heartbeat"] = "heartbeat"
    message_id: str
    saga_id: str
    step: str
    direction: Direction
    attempt: int = Field(ge=1)
    details: str | None = Field(default=None, max_length=1000)
    sent_at: datetime


class Reply(Contract):
    """A participant's answer to one command attempt."""

    kind: Literal["reply"] = "reply"
    message_id: str
    in_reply_to: str = Field(description="The message_id of the command answered.")
    saga_id: str
    step: str
    direction: Direction
    attempt: int = Field(ge=1)
    status: ReplyStatus
    result: JsonObject | None = None
    error: ErrorDetail | None = None
    sent_at: datetime
    traceparent: str | None = None


class TimerKind(StrEnum):
    """What a timer wakes the saga up for."""

    STEP_TIMEOUT = "step_timeout"
    RETRY = "retry"
    COMPENSATION_TIMEOUT = "compensation_timeout"
    COMPENSATION_RETRY = "compensation_retry"
    SAGA_DEADLINE = "saga_deadline"


class TimerMessage(Contract):
    """A delayed wake-up for one saga.

    A timer is only a hint: the saga's stored due time is the truth. A timer that names a step
    attempt the saga has moved past is stale and changes nothing.
    """

    kind: Literal["timer"] = "timer"
    message_id: str
    saga_id: str
    timer: TimerKind
    step: str | None = None
    attempt: int = 0
    due_at: datetime
    traceparent: str | None = None


class StartSaga(Contract):
    """A request to start a saga; idempotent on ``saga_id``."""

    kind: Literal["start"] = "start"
    saga_type: str
    saga_id: str = Field(min_length=1, max_length=200)
    data: JsonObject
    version: int | None = Field(
        default=None, ge=1, description="The definition version to run; default: the newest."
    )
    reply_to: str | None = Field(
        default=None,
        description="The requester's queue: the orchestrator answers there (StartAnswer).",
    )
    watch: bool = Field(
        default=False, description="Also send the saga's outcome to reply_to when it ends."
    )
    traceparent: str | None = None
    tracestate: str | None = Field(
        default=None, max_length=512, description="W3C tracestate, kept with the traceparent."
    )


def command_message_id(saga_id: str, step: str, direction: Direction, attempt: int) -> str:
    """The deterministic id of one command attempt."""
    return f"{saga_id}:{step}:{direction.value}:{attempt}"


def idempotency_key(saga_id: str, step: str, direction: Direction, generation: int = 1) -> str:
    """The participant-side key that is the same on every attempt of a step's direction.

    An operator's retry of a refused compensation starts a new ``generation`` with a key of
    its own (``comp.2:...``), so the participant runs it again instead of replaying its stored
    refusal; the part after the first ``:`` names the saga and step either way.
    """
    prefix = "fwd" if direction is Direction.FORWARD else "comp"
    if generation > 1:
        prefix = f"{prefix}.{generation}"
    return f"{prefix}:{saga_id}:{step}"


def timer_message_id(saga_id: str, timer: TimerKind, step: str | None, attempt: int) -> str:
    """The deterministic id of a timer."""
    return f"{saga_id}:timer:{timer.value}:{step or '-'}:{attempt}"


def _snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
