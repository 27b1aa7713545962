"""The console API's request and response bodies; their JSON Schemas are the OpenAPI
document's components (:mod:`orchestrator.console.openapi`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestrator.engine import Action
from orchestrator.state import SagaStatus, StepStatus

Text = Annotated[str, Field(max_length=200, pattern=r"^[^\x00]*$")]
"""A name or prefix in a filter: no NUL (PostgreSQL cannot hold one), not a document."""

Reason = Annotated[str, Field(max_length=500, pattern=r"^[^\x00]*$")]
"""A sentence for a saga's history."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorView(_Body):
    """Why a step (or its compensation) failed."""

    type: str
    message: str = ""
    code: str | None = None


class StepView(_Body):
    """One step of a saga: where it is, its attempts, its result or error."""

    name: str
    status: StepStatus
    group: str | None = Field(description="The parallel group the step runs in, if any.")
    attempts: int
    compensation_attempts: int
    in_doubt: bool = Field(description="An attempt timed out: the participant may have acted.")
    started_at: datetime | None
    finished_at: datetime | None
    due_at: datetime | None = Field(description="When its timeout or next retry is due.")
    picked_up_at: datetime | None = Field(
        description="When a participant acknowledged picking the current attempt up."
    )
    heartbeat_at: datetime | None = Field(description="The current attempt's last heartbeat.")
    heartbeat: str | None = Field(description="What that heartbeat said about the work.")
    error: ErrorView | None
    result: dict[str, Any] | None


class Position(_Body):
    """The step a saga is on, and whether it is going forward or compensating."""

    name: str
    status: StepStatus
    direction: Literal["forward", "compensation"]


class HoldView(_Body):
    """Why a saga is held, and what would let it carry on."""

    reason: str
    since: datetime
    waiting_for: str | None


class HistoryView(_Body):
    """One line of a saga's timeline."""

    event: str
    at: datetime
    step: str | None = None
    attempt: int | None = None
    detail: str | None = None
    by: str | None = Field(default=None, description="The operator whose action caused it.")


class SagaSummary(_Body):
    """A saga in a listing."""

    saga_id: str
    saga_type: str
    version: int
    fingerprint: str | None
    status: SagaStatus
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    failure_reason: str | None
    current_step: Position | None
    steps: list[StepView]
    held: HoldView | None


class SagaDetail(SagaSummary):
    """One saga whole: its data, step results, errors, attempts and history."""

    data: dict[str, Any]
    results: dict[str, dict[str, Any]]
    history: list[HistoryView]
    history_dropped: int
    kept_replies: int
    outbox: int = Field(description="Messages written but not yet confirmed as published.")


class SagaPage(_Body):
    """One page of a listing, newest update first."""

    sagas: list[SagaSummary]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page.")


class StatusCount(_Body):
    """How many sagas of a type are in a status."""

    saga_type: str
    status: SagaStatus
    count: int


class Counts(_Body):
    """Sagas per type and status, as the store counts them now."""

    statuses: list[SagaStatus]
    counts: list[StatusCount]


class ActionRequest(_Body):
    """An operator action on one saga."""

    reason: Reason | None = Field(
        default=None, description="Recorded in the history (abort, resolve)."
    )


class ActionResult(_Body):
    """What an action did."""

    saga_id: str
    action: Action
    before: SagaStatus
    after: SagaStatus
    unsent: int = Field(description="Messages left for the daemon's outbox relay to send.")
    by: str


class SagaSelection(_Body):
    """Which sagas a bulk action applies to (at least a status or a type)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "anyOf": [
                {"required": ["status"], "properties": {"status": {"type": "string"}}},
                {"required": ["saga_type"], "properties": {"saga_type": {"type": "string"}}},
            ]
        },
    )

    status: SagaStatus | None = None
    saga_type: Text | None = None
    version: int | None = Field(default=None, ge=1, le=1_000_000)
    step: Text | None = None
    id_prefix: Text | None = None

    @model_validator(mode="after")
    def _narrowed(self) -> SagaSelection:
        if self.status is None and self.saga_type is None:
            raise ValueError("a bulk action needs at least a status or a saga type")
        return self


class BulkRequest(_Body):
    """An action on every saga a selection matches.

    With ``dry_run`` (the default) nothing is done and ``matched`` says how many would be
    acted on; to act, send ``dry_run: false`` with that count as ``expected``: if the count
    changed meanwhile, nothing is done (409) and the operator is asked again.
    """

    selection: SagaSelection
    reason: Reason | None = None
    dry_run: bool = True
    expected: int | None = Field(default=None, ge=0)


class Refusal(_Body):
    """A saga a bulk action left as it was, and why."""

    saga_id: str
    reason: str


class BulkResult(_Body):
    """What a bulk action matched and did."""

    action: Action
    matched: int
    dry_run: bool
    applied: list[ActionResult]
    refused: list[Refusal]


class ParkedView(_Body):
    """A message in ``saga.parked``."""

    message_id: str
    reason: str
    queue: str | None = Field(description="The queue it was parked from: replay sends it there.")
    saga_id: str | None
    kind: str | None
    parked_at: datetime | None
    headers: dict[str, str]
    body: str = Field(description="The body as text (cut short in a listing).")
    body_bytes: int


class ParkedList(_Body):
    """Parked messages, oldest first."""

    parked: list[ParkedView]


class NoFields(_Body):
    """An empty JSON object: a POST is JSON even when it has nothing to say (see the auth
    module: that is what keeps other sites' pages from acting)."""


class ParkedResult(_Body):
    """What became of a parked message."""

    message_id: str
    outcome: Literal["replayed", "discarded"]
    queue: str | None


class WhoAmI(_Body):
    """Who the console takes the caller for, and whether actions need a token."""

    operator: str | None
    actions_need_token: bool
    can_act: bool


class Problem(_Body):
    """Why a request was refused."""

    error: str


class SagaQuery(_Body):
    """The query of ``GET /api/sagas``."""

    status: SagaStatus | None = None
    saga_type: Text | None = None
    version: int | None = Field(default=None, ge=1, le=1_000_000)
    step: Text | None = Field(default=None, description="Sagas on this step (either direction).")
    id_prefix: Text | None = None
    held: bool | None = None
    created_from: datetime | None = Field(default=None, description="Started at or after.")
    created_to: datetime | None = Field(default=None, description="Started before.")
    limit: int = Field(default=50, ge=1, le=500)
    cursor: Text | None = Field(default=None, description="``next_cursor`` of the last page.")


class ParkedQuery(_Body):
    """The query of ``GET /api/parked``."""

    limit: int = Field(default=100, ge=1, le=1000)
