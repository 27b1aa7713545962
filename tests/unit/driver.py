"""A pure driver for ``decide``: no broker, no store, just states, events and effects.

It plays the participants and the clock by hand so tests can say exactly which reply or timer
arrives when.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import create_model

from contracts.messages import (
    Command,
    CommandEnvelope,
    Direction,
    ErrorDetail,
    ReplyStatus,
    TimerMessage,
)
from orchestrator.definition import Parallel, RetryPolicy, Saga, Step, StepKind
from orchestrator.effects import ScheduleTimer, SendCommand
from orchestrator.engine import (
    Decision,
    Event,
    ReplyReceived,
    Wakeup,
    decide,
    start_saga,
)
from orchestrator.state import SagaState
from plumbing.codec import answer

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def command(name: str) -> type[Command]:
    """A command contract class whose wire name is ``name``."""
    cls = create_model(name.title().replace("_", ""), __base__=Command)
    cls.command_name = name
    return cls


def chain(
    count: int,
    *,
    pivot_at: int | None = None,
    retriable_from: int | None = None,
    timeout: float = 10.0,
    retry: RetryPolicy | None = None,
    compensation_retry: RetryPolicy | None = None,
    deadline: float | None = None,
    version: int = 1,
    group: tuple[int, int] | None = None,
) -> Saga:
    """A saga of ``count`` steps ``s0..sN``: compensatable, then an optional pivot and
    retriable tail. Commands are ``do_i`` and compensations ``undo_i``. Steps
    ``group[0] <= i < group[1]`` run as one parallel group."""
    steps = []
    for i in range(count):
        retriable = retriable_from is not None and i >= retriable_from
        if i == pivot_at:
            kind = StepKind.PIVOT
        elif retriable:
            kind = StepKind.RETRIABLE
        else:
            kind = StepKind.COMPENSATABLE
        extra: dict[str, Any] = {}
        if compensation_retry is not None:
            extra["compensation_retry"] = compensation_retry
        steps.append(
            Step(
                f"s{i}",
                service=f"svc{i % 3}",
                command=command(f"do_{i}"),
                compensation=command(f"undo_{i}") if kind is StepKind.COMPENSATABLE else None,
                kind=kind,
                timeout=timeout,
                retry=None if retriable else retry,
                **extra,
            )
        )
    items: list[Step | Parallel] = list(steps)
    if group is not None:
        start, end = group
        items = [*steps[:start], Parallel(*steps[start:end]), *steps[end:]]
    return Saga("chain", steps=items, deadline=deadline, version=version)


@dataclass
class Driver:
    """Drives one saga through ``decide`` and remembers every effect."""

    saga: Saga
    now: datetime = T0
    state: SagaState | None = None
    sent: list[CommandEnvelope] = field(default_factory=list)
    timers: list[TimerMessage] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    def start(self, saga_id: str = "saga-1") -> Decision:
        decision = start_saga(self.saga, saga_id, {}, self.now)
        return self._record(decision)

    def apply(self, event: Event) -> Decision:
        assert self.state is not None
        return self._record(decide(self.state, event, self.now, self.saga))

    def _record(self, decision: Decision) -> Decision:
        self.state = decision.state
        self.decisions.append(decision)
        for effect in decision.effects:
            if isinstance(effect, SendCommand):
                self.sent.append(effect.envelope)
            elif isinstance(effect, ScheduleTimer):
                self.timers.append(effect.message)
        return decision

    @property
    def last(self) -> CommandEnvelope:
        return self.sent[-1]

    def reply(
        self,
        status: ReplyStatus = ReplyStatus.COMPLETED,
        *,
        to: CommandEnvelope | None = None,
        result: dict[str, Any] | None = None,
        error_type: str = "Boom",
    ) -> Decision:
        """Answer ``to`` (default: the last command sent)."""
        return self.apply(
            self.answer(to or self.last, status, result=result, error_type=error_type)
        )

    def answer(
        self,
        envelope: CommandEnvelope,
        status: ReplyStatus = ReplyStatus.COMPLETED,
        *,
        result: dict[str, Any] | None = None,
        error_type: str = "Boom",
    ) -> ReplyReceived:
        """The event of a participant answering ``envelope`` now."""
        error = (
            None if status is ReplyStatus.COMPLETED else ErrorDetail(type=error_type, message="x")
        )
        result = result if status is ReplyStatus.COMPLETED else None
        return ReplyReceived(answer(envelope, status, self.now, result=result, error=error))

    def record(self, decision: Decision) -> Decision:
        """Remember a decision made outside :meth:`apply` (a replay on resume)."""
        return self._record(decision)

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def fire_next(self) -> Decision:
        """Jump to the saga's next due time and deliver the timer scheduled for it."""
        assert self.state is not None
        due = self.state.next_due_at
        assert due is not None, "nothing is due"
        self.now = max(self.now, due)
        timer = next((t for t in reversed(self.timers) if t.due_at == due), None)
        return self.apply(Wakeup(timer))

    def compensations(self) -> list[str]:
        """Steps whose compensation was sent, in order (each attempt counted once)."""
        return [
            e.step for e in self.sent if e.direction is Direction.COMPENSATION and e.attempt == 1
        ]

    def forwards(self) -> list[str]:
        return [e.step for e in self.sent if e.direction is Direction.FORWARD]
