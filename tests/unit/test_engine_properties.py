"""Property tests of the saga rules: any interleaving of replies, duplicates, late replies,
timers (due, early, stale, duplicated), sweeps and operator actions keeps the invariants.

After every event:

* a terminal saga never sends a command or sets a timer again; a stuck one only when an
  operator acts;
* a step starts forward only after every step of the previous stage completed; the steps
  going forward at once are the members of one stage (a step, or a parallel group); at most
  one compensation is in progress, and none while a step still goes forward;
* only the reply to a step's latest attempt moves the saga;
* compensations are sent in strictly reverse step order, only for steps that completed or may
  have acted (timed out), never past the point of no return, and each step is compensated at
  most once;
* every active saga has something due (no saga waits without a timer), and after a wake-up
  nothing is left overdue (the sweep never spins on the same saga);
* a completed saga has every step completed; a failed one has every step that acted
  compensated.

At the end, letting participants answer and time run, every saga reaches ``completed``,
``failed`` or ``stuck``.

Each saga's type comes in two versions of random shape; the saga starts on one, and deploys
now and then leave its version out. Meanwhile it is held, as the orchestrator holds it:
replies are kept, nothing else happens; when its version is back it replays what it kept.
It always runs on its own version, and the invariants hold throughout.
"""

from __future__ import annotations

from datetime import timedelta

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from contracts.events import EventName
from contracts.messages import CommandEnvelope, Direction, ReplyStatus
from orchestrator.definition import RetryPolicy, StepKind
from orchestrator.effects import ScheduleTimer, SendCommand
from orchestrator.engine import (
    Decision,
    Event,
    OperatorAbort,
    OperatorResolve,
    OperatorRetry,
    Outcome,
    ReplyReceived,
    Wakeup,
    replay,
)
from orchestrator.state import SagaStatus, StepStatus
from plumbing.errors import ActionRefused
from tests.unit.driver import Driver, chain

STATUSES = st.sampled_from([ReplyStatus.COMPLETED, ReplyStatus.FAILED, ReplyStatus.ERROR])
FORWARD_BUSY = {StepStatus.RUNNING, StepStatus.RETRY_SCHEDULED}
BUSY = {
    StepStatus.RUNNING,
    StepStatus.RETRY_SCHEDULED,
    StepStatus.COMPENSATING,
    StepStatus.COMPENSATION_RETRY_SCHEDULED,
}


class SagaMachine(RuleBasedStateMachine):
    """One saga under a storm of events."""

    driver: Driver

    @initialize(
        shapes=st.lists(
            st.tuples(
                st.integers(1, 5),
                st.sampled_from(["plain", "pivot", "retriable_tail"]),
                st.integers(0, 4),
                st.integers(2, 3),
            ),
            min_size=2,
            max_size=2,
        ),
        start_on=st.sampled_from([1, 2]),
        attempts=st.integers(1, 3),
        retry_timeouts=st.booleans(),
        compensation_attempts=st.integers(1, 3),
        deadline=st.one_of(st.none(), st.integers(1, 60)),
    )
    def build(
        self,
        *,
        shapes: list[tuple[int, str, int, int]],
        start_on: int,
        attempts: int,
        retry_timeouts: bool,
        compensation_attempts: int,
        deadline: int | None,
    ) -> None:
        versions = {}
        for version, (steps, shape, group_at, group_size) in enumerate(shapes, start=1):
            pivot_at = retriable_from = None
            if shape == "pivot" and steps >= 2:
                pivot_at, retriable_from = steps - 2, steps - 1
            elif shape == "retriable_tail":
                retriable_from = steps - 1
            # A parallel group inside the compensatable prefix, when there is room for one.
            compensatable = min(i for i in (pivot_at, retriable_from, steps) if i is not None)
            end = group_at + group_size
            group = (group_at, end) if end <= compensatable else None
            versions[version] = chain(
                steps,
                pivot_at=pivot_at,
                retriable_from=retriable_from,
                timeout=10,
                retry=RetryPolicy(
                    max_attempts=attempts, retry_timeouts=retry_timeouts, max_backoff=8
                ),
                compensation_retry=RetryPolicy(
                    max_attempts=compensation_attempts, retry_timeouts=True, max_backoff=8
                ),
                deadline=deadline,
                version=version,
                group=group,
            )
        self.versions = versions
        self.loaded = {1, 2}
        self.kept: list[ReplyReceived] = []
        self.driver = Driver(versions[start_on])
        self.driver.start()
        self.timers_seen = list(self.driver.timers)
        self.compensation_order: list[int] = []
        self.compensated: list[int] = []
        self.passed_no_return = False

    # --- what can happen ---

    @property
    def held(self) -> bool:
        """Whether the deployed app lacks the saga's version, so the orchestrator holds it."""
        return self.driver.saga.version not in self.loaded

    def apply(self, event: Event) -> Decision | None:
        before = self.driver.state
        assert before is not None
        if self.held:
            if isinstance(event, ReplyReceived):
                self.kept.append(event)  # kept for when the saga resumes; nothing else moves
            return None
        try:
            decision = self.driver.apply(event)
        except ActionRefused:
            return None
        self.check_decision(before.status, event, decision)
        return decision

    def outstanding(self) -> CommandEnvelope | None:
        state = self.driver.state
        assert state is not None
        for step in state.steps:
            if step.status is StepStatus.RUNNING:
                return self.find(step.name, Direction.FORWARD, step.attempt)
            if step.status is StepStatus.COMPENSATING:
                return self.find(step.name, Direction.COMPENSATION, step.compensation_attempt)
        return None

    def find(self, step: str, direction: Direction, attempt: int) -> CommandEnvelope:
        return next(
            e
            for e in reversed(self.driver.sent)
            if (e.step, e.direction, e.attempt) == (step, direction, attempt)
        )

    def reply(self, envelope: CommandEnvelope, status: ReplyStatus) -> None:
        before = self.driver.state
        assert before is not None
        decision = self.apply(self.driver.answer(envelope, status))
        if decision is not None and decision.outcome is Outcome.APPLIED:
            step = before.step(envelope.step)
            latest = (
                step.attempt
                if envelope.direction is Direction.FORWARD
                else step.compensation_attempt
            )
            assert envelope.attempt == latest, "a reply to an older attempt moved the saga"

    @rule(status=STATUSES)
    def participant_answers(self, status: ReplyStatus) -> None:
        envelope = self.outstanding()
        if envelope is not None:
            self.reply(envelope, status)

    @rule(pick=st.integers(0, 1000), status=STATUSES)
    def old_or_duplicate_reply(self, pick: int, status: ReplyStatus) -> None:
        if self.driver.sent:
            self.reply(self.driver.sent[pick % len(self.driver.sent)], status)

    @rule()
    def next_timer_fires(self) -> None:
        state = self.driver.state
        assert state is not None
        if state.next_due_at is not None and not self.held:
            before = state.status
            decision = self.driver.fire_next()
            self.check_decision(before, Wakeup(), decision)

    @rule(loaded=st.sampled_from([frozenset({1}), frozenset({2}), frozenset({1, 2})]))
    def deploy(self, loaded: frozenset[int]) -> None:
        """A daemon with some versions takes over; a held saga whose version is back resumes."""
        was_held = self.held
        self.loaded = set(loaded)
        if not was_held or self.held:
            return
        state = self.driver.state
        assert state is not None
        events: list[Event] = [*self.kept, Wakeup()]
        self.kept = []
        for event, decision in zip(
            events, replay(state, events, self.driver.now, self.driver.saga), strict=True
        ):
            before = self.driver.state
            assert before is not None
            self.driver.record(decision)
            self.check_decision(before.status, event, decision)

    @rule(pick=st.integers(0, 1000), late=st.integers(0, 30))
    def any_timer_arrives(self, pick: int, late: int) -> None:
        """A stale, duplicate or early timer (at-least-once dead-lettering, a lost race)."""
        timers = self.driver.timers
        if timers:
            timer = timers[pick % len(timers)]
            self.driver.now = max(self.driver.now, timer.due_at - timedelta(seconds=5))
            self.driver.advance(late)
            self.apply(Wakeup(timer))

    @rule(seconds=st.integers(1, 40))
    def sweep_after(self, seconds: int) -> None:
        self.driver.advance(seconds)
        self.apply(Wakeup())

    @rule()
    def operator_aborts(self) -> None:
        self.apply(OperatorAbort())

    @rule()
    def operator_retries(self) -> None:
        self.apply(OperatorRetry())

    @rule()
    def operator_resolves(self) -> None:
        self.apply(OperatorResolve())

    # --- invariants ---

    def check_decision(self, before: SagaStatus, event: Event | None, decision: Decision) -> None:
        sends = [e for e in decision.effects if isinstance(e, SendCommand)]
        timers = [e for e in decision.effects if isinstance(e, ScheduleTimer)]
        if before.is_terminal:
            assert not sends, "a terminal saga sent a command"
            assert not timers, "a terminal saga set a timer"
        if before is SagaStatus.STUCK and not isinstance(event, OperatorRetry | OperatorResolve):
            assert not sends, "a stuck saga sent a command without an operator"
            assert not timers, "a stuck saga set a timer without an operator"
        state = decision.state
        if isinstance(event, Wakeup) and state.next_due_at is not None:
            # Whatever was due has been handled: otherwise the sweep would fire it forever.
            assert state.next_due_at > self.driver.now, "a wake-up left something overdue"
        for send in sends:
            self.check_send(send.envelope, decision)
        new_entries = state.history[len(state.history) - len(decision.events) :]
        for entry in new_entries:
            if entry.event is EventName.COMPENSATION_COMPLETED and entry.step is not None:
                i = self.driver.saga.index[entry.step]
                assert i not in self.compensated, "a step was compensated twice"
                self.compensated.append(i)
        self.note_point_of_no_return(decision)

    def check_send(self, envelope: CommandEnvelope, decision: Decision) -> None:
        i = self.driver.saga.index[envelope.step]
        if envelope.direction is Direction.FORWARD:
            saga = self.driver.saga
            stage = saga.stage_of[i]
            if envelope.attempt == 1 and stage > 0:
                for j in saga.stages[stage - 1]:
                    assert decision.state.steps[j].status is StepStatus.COMPLETED
            return
        assert not self.passed_no_return, "compensation after the point of no return"
        assert self.driver.saga.steps[i].kind is StepKind.COMPENSATABLE
        if i not in self.compensation_order:
            if self.compensation_order:
                assert i < self.compensation_order[-1], "compensations out of order"
            self.compensation_order.append(i)

    def note_point_of_no_return(self, decision: Decision) -> None:
        for definition, step in zip(self.driver.saga.steps, decision.state.steps, strict=True):
            kind = definition.kind
            if kind is StepKind.PIVOT and step.status is StepStatus.COMPLETED:
                self.passed_no_return = True
            if kind is StepKind.RETRIABLE and step.status is not StepStatus.NOT_STARTED:
                self.passed_no_return = True

    @invariant()
    def one_busy_stage_and_something_due(self) -> None:
        state = self.driver.state
        assert state is not None
        busy = [step for step in state.steps if step.status in BUSY]
        forward = [i for i, step in enumerate(state.steps) if step.status in FORWARD_BUSY]
        undoing = [step for step in busy if step.status not in FORWARD_BUSY]
        assert len({self.driver.saga.stage_of[i] for i in forward}) <= 1
        assert len(undoing) <= 1
        assert not (forward and undoing), "a compensation while a step still goes forward"
        if state.status.is_active:
            assert busy, "an active saga with no step in progress"
            assert state.next_due_at is not None, "an active saga with nothing due"
        else:
            assert state.next_due_at is None

    @invariant()
    def terminal_states_are_consistent(self) -> None:
        state = self.driver.state
        assert state is not None
        if state.status is SagaStatus.COMPLETED:
            assert all(step.status is StepStatus.COMPLETED for step in state.steps)
        if state.status is SagaStatus.FAILED:
            for definition, step in zip(self.driver.saga.steps, state.steps, strict=True):
                assert step.status is not StepStatus.COMPLETED, f"{step.name} left done"
                if definition.compensation and step.in_doubt and definition.compensate_on_timeout:
                    assert step.status is StepStatus.COMPENSATED
            assert self.compensated == sorted(self.compensated, reverse=True)

    def teardown(self) -> None:
        """Let participants answer and time pass: the saga must come to rest."""
        if not hasattr(self, "driver"):
            return
        self.deploy(frozenset({1, 2}))
        for _ in range(300):
            state = self.driver.state
            assert state is not None
            if not state.status.is_active:
                break
            envelope = self.outstanding()
            if envelope is not None:
                self.reply(envelope, ReplyStatus.COMPLETED)
            else:
                self.next_timer_fires()
        state = self.driver.state
        assert state is not None
        assert state.status in (SagaStatus.COMPLETED, SagaStatus.FAILED, SagaStatus.STUCK)
        self.terminal_states_are_consistent()


SagaMachine.TestCase.settings = settings(
    max_examples=600,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSagaProperties = SagaMachine.TestCase
