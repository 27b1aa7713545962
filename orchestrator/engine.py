"""The pure saga core: ``decide(state, event, now, saga) -> Decision``.

Every rule of a saga lives here and nowhere else: which step runs next, retries and their
backoff, timeouts, compensation in strict reverse order, late and duplicate replies, stale
timers, the saga deadline and the operator actions. The function does no I/O, reads no clock
and draws no random numbers (jitter is derived from the saga id), so the same inputs always
give the same decision. The shell around it loads, decides, saves state and outbox in one
atomic write, then publishes.

Rules worth knowing before reading the code:

* Only the reply to a step's latest attempt moves the saga; any other reply (an older attempt,
  a duplicate, one that arrives after a timeout) is recorded as ``SagaLateReply`` and changes
  nothing else.
* Timers are wake-ups. On any wake-up the state's own due times decide what fires, so a stale
  or duplicate timer changes nothing, and one that arrives early is re-armed.
* A timed-out step is *in doubt*: its participant may have acted. Unless the step says
  otherwise it is compensated with the others.
* Compensations run one at a time, from the last step that may have acted back to the first.
  One that keeps failing parks the saga as ``stuck``; nothing is sent until an operator acts.
* Once the pivot completes, or a retriable step has been sent, the saga can only go forward:
  abort is refused and the deadline no longer applies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from functools import partial
from typing import Any

from pydantic import BaseModel, ValidationError

from contracts.events import EventName, LifecycleEvent
from contracts.messages import (
    CommandEnvelope,
    Direction,
    ErrorDetail,
    Heartbeat,
    JsonObject,
    PickedUp,
    Reply,
    ReplyStatus,
    TimerKind,
    TimerMessage,
)
from orchestrator.definition import Saga, Step, StepKind
from orchestrator.effects import Effect, MessageBuilder, PublishEvent, SendCommand
from orchestrator.state import HistoryEntry, SagaState, SagaStatus, StepState, StepStatus
from plumbing.codec import validation_summary
from plumbing.errors import ActionRefused, InvalidSagaData

HISTORY_LIMIT = 200
"""Default cap on a saga's stored history; older entries after the first are dropped."""

_WAKEUP_ROUNDS = 8  # a late sweep may find a retry due right after the timeout it handled


# --- Events in -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Begin the saga: dispatch its first step."""


@dataclass(frozen=True)
class ReplyReceived:
    """A participant answered a command attempt."""

    reply: Reply


@dataclass(frozen=True)
class Progress:
    """A participant picked a command up, or sent a heartbeat while working on it."""

    message: PickedUp | Heartbeat


@dataclass(frozen=True)
class Wakeup:
    """A timer arrived (``timer`` set) or the sweep found the saga due (``timer`` is None)."""

    timer: TimerMessage | None = None


@dataclass(frozen=True)
class OperatorRetry:
    """Re-drive a stuck saga: send the compensation that kept failing again."""

    by: str | None = None
    """Who asked (an operator's name), recorded on the history entries it causes."""


@dataclass(frozen=True)
class OperatorAbort:
    """Stop going forward and compensate now."""

    reason: str = "aborted by an operator"
    by: str | None = None
    """Who asked, recorded on the history entries it causes."""


@dataclass(frozen=True)
class OperatorResolve:
    """Mark the stuck compensation as done by hand and carry on compensating."""

    note: str = "resolved by an operator"
    by: str | None = None
    """Who asked, recorded on the history entries it causes."""


class Action(StrEnum):
    """What an operator can do to a saga, by name (the CLI's and the console's words)."""

    RETRY = "retry"
    """Send the compensation a stuck saga gave up on again (a new generation)."""
    ABORT = "abort"
    """Stop going forward and compensate now."""
    RESOLVE = "resolve"
    """Take a stuck compensation as done by hand and carry on compensating."""

    def event(
        self, *, by: str | None, reason: str | None = None
    ) -> OperatorRetry | OperatorAbort | OperatorResolve:
        """The event for this action, naming the operator."""
        match self:
            case Action.RETRY:
                return OperatorRetry(by=by)
            case Action.ABORT:
                return OperatorAbort(reason or f"aborted by {by or 'an operator'}", by=by)
            case Action.RESOLVE:
                return OperatorResolve(reason or f"resolved by {by or 'an operator'}", by=by)


@dataclass(frozen=True)
class Watch:
    """A client wants the saga's outcome sent to its queue when the saga ends."""

    reply_to: str


Event = (
    Start
    | ReplyReceived
    | Progress
    | Wakeup
    | OperatorRetry
    | OperatorAbort
    | OperatorResolve
    | Watch
)
"""Everything that can happen to a saga."""

WATCHERS_LIMIT = 16
"""Clients' queues kept per saga; a newer watcher pushes the oldest out."""


class Outcome(StrEnum):
    """What an event did, for logs and metrics."""

    APPLIED = "applied"
    LATE_REPLY = "late_reply"
    STALE_TIMER = "stale_timer"
    REARMED = "rearmed"
    HELD = "held"
    """Not decided: the saga is held (the shell kept a reply for when it resumes)."""


@dataclass(frozen=True)
class Decision:
    """The result of :func:`decide`: the new state and what to publish."""

    state: SagaState
    effects: tuple[Effect, ...]
    outcome: Outcome
    changed: bool = field(default=True)

    @property
    def events(self) -> tuple[LifecycleEvent, ...]:
        """The lifecycle events this decision publishes."""
        return tuple(e.event for e in self.effects if isinstance(e, PublishEvent))

    @property
    def commands(self) -> tuple[CommandEnvelope, ...]:
        """The commands this decision sends."""
        return tuple(e.envelope for e in self.effects if isinstance(e, SendCommand))


# --- Entry points ----------------------------------------------------------------------------


def new_saga(
    saga: Saga,
    saga_id: str,
    data: Mapping[str, Any],
    now: datetime,
    *,
    traceparent: str | None = None,
    tracestate: str | None = None,
    watchers: tuple[str, ...] = (),
) -> SagaState:
    """The state of a saga that has been accepted but not started.

    Raises:
        InvalidSagaData: ``data`` does not validate against the saga's data model.
    """
    if saga.data is not None:
        try:
            clean: JsonObject = saga.data.model_validate(dict(data)).model_dump(mode="json")
        except ValidationError as e:
            raise InvalidSagaData(
                f"data for saga type {saga.name!r} is invalid: {validation_summary(e)}"
            ) from e
    else:
        clean = dict(data)
    return SagaState(
        saga_id=saga_id,
        saga_type=saga.name,
        status=SagaStatus.STARTED,
        data=clean,
        steps=tuple(StepState(name=step.name, group=step.group) for step in saga.steps),
        created_at=now,
        updated_at=now,
        deadline_at=now + saga.deadline if saga.deadline is not None else None,
        traceparent=traceparent,
        tracestate=tracestate,
        definition_version=saga.version,
        definition_fingerprint=saga.fingerprint,
        watchers=watchers[-WATCHERS_LIMIT:],
    )


def start_saga(
    saga: Saga,
    saga_id: str,
    data: Mapping[str, Any],
    now: datetime,
    *,
    traceparent: str | None = None,
    watchers: tuple[str, ...] = (),
    history_limit: int = HISTORY_LIMIT,
) -> Decision:
    """Accept a saga and dispatch its first step (``new_saga`` then ``Start``)."""
    state = new_saga(saga, saga_id, data, now, traceparent=traceparent, watchers=watchers)
    return decide(state, Start(), now, saga, history_limit=history_limit)


def decide(
    state: SagaState,
    event: Event,
    now: datetime,
    saga: Saga,
    *,
    history_limit: int = HISTORY_LIMIT,
) -> Decision:
    """Apply one event to one saga.

    Raises:
        ActionRefused: an operator action does not apply to the saga's current state.
    """
    change = _Change(saga, state, now)
    match event:
        case Start():
            change.start()
            outcome = Outcome.APPLIED
        case ReplyReceived(reply=reply):
            outcome = change.on_reply(reply)
        case Progress(message=message):
            outcome = change.on_progress(message)
        case Wakeup(timer=timer):
            outcome = change.on_wakeup(timer)
        case OperatorRetry(by=by):
            change.by = by
            change.operator_retry()
            outcome = Outcome.APPLIED
        case OperatorAbort(reason=reason, by=by):
            change.by = by
            change.operator_abort(reason)
            outcome = Outcome.APPLIED
        case OperatorResolve(note=note, by=by):
            change.by = by
            change.operator_resolve(note)
            outcome = Outcome.APPLIED
        case Watch(reply_to=reply_to):
            change.watch(reply_to)
            outcome = Outcome.APPLIED
    return change.decision(outcome, history_limit)


def replay(
    state: SagaState,
    events: Sequence[Event],
    now: datetime,
    saga: Saga,
    *,
    history_limit: int = HISTORY_LIMIT,
) -> tuple[Decision, ...]:
    """Apply ``events`` in turn, each to the state the previous one left: how a held saga
    catches up on the replies it kept when it resumes."""
    decisions = []
    for event in events:
        decision = decide(state, event, now, saga, history_limit=history_limit)
        decisions.append(decision)
        state = decision.state
    return tuple(decisions)


# --- The working copy ------------------------------------------------------------------------


class _Change:
    """A mutable scratch copy of one saga for the duration of one ``decide`` call.

    Its fields are the parts of the state a decision may change; steps change only through
    :class:`StepState`'s named transitions.
    """

    def __init__(self, saga: Saga, state: SagaState, now: datetime) -> None:
        self.saga = saga
        self.original = state
        self.now = now
        self.messages = MessageBuilder(state, now)
        self.status = state.status
        self.steps = list(state.steps)
        self.results = state.results
        self.deadline_at = state.deadline_at
        self.finished_at = state.finished_at
        self.failure_reason = state.failure_reason
        self.history = list(state.history)
        self.by: str | None = None
        """The operator whose action this decision applies, if one asked for it."""
        self.watchers = state.watchers
        self.effects: list[Effect] = []

    # -- bookkeeping --

    def decision(self, outcome: Outcome, history_limit: int) -> Decision:
        dropped = self.original.history_dropped
        history = self.history
        if len(history) > history_limit:
            excess = len(history) - history_limit
            history = [history[0], *history[1 + excess :]]
            dropped += excess
        state = replace(
            self.original,
            status=self.status,
            steps=tuple(self.steps),
            results=self.results,
            deadline_at=self.deadline_at,
            finished_at=self.finished_at,
            failure_reason=self.failure_reason,
            history=tuple(history),
            history_dropped=dropped,
            watchers=self.watchers,
        )
        if self.status is not self.original.status and not self.status.is_active:
            # Ended or stuck: watching clients learn how. Once it has ended for good nobody
            # needs to be told again; a stuck saga keeps its watchers for the real end.
            self.effects.extend(self.messages.outcomes(state))
            if self.status.is_terminal:
                state = replace(state, watchers=())
        # Compare the state itself, not just effects and history: some transitions only
        # clear a due time, and losing that write would make the sweep fire it forever.
        changed = bool(self.effects) or state != self.original
        state = replace(state, updated_at=self.now) if changed else self.original
        return Decision(state=state, effects=tuple(self.effects), outcome=outcome, changed=changed)

    def record(
        self,
        name: EventName,
        *,
        step: str | None = None,
        attempt: int | None = None,
        detail: str | None = None,
        **extra: object,
    ) -> None:
        """Append ``name`` to the history and publish it as a lifecycle event."""
        sequence = self.original.history_dropped + len(self.history)
        self.history.append(
            HistoryEntry(
                event=name, at=self.now, step=step, attempt=attempt, detail=detail, by=self.by
            )
        )
        self.effects.append(
            self.messages.event(name, sequence, step=step, attempt=attempt, detail=detail, **extra)
        )

    def definition(self, index: int) -> Step:
        return self.saga.steps[index]

    def index_of(self, name: str) -> int | None:
        return self.saga.index.get(name)

    def context(self, upto: int) -> JsonObject:
        """Start data plus the results of the first ``upto`` steps, later ones winning."""
        context = dict(self.original.data)
        for step in self.saga.steps[:upto]:
            context.update(self.results.get(step.name, {}))
        return context

    def past_point_of_no_return(self) -> bool:
        for definition, step in zip(self.saga.steps, self.steps, strict=True):
            if definition.kind is StepKind.PIVOT and step.status is StepStatus.COMPLETED:
                return True
            if definition.kind is StepKind.RETRIABLE and step.status is not StepStatus.NOT_STARTED:
                return True
        return False

    def running_pivot(self) -> Step | None:
        for definition, step in zip(self.saga.steps, self.steps, strict=True):
            if definition.kind is StepKind.PIVOT and step.status in (
                StepStatus.RUNNING,
                StepStatus.RETRY_SCHEDULED,
            ):
                return definition
        return None

    def forward_indices(self) -> list[int]:
        """The steps going forward right now (running or waiting for a retry): one, or the
        members of a group."""
        return [
            index
            for index, step in enumerate(self.steps)
            if step.status in (StepStatus.RUNNING, StepStatus.RETRY_SCHEDULED)
        ]

    def forward_status(self) -> SagaStatus:
        """``started`` while a command is out, ``pending`` while only retries are waiting."""
        running = any(step.status is StepStatus.RUNNING for step in self.steps)
        return SagaStatus.STARTED if running else SagaStatus.PENDING

    def timer(self, kind: TimerKind, step: str | None, attempt: int, due: datetime) -> None:
        self.effects.append(self.messages.timer(kind, step, attempt, due))

    def watch(self, reply_to: str) -> None:
        if not self.status.is_active or reply_to in self.watchers:
            return  # an ended saga's outcome is in the snapshot the client gets anyway
        self.watchers = (*self.watchers, reply_to)[-WATCHERS_LIMIT:]

    def attempt_due(self, definition: Step, step: StepState) -> datetime:
        """When the running attempt must have been picked up, sent a heartbeat or answered."""
        assert step.attempt_at is not None
        if definition.dispatch_timeout is not None and step.picked_up_at is None:
            due = step.attempt_at + definition.dispatch_timeout
        else:
            began = step.picked_up_at or step.attempt_at
            due = began + definition.timeout
            if definition.heartbeat_timeout is not None:
                due = min(due, (step.heartbeat_at or began) + definition.heartbeat_timeout)
        return due if step.budget_at is None else min(due, step.budget_at)

    # -- going forward --

    def start(self) -> None:
        self.record(EventName.SAGA_STARTED, data=self.original.data)
        if self.deadline_at is not None:
            # Its own wake-up, so the deadline fires on time even without a sweep.
            self.timer(TimerKind.SAGA_DEADLINE, None, 0, self.deadline_at)
        self.dispatch_stage(0)

    def dispatch_stage(self, stage: int) -> None:
        """Send the first attempt of every step of ``stage`` (one step, or a group)."""
        for index in self.saga.stages[stage]:
            if self.status is SagaStatus.COMPENSATING:
                return  # a member's command could not be built: the saga is going back
            self.dispatch(index, attempt=1)

    def dispatch(self, index: int, attempt: int) -> None:
        definition = self.definition(index)
        first = self.saga.stages[self.saga.stage_of[index]][0]
        budget_at = self.steps[index].budget_at
        if budget_at is None and definition.budget is not None:
            budget_at = self.now + definition.budget
        pickup_by = None
        if definition.dispatch_timeout is not None:
            pickup_by = self.now + definition.dispatch_timeout
        deadline = (pickup_by or self.now) + definition.timeout
        try:
            send = self.messages.command(
                definition,
                command=definition.command,
                direction=Direction.FORWARD,
                attempt=attempt,
                context=self.context(first),  # the results before its stage, not siblings'
                deadline=deadline if budget_at is None else min(deadline, budget_at),
                pickup_by=pickup_by,
                heartbeat_timeout=definition.heartbeat_timeout,
            )
        except ValidationError as e:
            self.steps[index] = self.steps[index].unsendable(attempt, self.now)
            error = ErrorDetail(type="CommandBuildError", message=validation_summary(e))
            self.fail_forward(index, error)
            return
        running = self.steps[index].running(attempt, self.now, self.now, budget_at)
        due = self.attempt_due(definition, running)
        self.steps[index] = replace(running, due_at=due)
        self.status = self.forward_status()
        if definition.kind is StepKind.RETRIABLE:
            self.deadline_at = None  # past the point of no return: the deadline cannot apply
        self.effects.append(send)
        self.timer(TimerKind.STEP_TIMEOUT, definition.name, attempt, due)
        self.record(EventName.STEP_STARTED, step=definition.name, attempt=attempt)

    def complete_forward(self, index: int, result: JsonObject) -> None:
        definition = self.definition(index)
        self.results = {**self.results, definition.name: result}
        self.steps[index] = self.steps[index].completed(self.now)
        self.record(
            EventName.STEP_COMPLETED,
            step=definition.name,
            attempt=self.steps[index].attempt,
            result=result,
        )
        if definition.kind is StepKind.PIVOT:
            self.deadline_at = None
        if self.status is SagaStatus.COMPENSATING:
            self.next_compensation()  # a sibling failed meanwhile: this one is undone too
            return
        stage = self.saga.stage_of[index]
        if any(self.steps[i].status is not StepStatus.COMPLETED for i in self.saga.stages[stage]):
            self.status = self.forward_status()  # the group waits for its other members
        elif stage == len(self.saga.stages) - 1:
            self.status = SagaStatus.COMPLETED
            self.finished_at = self.now
            self.deadline_at = None
            self.record(EventName.SAGA_COMPLETED)
        else:
            self.dispatch_stage(stage + 1)

    def errored_forward(self, index: int, error: ErrorDetail) -> None:
        definition = self.definition(index)
        policy = definition.retry
        if self.status is SagaStatus.COMPENSATING:
            self.fail_forward(index, error)  # a sibling failed: no more attempts
        elif definition.kind is StepKind.RETRIABLE or (
            policy.retries_error(error.type) and policy.allows_another(self.steps[index].attempt)
        ):
            self.schedule_retry(index, error)
        else:
            self.fail_forward(index, error)

    def schedule_retry(self, index: int, error: ErrorDetail) -> None:
        definition = self.definition(index)
        step = self.steps[index]
        delay = definition.retry.backoff(step.attempt, seed=f"{self.original.saga_id}:{step.name}")
        due = self.now + delay
        if step.budget_at is not None and due >= step.budget_at:
            assert definition.budget is not None
            spent = ErrorDetail(
                type="BudgetExhausted",
                message=f"no time left in its budget of {_seconds(definition.budget)} for "
                f"another attempt (last: {error.summary})",
            )
            self.fail_forward(index, spent)
            return
        self.steps[index] = step.retry_scheduled(due, error)
        self.status = self.forward_status()
        self.timer(TimerKind.RETRY, step.name, step.attempt + 1, due)
        self.record(
            EventName.STEP_RETRYING,
            step=step.name,
            attempt=step.attempt + 1,
            detail=error.summary,
            retry_at=due,
            error=error,
        )

    def fail_forward(self, index: int, error: ErrorDetail) -> None:
        definition = self.definition(index)
        if definition.kind is StepKind.RETRIABLE:
            self.schedule_retry(index, error)  # a retriable step never fails for good
            return
        step = self.steps[index] = self.steps[index].failed(error, self.now)
        self.record(
            EventName.STEP_FAILED,
            step=step.name,
            attempt=step.attempt,
            detail=error.summary,
            error=error,
        )
        if self.status is SagaStatus.COMPENSATING:
            self.next_compensation()  # a sibling failed first; this one was the last to answer
        else:
            self.begin_compensation(f"step {step.name} failed ({error.type})")

    def forward_timed_out(self, index: int) -> None:
        definition = self.definition(index)
        step = self.steps[index] = self.steps[index].doubted()
        event, error = self.why_timed_out(definition, step)
        self.record(event, step=step.name, attempt=step.attempt, detail=error.message)
        policy = definition.retry
        compensating = self.status is SagaStatus.COMPENSATING  # a sibling failed meanwhile
        spent = error.type == "BudgetExhausted"
        if (
            not compensating
            and not spent
            and (
                definition.kind is StepKind.RETRIABLE
                or (policy.retry_timeouts and policy.allows_another(step.attempt))
            )
        ):
            self.schedule_retry(index, error)
            return
        self.steps[index] = step.timed_out(error, self.now)
        if compensating:
            self.next_compensation()
        else:
            self.begin_compensation(f"step {step.name} timed out")

    def why_timed_out(self, definition: Step, step: StepState) -> tuple[EventName, ErrorDetail]:
        """Which limit a running attempt reached: pick-up, budget, heartbeat or reply.

        Every one leaves the step in doubt: even a command reported as not picked up may
        have been taken just now, and a participant that never ran it accepts its
        compensation (and refuses the command afterwards).
        """
        if definition.dispatch_timeout is not None and step.picked_up_at is None:
            wait = _seconds(definition.dispatch_timeout)
            message = f"no participant picked it up within {wait}"
            return EventName.STEP_NOT_PICKED_UP, ErrorDetail(
                type="StepNotPickedUp", message=message
            )
        if step.budget_at is not None and self.now >= step.budget_at:
            assert definition.budget is not None
            message = f"its budget of {_seconds(definition.budget)} is spent"
            return EventName.STEP_TIMED_OUT, ErrorDetail(type="BudgetExhausted", message=message)
        began = step.picked_up_at or step.attempt_at
        beat = definition.heartbeat_timeout
        if beat is not None and began is not None and self.now < began + definition.timeout:
            message = f"no heartbeat within {_seconds(beat)}"
            return EventName.STEP_TIMED_OUT, ErrorDetail(type="HeartbeatTimeout", message=message)
        message = f"no reply within {_seconds(definition.timeout)}"
        return EventName.STEP_TIMED_OUT, ErrorDetail(type="StepTimeout", message=message)

    def on_progress(self, message: PickedUp | Heartbeat) -> Outcome:
        """A pick-up or a heartbeat moves the running attempt's due time; nothing else."""
        index = self.index_of(message.step)
        if index is None or message.direction is not Direction.FORWARD:
            return Outcome.LATE_REPLY
        step = self.steps[index]
        if step.status is not StepStatus.RUNNING or message.attempt != step.attempt:
            return Outcome.LATE_REPLY
        definition = self.definition(index)
        if isinstance(message, PickedUp):
            if step.picked_up_at is not None:
                return Outcome.APPLIED  # a duplicate: nothing moves, nothing is written
            moved = step.picked_up(self.now, step.due_at or self.now)
        else:
            moved = step.beating(self.now, message.details, step.due_at or self.now)
        # The timer already set fires early now; the wake-up re-arms it for the new due time.
        self.steps[index] = replace(moved, due_at=self.attempt_due(definition, moved))
        return Outcome.APPLIED

    # -- going back --

    def begin_compensation(self, reason: str) -> None:
        self.status = SagaStatus.COMPENSATING
        self.failure_reason = reason
        for index, step in enumerate(self.steps):
            if step.status is StepStatus.RETRY_SCHEDULED:
                # A group member waiting to retry: no more attempts now the saga goes back.
                error = ErrorDetail(type="Cancelled", message=f"not retried: {reason}")
                self.steps[index] = step.failed(error, self.now)
                self.record(
                    EventName.STEP_FAILED,
                    step=step.name,
                    attempt=step.attempt,
                    detail=error.summary,
                    error=error,
                )
        self.next_compensation()

    def needs_compensation(self, index: int) -> bool:
        definition = self.definition(index)
        if definition.compensation is None:
            return False
        step = self.steps[index]
        if step.status is StepStatus.COMPLETED:
            return True
        return (
            step.in_doubt
            and definition.compensate_on_timeout
            and step.status in (StepStatus.TIMED_OUT, StepStatus.FAILED)
        )

    def next_compensation(self) -> None:
        if any(step.status is StepStatus.RUNNING for step in self.steps):
            return  # a group member's command is out: undo nothing before it has answered
        for index in range(len(self.steps) - 1, -1, -1):
            if self.needs_compensation(index):
                self.dispatch_compensation(index, self.steps[index].compensation_attempt + 1)
                return
        self.status = SagaStatus.FAILED
        self.finished_at = self.now
        self.deadline_at = None
        self.record(EventName.SAGA_FAILED, detail=self.failure_reason)

    def dispatch_compensation(self, index: int, attempt: int, detail: str | None = None) -> None:
        definition = self.definition(index)
        assert definition.compensation is not None  # only called for steps that need it
        try:
            send = self.messages.command(
                definition,
                command=definition.compensation,
                direction=Direction.COMPENSATION,
                attempt=attempt,
                context=self.context(index + 1),  # its own result, if it completed
                deadline=self.now + definition.compensation_timeout,
                generation=self.steps[index].compensation_generation,
            )
        except ValidationError as e:
            self.steps[index] = self.steps[index].compensating(
                attempt, self.steps[index].due_at, self.now
            )
            error = ErrorDetail(type="CommandBuildError", message=validation_summary(e))
            self.compensation_failed(index, error, retryable=False)
            return
        due = self.now + definition.compensation_timeout
        self.steps[index] = self.steps[index].compensating(attempt, due, self.now)
        self.effects.append(send)
        self.timer(TimerKind.COMPENSATION_TIMEOUT, definition.name, attempt, due)
        self.record(
            EventName.COMPENSATION_STARTED, step=definition.name, attempt=attempt, detail=detail
        )

    def compensation_failed(self, index: int, error: ErrorDetail, *, retryable: bool) -> None:
        definition = self.definition(index)
        step = self.steps[index]
        failures = step.compensation_failures + 1
        policy = definition.compensation_retry
        self.record(
            EventName.COMPENSATION_FAILED,
            step=step.name,
            attempt=step.compensation_attempt,
            detail=error.summary,
            error=error,
        )
        if retryable and policy.allows_another(failures):
            delay = policy.backoff(failures, seed=f"{self.original.saga_id}:{step.name}:undo")
            due = self.now + delay
            self.steps[index] = step.compensation_retry_scheduled(due, error)
            self.timer(TimerKind.COMPENSATION_RETRY, step.name, step.compensation_attempt + 1, due)
            return
        self.steps[index] = step.compensation_failed(error)
        self.status = SagaStatus.STUCK
        self.record(
            EventName.SAGA_STUCK,
            step=step.name,
            attempt=step.compensation_attempt,
            detail=f"compensation of {step.name} failed {failures} time(s): {error.summary}",
        )

    # -- replies --

    def on_reply(self, reply: Reply) -> Outcome:
        index = self.index_of(reply.step)
        if index is None:
            return self.late(reply, f"no step named {reply.step!r}")
        step = self.steps[index]
        if reply.direction is Direction.FORWARD:
            # While compensating, a group member may still be running: its answer counts.
            if not (
                self.status.is_active
                and step.status is StepStatus.RUNNING
                and reply.attempt == step.attempt
            ):
                return self.late(reply, f"step is {step.status.value} at attempt {step.attempt}")
            self.on_forward_reply(index, reply)
        else:
            if not (
                self.status is SagaStatus.COMPENSATING
                and step.status is StepStatus.COMPENSATING
                and reply.attempt == step.compensation_attempt
            ):
                attempt = step.compensation_attempt
                return self.late(
                    reply, f"step is {step.status.value} at compensation attempt {attempt}"
                )
            self.on_compensation_reply(index, reply)
        return Outcome.APPLIED

    def on_forward_reply(self, index: int, reply: Reply) -> None:
        error = reply.error or ErrorDetail(
            type="UnknownError", message="the reply gave no error detail"
        )
        if reply.status is ReplyStatus.COMPLETED:
            result_model = self.definition(index).result
            try:
                result = _clean_result(result_model, reply.result)
            except ValidationError as e:
                error = ErrorDetail(type="InvalidResult", message=validation_summary(e))
                self.errored_forward(index, error)
                return
            self.complete_forward(index, result)
        elif reply.status is ReplyStatus.FAILED:
            self.fail_forward(index, error)
        else:
            self.errored_forward(index, error)

    def on_compensation_reply(self, index: int, reply: Reply) -> None:
        step = self.steps[index]
        if reply.status is ReplyStatus.COMPLETED:
            self.steps[index] = step.compensated(self.now, clear_error=True)
            self.record(
                EventName.COMPENSATION_COMPLETED, step=step.name, attempt=step.compensation_attempt
            )
            self.next_compensation()
            return
        error = reply.error or ErrorDetail(
            type="UnknownError", message="the reply gave no error detail"
        )
        policy = self.definition(index).compensation_retry
        retryable = reply.status is ReplyStatus.ERROR and policy.retries_error(error.type)
        self.compensation_failed(index, error, retryable=retryable)

    def late(self, reply: Reply, why: str) -> Outcome:
        self.record(
            EventName.LATE_REPLY,
            step=reply.step,
            attempt=reply.attempt,
            detail=f"{reply.direction.value} reply {reply.status.value} ignored: {why}",
            status=reply.status,
        )
        return Outcome.LATE_REPLY

    # -- timers --

    def on_wakeup(self, timer: TimerMessage | None) -> Outcome:
        fired = False
        for _ in range(_WAKEUP_ROUNDS):
            action = self.due_action()
            if action is None:
                break
            action()
            fired = True
        if fired:
            return Outcome.APPLIED
        if timer is not None:
            due = self.pending_due(timer)
            if due is not None and due > self.now:
                self.timer(timer.timer, timer.step, timer.attempt, due)
                return Outcome.REARMED
        return Outcome.STALE_TIMER

    def due_action(self) -> Callable[[], None] | None:
        if not self.status.is_active:
            return None
        if (
            self.deadline_at is not None
            and self.deadline_at <= self.now
            and self.status in (SagaStatus.STARTED, SagaStatus.PENDING)
        ):
            return self.deadline_passed
        for index, step in enumerate(self.steps):
            if step.due_at is not None and step.due_at <= self.now:
                return self.step_due(index, step)
        return None

    def step_due(self, index: int, step: StepState) -> Callable[[], None] | None:
        """What firing a step's due time means in its current status."""
        if step.status is StepStatus.RUNNING:
            return partial(self.forward_timed_out, index)
        if step.status is StepStatus.RETRY_SCHEDULED:
            return partial(self.dispatch, index, step.attempt + 1)
        if step.status is StepStatus.COMPENSATING:
            return partial(self.compensation_timed_out, index)
        if step.status is StepStatus.COMPENSATION_RETRY_SCHEDULED:
            return partial(self.dispatch_compensation, index, step.compensation_attempt + 1)
        return None

    def compensation_timed_out(self, index: int) -> None:
        definition = self.definition(index)
        error = ErrorDetail(
            type="CompensationTimeout",
            message=f"no reply within {_seconds(definition.compensation_timeout)}",
        )
        self.compensation_failed(
            index, error, retryable=definition.compensation_retry.retry_timeouts
        )

    def pending_due(self, timer: TimerMessage) -> datetime | None:
        """The due time of the target ``timer`` names, if the saga still waits for it."""
        return _pending_due(timer, self.status, self.steps, self.deadline_at)

    def deadline_passed(self) -> None:
        deadline = self.saga.deadline
        reason = f"the saga deadline ({_seconds(deadline) if deadline else '?'}) passed"
        if self.past_point_of_no_return() or self.running_pivot() is not None:
            self.deadline_at = None  # the pivot decides now: its own timeout still applies
            return
        self.deadline_at = None
        self.abort(reason)

    # -- operator actions --

    def abort(self, reason: str) -> None:
        for index in self.forward_indices():
            step = self.steps[index]
            in_doubt = step.in_doubt or step.status is StepStatus.RUNNING
            error = ErrorDetail(type="Aborted", message=reason)
            self.steps[index] = step.failed(error, self.now, in_doubt=in_doubt)
            self.record(
                EventName.STEP_FAILED,
                step=step.name,
                attempt=step.attempt,
                detail=reason,
                error=error,
            )
        self.begin_compensation(reason)

    def operator_abort(self, reason: str) -> None:
        saga_id = self.original.saga_id
        if self.status.is_terminal:
            raise ActionRefused(
                f"saga {saga_id} is already {self.status.value}; there is nothing to abort"
            )
        if self.status in (SagaStatus.COMPENSATING, SagaStatus.STUCK):
            raise ActionRefused(
                f"saga {saga_id} is already {self.status.value}; "
                "use retry or resolve on a stuck saga"
            )
        if self.past_point_of_no_return():
            raise ActionRefused(
                f"saga {saga_id} is past its point of no return and can only go forward"
            )
        pivot = self.running_pivot()
        if pivot is not None:
            raise ActionRefused(
                f"saga {saga_id} is waiting on its pivot step {pivot.name!r}, which cannot be "
                "undone; abort again once it has answered"
            )
        self.abort(reason)

    def stuck_index(self, action: str) -> int:
        if self.status is not SagaStatus.STUCK:
            raise ActionRefused(
                f"saga {self.original.saga_id} is {self.status.value}; "
                f"only a stuck saga can be {action}"
            )
        for index, step in enumerate(self.steps):
            if step.status is StepStatus.COMPENSATION_FAILED:
                return index
        raise ActionRefused(f"saga {self.original.saga_id} is stuck but no compensation has failed")

    def operator_retry(self) -> None:
        index = self.stuck_index("retried")
        step = self.steps[index] = self.steps[index].retried_by_operator()
        self.status = SagaStatus.COMPENSATING
        self.dispatch_compensation(
            index,
            step.compensation_attempt + 1,
            detail=f"retried by an operator (generation {step.compensation_generation})",
        )

    def operator_resolve(self, note: str) -> None:
        index = self.stuck_index("resolved")
        step = self.steps[index] = self.steps[index].compensated(self.now, clear_error=False)
        self.status = SagaStatus.COMPENSATING
        self.record(
            EventName.COMPENSATION_COMPLETED,
            step=step.name,
            attempt=step.compensation_attempt,
            detail=note,
        )
        self.next_compensation()


def pending_due(state: SagaState, timer: TimerMessage) -> datetime | None:
    """When what ``timer`` was set for is due, if ``state`` still waits for it (else None).

    The shell uses it to drop a timer it has not published yet once it is stale.
    """
    return _pending_due(timer, state.status, state.steps, state.deadline_at)


def _pending_due(
    timer: TimerMessage,
    status: SagaStatus,
    steps: Sequence[StepState],
    deadline_at: datetime | None,
) -> datetime | None:
    if timer.timer is TimerKind.SAGA_DEADLINE:
        waiting = status in (SagaStatus.STARTED, SagaStatus.PENDING)
        return deadline_at if waiting else None
    step = next((step for step in steps if step.name == timer.step), None)
    if step is None:
        return None
    expected = {
        TimerKind.STEP_TIMEOUT: (StepStatus.RUNNING, step.attempt),
        TimerKind.RETRY: (StepStatus.RETRY_SCHEDULED, step.attempt + 1),
        TimerKind.COMPENSATION_TIMEOUT: (StepStatus.COMPENSATING, step.compensation_attempt),
        TimerKind.COMPENSATION_RETRY: (
            StepStatus.COMPENSATION_RETRY_SCHEDULED,
            step.compensation_attempt + 1,
        ),
    }[timer.timer]
    return step.due_at if (step.status, timer.attempt) == expected else None


def _clean_result(model: type[BaseModel] | None, result: JsonObject | None) -> JsonObject:
    if model is None:
        return dict(result or {})
    return model.model_validate(result or {}).model_dump(mode="json")


def _seconds(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    return f"{seconds:g}s"
