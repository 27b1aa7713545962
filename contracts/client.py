"""What a client and the orchestrator say to each other, besides the start request itself.

A client (``orchestrator.client.SagaClient``, or any program) publishes a
:class:`~contracts.messages.StartSaga` with ``reply_to`` set to a queue of its own, and the
orchestrator answers there with a :class:`StartAnswer`: started, already started (the same
data again), or refused with the reason. A :class:`QuerySaga` to the ``saga.queries`` queue is
answered with a :class:`SagaSnapshot`; with ``watch`` (or a start request with ``watch``) the
orchestrator also sends a :class:`SagaOutcome` to that queue when the saga completes, fails or
gets stuck. An :class:`OperateSaga` on the same queue is answered with an
:class:`OperationAnswer`. Answers go through the default exchange with the client's queue as
routing key and are not mandatory: a client that went away misses them, and can ask again.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts.messages import Contract, ErrorDetail, JsonObject


class StartStatus(StrEnum):
    """How the orchestrator answered a start request."""

    STARTED = "started"
    ALREADY_STARTED = "already_started"
    """A saga with this id and the same type and data exists: starting is idempotent."""
    REFUSED = "refused"
    """Unknown type or version, invalid data, or the id is taken by other data or type."""


class StartAnswer(Contract):
    """The orchestrator's answer to a start request that named a ``reply_to`` queue."""

    kind: Literal["start_answer"] = "start_answer"
    saga_id: str
    status: StartStatus
    reason: str | None = Field(default=None, description="Why it was refused.")
    version: int | None = Field(default=None, description="The definition version it runs.")


class QuerySaga(Contract):
    """Ask for a saga's current state; with ``watch``, also for its outcome when it ends."""

    kind: Literal["query"] = "query"
    saga_id: str
    reply_to: str
    watch: bool = False


class StepView(BaseModel):
    """One step of a saga as a client sees it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    status: str
    attempts: int


class SagaSnapshot(Contract):
    """A saga's state as the orchestrator has it (``found`` is false for an unknown id)."""

    kind: Literal["snapshot"] = "snapshot"
    saga_id: str
    found: bool
    saga_type: str | None = None
    version: int | None = None
    status: str | None = None
    data: JsonObject = Field(default_factory=dict)
    results: dict[str, JsonObject] = Field(default_factory=dict)
    steps: list[StepView] = Field(default_factory=list)
    failure_reason: str | None = None
    held: str | None = Field(default=None, description="Why the saga is held, if it is.")
    created_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def finished(self) -> bool:
        """Whether the saga has ended (completed or failed) or is stuck for an operator."""
        return self.status in ("completed", "failed", "stuck")


class SagaOutcome(Contract):
    """How a watched saga ended: completed, failed (rolled back) or stuck."""

    kind: Literal["outcome"] = "outcome"
    saga_id: str
    saga_type: str
    status: Literal["completed", "failed", "stuck"]
    results: dict[str, JsonObject] = Field(
        default_factory=dict, description="Each completed step's result, by step name."
    )
    failure_reason: str | None = None
    error: ErrorDetail | None = Field(
        default=None, description="The error of the step that failed or got stuck."
    )
    finished_at: datetime


class OperateSaga(Contract):
    """Ask the orchestrator to apply an operator action (``saga retry|abort|resolve``) through
    the saga rules, so that the daemon counts it in its metrics like every other transition.

    A request still unanswered at ``expires_at`` is refused when it is finally read: the
    operator who sent it was told nobody answered, and may have acted since. The sender's and
    the orchestrator's clocks are taken to agree (NTP) to well within the sender's timeout.
    """

    kind: Literal["operate"] = "operate"
    saga_id: str
    action: Literal["retry", "abort", "resolve"]
    request_id: str = Field(description="Unique per request; the answer repeats it.")
    reply_to: str
    expires_at: datetime
    by: str | None = Field(default=None, description="The operator, recorded in the history.")
    reason: str | None = Field(default=None, description="For abort and resolve.")


class OperationAnswer(Contract):
    """The orchestrator's answer to :class:`OperateSaga`: applied, or refused and why."""

    kind: Literal["operation"] = "operation"
    saga_id: str
    request_id: str
    applied: bool
    before: str | None = Field(default=None, description="The saga's status before.")
    after: str | None = Field(default=None, description="The saga's status after.")
    refused: str | None = Field(default=None, description="Why the action was not applied.")
