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

import math
import re
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo

SCHEMA_VERSION: Literal[1] = 1
"""The version of every message defined here; bumped on an incompatible change."""

JsonObject = dict[str, Any]

# --- bounds on what is received ------------------------------------------------------------
#
# Messages arrive from other processes, so what a field may hold is bounded where they are
# decoded: ``plumbing.codec.decode`` validates with ``context=WIRE_CONTEXT`` (and strictly:
# ``"attempt": "2"`` is not a number). The models themselves stay as permissive as before for
# what a process builds or reads back from its own store, so a bound can never make a stored
# saga unreadable or an orchestrator decision fail.

WIRE: Final = "saga_wire"
"""The validation-context key that turns the wire bounds on."""

WIRE_CONTEXT: Final[Mapping[str, bool]] = {WIRE: True}
"""The validation context for a received message."""

NAME_LIMIT: Final = 200
"""Characters in a saga type, step, command, error type or code, reply address."""

ID_LIMIT: Final = 1000
"""Characters in a message id or idempotency key (they embed the saga id and step)."""

SAGA_ID_LIMIT: Final = 200
"""Characters in a saga id."""

SAGA_ID_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9._:@#+=~/-]*"
"""The characters a new saga id may use: printable ASCII without spaces, quotes or
backslashes, so that an id never carries a terminal escape, a shell metacharacter or a
separator that tools would split on."""

TRACEPARENT_LIMIT: Final = 128
"""Characters in a W3C ``traceparent`` (55 today; room for a future version)."""

ERROR_MESSAGE_LIMIT: Final = 2000
"""Characters in an error message."""

PAYLOAD_LIMIT: Final = 512 * 1024
"""Size of a command payload or start data, in characters of JSON (about)."""

RESULT_LIMIT: Final = 256 * 1024
"""Size of a step's result, in characters of JSON (about)."""

JSON_DEPTH_LIMIT: Final = 32
"""Nesting depth of free-form JSON (payloads, results, data)."""

_INT64: Final = 2**63
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _on_wire(info: ValidationInfo) -> bool:
    context = info.context
    return isinstance(context, Mapping) and bool(context.get(WIRE))


def _bounded_text(limit: int, *, single_line: bool) -> AfterValidator:
    def check(value: str, info: ValidationInfo) -> str:
        if _on_wire(info):
            if len(value) > limit:
                raise ValueError(f"is {len(value)} characters long; the limit is {limit}")
            if single_line and _CONTROL.search(value):
                raise ValueError("contains a control character")
        return value

    return AfterValidator(check)


def _bounded_json(limit: int) -> AfterValidator:
    def check(value: JsonObject, info: ValidationInfo) -> JsonObject:
        if _on_wire(info):
            check_json(value, limit)
        return value

    return AfterValidator(check)


def _aware(value: datetime, info: ValidationInfo) -> datetime:
    if _on_wire(info) and value.utcoffset() is None:
        raise ValueError("must carry a timezone offset")
    return value


def check_json(value: object, limit: int) -> None:
    """Check free-form JSON: at most ``limit`` characters (about), nesting of at most
    :data:`JSON_DEPTH_LIMIT`, finite numbers and integers that fit in 64 bits (what every store
    can hold: MongoDB refuses larger integers, PostgreSQL's JSON refuses ``Infinity``).

    Raises:
        ValueError: the first rule broken, as a sentence.
    """
    size = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > JSON_DEPTH_LIMIT:
            raise ValueError(f"is nested deeper than {JSON_DEPTH_LIMIT} levels")
        if isinstance(item, dict):
            size += 2 + sum(len(str(key)) + 4 for key in item)
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list | tuple):
            size += 2
            stack.extend((child, depth + 1) for child in item)
        else:
            size += _scalar_size(item)
        if size > limit:
            raise ValueError(f"is larger than {limit} characters of JSON")


def _scalar_size(item: object) -> int:
    if isinstance(item, str):
        return len(item) + 2
    if isinstance(item, bool) or item is None:
        return 5
    if isinstance(item, int):
        if not -_INT64 <= item < _INT64:
            raise ValueError("holds an integer that does not fit in 64 bits")
        return 20
    if isinstance(item, float) and not math.isfinite(item):
        raise ValueError("holds a number that is not finite")
    return 24  # a float, or a value a process built itself (a Decimal, a datetime)


Name = Annotated[str, _bounded_text(NAME_LIMIT, single_line=True)]
"""A saga type, step, command or error type: bounded and single-line on the wire."""

MessageId = Annotated[str, _bounded_text(ID_LIMIT, single_line=True)]
"""A message id or idempotency key: bounded and single-line on the wire."""

SagaIdOnWire = Annotated[str, _bounded_text(SAGA_ID_LIMIT, single_line=True)]
"""The saga id on a message of a running saga: bounded and free of control characters (the
character set is checked where sagas start, so that sagas started before it still finish)."""

TraceParent = Annotated[str, _bounded_text(TRACEPARENT_LIMIT, single_line=True)]
"""A W3C ``traceparent``, bounded on the wire."""

WireTime = Annotated[datetime, AfterValidator(_aware)]
"""An instant; on the wire it must carry its offset (a naive one cannot be compared)."""


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

    type: Name = Field(description="Error type, e.g. 'PaymentDeclined' or 'TimeoutError'.")
    message: Annotated[str, _bounded_text(ERROR_MESSAGE_LIMIT, single_line=False)] = ""
    code: Name | None = None

    @property
    def summary(self) -> str:
        """``type: message``, or the type alone when there is no message."""
        return f"{self.type}: {self.message}" if self.message else self.type


class CommandEnvelope(Contract):
    """A command from the orchestrator to a participant service."""

    kind: Literal["command"] = "command"
    message_id: MessageId
    saga_id: SagaIdOnWire
    saga_type: Name
    step: Name
    command: Name = Field(description="The command's name, e.g. 'reserve_inventory'.")
    direction: Direction
    attempt: int = Field(ge=1)
    idempotency_key: MessageId
    payload: Annotated[JsonObject, _bounded_json(PAYLOAD_LIMIT)]
    reply_to: Name = Field(description="Routing key the reply must be published with.")
    sent_at: WireTime
    deadline: WireTime | None = Field(
        default=None,
        description="After this instant the participant must not start executing it (a "
        "command it has executed is answered from its store at any time).",
    )
    pickup_by: WireTime | None = Field(
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
    traceparent: TraceParent | None = None
    tracestate: str | None = Field(default=None, max_length=512)


class PickedUp(Contract):
    """A participant took a command off its queue (sent only when the command asks)."""

    kind: Literal["picked_up"] = "picked_up"
    message_id: MessageId
    saga_id: SagaIdOnWire
    step: Name
    direction: Direction
    attempt: int = Field(ge=1)
    sent_at: WireTime


class Heartbeat(Contract):
    """A long-running handler is still working on a command attempt."""

    kind: Literal["heartbeat"] = "heartbeat"
    message_id: MessageId
    saga_id: SagaIdOnWire
    step: Name
    direction: Direction
    attempt: int = Field(ge=1)
    details: str | None = Field(default=None, max_length=1000)
    sent_at: WireTime


class Reply(Contract):
    """A participant's answer to one command attempt."""

    kind: Literal["reply"] = "reply"
    message_id: MessageId
    in_reply_to: MessageId = Field(description="The message_id of the command answered.")
    saga_id: SagaIdOnWire
    step: Name
    direction: Direction
    attempt: int = Field(ge=1)
    status: ReplyStatus
    result: Annotated[JsonObject, _bounded_json(RESULT_LIMIT)] | None = None
    error: ErrorDetail | None = None
    sent_at: WireTime
    traceparent: TraceParent | None = None
    tracestate: str | None = Field(
        default=None, max_length=512, description="W3C tracestate, kept with the traceparent."
    )


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
    message_id: MessageId
    saga_id: SagaIdOnWire
    timer: TimerKind
    step: Name | None = None
    attempt: int = 0
    due_at: WireTime
    traceparent: TraceParent | None = None


class StartSaga(Contract):
    """A request to start a saga; idempotent on ``saga_id``."""

    kind: Literal["start"] = "start"
    saga_type: Name
    saga_id: str = Field(min_length=1, max_length=SAGA_ID_LIMIT, pattern=f"^{SAGA_ID_PATTERN}$")
    data: Annotated[JsonObject, _bounded_json(PAYLOAD_LIMIT)]
    version: int | None = Field(
        default=None, ge=1, description="The definition version to run; default: the newest."
    )
    reply_to: Name | None = Field(
        default=None,
        description="The requester's queue: the orchestrator answers there (StartAnswer).",
    )
    watch: bool = Field(
        default=False, description="Also send the saga's outcome to reply_to when it ends."
    )
    traceparent: TraceParent | None = None
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
