"""The state of one saga: what the pure core reads and writes, and what the stores persist.

Saga statuses (the values are what the stores hold):

``started``
    Going forward, a step command is out and the saga waits for its participant.
``pending``
    Going forward, but waiting on itself: a failed attempt's retry is scheduled and no command
    is out. A saga long in ``pending`` is backing off, not blocked on a service.
``compensating``
    Undoing completed steps, one at a time, in strict reverse order.
``completed``
    Every step completed. Terminal.
``failed``
    Rolled back: every step that completed (or may have acted) was compensated. Terminal.
``stuck``
    A compensation kept failing and the saga is parked until an operator retries, resolves or
    inspects it. Nothing is sent while stuck.

Step statuses: ``not_started``, ``running`` (a command attempt is out), ``retry_scheduled``,
``completed``, ``failed``, ``timed_out`` (gave up waiting; the participant may have acted),
``compensating``, ``compensation_retry_scheduled``, ``compensated``, ``compensation_failed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import ConfigDict, TypeAdapter

from contracts.events import EventName
from contracts.messages import ErrorDetail, JsonObject, Reply

_STORED = ConfigDict(extra="forbid")
"""How stored documents are read back: a field this release does not know is an error."""


class SagaStatus(StrEnum):
    """Where a saga is in its life; see the module docstring."""

    STARTED = "started"
    PENDING = "pending"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    FAILED = "failed"
    STUCK = "stuck"

    @property
    def is_terminal(self) -> bool:
        """Completed or failed: nothing will ever happen to the saga again."""
        return self in (SagaStatus.COMPLETED, SagaStatus.FAILED)

    @property
    def is_active(self) -> bool:
        """Started, pending or compensating: the saga has work or a timer outstanding."""
        return self in (SagaStatus.STARTED, SagaStatus.PENDING, SagaStatus.COMPENSATING)


class StepStatus(StrEnum):
    """Where one step is; see the module docstring."""

    NOT_STARTED = "not_started"
    RUNNING = "running"
    RETRY_SCHEDULED = "retry_scheduled"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    COMPENSATING = "compensating"
    COMPENSATION_RETRY_SCHEDULED = "compensation_retry_scheduled"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"

    @property
    def is_compensation(self) -> bool:
        """The step's compensation is out, waiting for its retry, or gave up."""
        return self in (
            StepStatus.COMPENSATING,
            StepStatus.COMPENSATION_RETRY_SCHEDULED,
            StepStatus.COMPENSATION_FAILED,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class StepState:
    """One step of one saga.

    ``attempt`` and ``compensation_attempt`` count attempts sent and fence replies and timers:
    only the reply to the latest attempt moves the saga. ``in_doubt`` is set once any attempt
    timed out, because the participant may have acted even if a later attempt errored.

    Every change is one of the named transitions below, so that each says which fields it
    touches and mypy checks them.
    """

    __pydantic_config__ = _STORED

    name: str
    status: StepStatus = StepStatus.NOT_STARTED
    group: str | None = None
    """The parallel group the step runs in (its members share it); None for a step alone."""
    attempt: int = 0
    compensation_attempt: int = 0
    compensation_failures: int = 0
    due_at: datetime | None = None
    in_doubt: bool = False
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: ErrorDetail | None = None
    compensation_generation: int = 1
    """Raised by each operator retry: a new generation gets a new idempotency key, so a
    participant that refused the compensation runs it again instead of replaying its refusal."""
    attempt_at: datetime | None = None
    """When the current forward attempt was sent."""
    picked_up_at: datetime | None = None
    """When a participant acknowledged picking the current attempt up (dispatch timeouts)."""
    heartbeat_at: datetime | None = None
    heartbeat: str | None = None
    """The details of the current attempt's last heartbeat."""
    budget_at: datetime | None = None
    """When the step's budget, across all its attempts, runs out."""
    compensation_at: datetime | None = None
    """When the current compensation attempt was sent."""

    def running(
        self, attempt: int, due: datetime, now: datetime, budget_at: datetime | None = None
    ) -> StepState:
        """A forward attempt was sent and is due to answer (or be picked up) by ``due``."""
        return replace(
            self,
            status=StepStatus.RUNNING,
            attempt=attempt,
            due_at=due,
            started_at=self.started_at or now,
            attempt_at=now,
            picked_up_at=None,
            heartbeat_at=None,
            heartbeat=None,
            budget_at=budget_at,
        )

    def picked_up(self, now: datetime, due: datetime) -> StepState:
        """A participant took the current attempt off its queue."""
        return replace(self, picked_up_at=now, due_at=due)

    def beating(self, now: datetime, details: str | None, due: datetime) -> StepState:
        """The participant reported progress on the current attempt."""
        return replace(
            self,
            heartbeat_at=now,
            heartbeat=details,
            picked_up_at=self.picked_up_at or now,
            due_at=due,
        )

    def unsendable(self, attempt: int, now: datetime) -> StepState:
        """A forward attempt could not even be built (its command does not validate)."""
        return replace(
            self, status=StepStatus.RUNNING, attempt=attempt, started_at=self.started_at or now
        )

    def retry_scheduled(self, due: datetime, error: ErrorDetail) -> StepState:
        """The attempt errored; the next one is sent at ``due``."""
        return replace(self, status=StepStatus.RETRY_SCHEDULED, due_at=due, error=error)

    def completed(self, now: datetime) -> StepState:
        """The participant answered ``completed``."""
        return replace(self, status=StepStatus.COMPLETED, due_at=None, finished_at=now, error=None)

    def failed(
        self, error: ErrorDetail, now: datetime, *, in_doubt: bool | None = None
    ) -> StepState:
        """The step failed for good; ``in_doubt`` marks it as possibly acted on."""
        return replace(
            self,
            status=StepStatus.FAILED,
            due_at=None,
            finished_at=now,
            error=error,
            in_doubt=self.in_doubt if in_doubt is None else in_doubt,
        )

    def doubted(self) -> StepState:
        """An attempt timed out: the participant may have acted."""
        return replace(self, in_doubt=True)

    def timed_out(self, error: ErrorDetail, now: datetime) -> StepState:
        """The step gave up waiting for good."""
        return replace(self, status=StepStatus.TIMED_OUT, due_at=None, finished_at=now, error=error)

    def compensating(self, attempt: int, due: datetime | None, now: datetime) -> StepState:
        """A compensation attempt was sent (``due`` is None when it could not be built)."""
        return replace(
            self,
            status=StepStatus.COMPENSATING,
            compensation_attempt=attempt,
            due_at=due,
            compensation_at=now,
        )

    def compensation_retry_scheduled(self, due: datetime, error: ErrorDetail) -> StepState:
        """A compensation attempt failed; the next one is sent at ``due``."""
        return replace(
            self,
            status=StepStatus.COMPENSATION_RETRY_SCHEDULED,
            compensation_failures=self.compensation_failures + 1,
            due_at=due,
            error=error,
        )

    def compensation_failed(self, error: ErrorDetail) -> StepState:
        """The compensation gave up: the saga is stuck on this step."""
        return replace(
            self,
            status=StepStatus.COMPENSATION_FAILED,
            compensation_failures=self.compensation_failures + 1,
            due_at=None,
            error=error,
        )

    def compensated(self, now: datetime, *, clear_error: bool) -> StepState:
        """The step was undone (or resolved by an operator)."""
        return replace(
            self,
            status=StepStatus.COMPENSATED,
            due_at=None,
            finished_at=now,
            error=None if clear_error else self.error,
        )

    def retried_by_operator(self) -> StepState:
        """An operator asked for another round of compensation attempts, a new generation."""
        return replace(
            self,
            compensation_failures=0,
            error=None,
            compensation_generation=self.compensation_generation + 1,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class HistoryEntry:
    """One line of a saga's timeline, named as the lifecycle event it was published as."""

    __pydantic_config__ = _STORED

    event: EventName
    at: datetime
    step: str | None = None
    attempt: int | None = None
    detail: str | None = None
    by: str | None = None
    """The operator whose action caused the entry (``saga retry --by``, the console's user)."""

    def to_json(self) -> JsonObject:
        """The entry in JSON mode, without empty fields."""
        document: JsonObject = _HISTORY_ENTRY.dump_python(self, mode="json", exclude_none=True)
        return document


@dataclass(frozen=True, kw_only=True, slots=True)
class SagaState:
    """Everything the pure core knows about one saga.

    ``results`` holds each completed step's result; with ``data`` it forms the context that
    later commands and compensations are built from. ``history`` is bounded: when it would
    grow past its cap, the oldest entries after the first are dropped and counted in
    ``history_dropped``.

    The stored document is this dataclass in pydantic's JSON mode (:meth:`to_document`,
    :meth:`from_document`), validated when it is read back.
    """

    __pydantic_config__ = _STORED

    saga_id: str
    saga_type: str
    status: SagaStatus
    data: JsonObject
    steps: tuple[StepState, ...]
    results: dict[str, JsonObject] = field(default_factory=dict)
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    deadline_at: datetime | None = None
    failure_reason: str | None = None
    history: tuple[HistoryEntry, ...] = ()
    history_dropped: int = 0
    traceparent: str | None = None
    tracestate: str | None = None
    definition_version: int = 1
    definition_fingerprint: str | None = None
    """The definition the saga started with; ``None`` for sagas stored before fingerprints."""
    inbox: tuple[Reply, ...] = ()
    """Replies that arrived while the saga was held, applied in order when it resumes."""
    watchers: tuple[str, ...] = ()
    """Clients' queues to send the outcome to when the saga ends (or gets stuck)."""

    @property
    def current_step(self) -> StepState | None:
        """The step the saga is on.

        While compensating (or stuck) that is the compensation under way, not the last
        forward step; going forward, the step whose command is out or whose retry waits; for
        a finished saga, the last step that ran. ``None`` before any step ran.
        """
        if self.status in (SagaStatus.COMPENSATING, SagaStatus.STUCK):
            for step in self.steps:
                if step.status.is_compensation:
                    return step
        if self.status in (SagaStatus.STARTED, SagaStatus.PENDING):
            for step in self.steps:
                if step.status in (StepStatus.RUNNING, StepStatus.RETRY_SCHEDULED):
                    return step
        for step in reversed(self.steps):
            if step.status is not StepStatus.NOT_STARTED:
                return step
        return None

    def step(self, name: str) -> StepState:
        """The state of the step called ``name``."""
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    @property
    def next_due_at(self) -> datetime | None:
        """The earliest instant at which something is due (a timeout, a retry, the deadline).

        This is the truth that timers only hint at: the sweep fires every saga whose
        ``next_due_at`` has passed. ``None`` when nothing is due (terminal, stuck).
        """
        if not self.status.is_active:
            return None
        candidates = [step.due_at for step in self.steps if step.due_at is not None]
        if self.deadline_at is not None and self.status is not SagaStatus.COMPENSATING:
            candidates.append(self.deadline_at)
        return min(candidates, default=None)

    def to_document(self) -> JsonObject:
        """The state as stored: JSON-compatible values (datetimes as ISO strings)."""
        document: JsonObject = _SAGA_STATE.dump_python(self, mode="json")
        return document

    def to_json(self) -> bytes:
        """The stored document as JSON bytes."""
        return _SAGA_STATE.dump_json(self)

    @classmethod
    def from_json(cls, text: str | bytes) -> SagaState:
        """Read a stored document back from its JSON text, validating every field.

        Raises:
            pydantic.ValidationError: the document is not a saga state this release knows.
        """
        return _SAGA_STATE.validate_json(text)

    @classmethod
    def from_document(cls, document: object) -> SagaState:
        """Read a stored document back, validating every field.

        Raises:
            pydantic.ValidationError: the document is not a saga state this release knows.
        """
        return _SAGA_STATE.validate_python(document)

    def summary(self, *, with_history: bool = True) -> dict[str, Any]:
        """The JSON shape used by ``saga demo --json``, ``saga show --json`` and ``saga ls``."""
        out: dict[str, Any] = {
            "saga_id": self.saga_id,
            "saga_type": self.saga_type,
            "version": self.definition_version,
            "fingerprint": self.definition_fingerprint,
            "status": self.status.value,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "finished_at": _iso(self.finished_at) if self.finished_at else None,
            "failure_reason": self.failure_reason,
            "current_step": _position(self.current_step),
            "steps": [self._step_summary(step) for step in self.steps],
        }
        if with_history:
            out["data"] = self.data
            out["results"] = self.results
            out["history"] = [entry.to_json() for entry in self.history]
            out["history_dropped"] = self.history_dropped
        return out

    def _step_summary(self, step: StepState) -> dict[str, Any]:
        return {
            "name": step.name,
            "status": step.status.value,
            "group": step.group,
            "attempts": step.attempt,
            "compensation_attempts": step.compensation_attempt,
            "in_doubt": step.in_doubt,
            "started_at": _iso(step.started_at) if step.started_at else None,
            "finished_at": _iso(step.finished_at) if step.finished_at else None,
            "due_at": _iso(step.due_at) if step.due_at else None,
            "picked_up_at": _iso(step.picked_up_at) if step.picked_up_at else None,
            "heartbeat_at": _iso(step.heartbeat_at) if step.heartbeat_at else None,
            "heartbeat": step.heartbeat,
            "error": None if step.error is None else step.error.model_dump(exclude_none=True),
            "result": self.results.get(step.name),
        }


_SAGA_STATE: TypeAdapter[SagaState] = TypeAdapter(SagaState)
_HISTORY_ENTRY: TypeAdapter[HistoryEntry] = TypeAdapter(HistoryEntry)


def _position(step: StepState | None) -> dict[str, str] | None:
    if step is None:
        return None
    direction = "compensation" if step.status.is_compensation else "forward"
    return {"name": step.name, "status": step.status.value, "direction": direction}


def _iso(instant: datetime) -> str:
    """ISO 8601 as pydantic writes it (``Z`` for UTC), so every timestamp in a summary matches."""
    return instant.isoformat().replace("+00:00", "Z")
