"""Heartbeats, dispatch (schedule-to-start) timeouts and step budgets, at every position.

The step under test is first, in the middle or last of ``a b c``; every limit it reaches
leaves it in doubt, so it is compensated with the steps before it, in reverse order.
"""

from __future__ import annotations

import pytest

from contracts.events import EventName
from orchestrator.definition import App, RetryPolicy, Saga, Step
from orchestrator.state import SagaStatus, StepStatus
from orchestrator.testing import SagaHarness, down, hang, late, working
from plumbing.errors import DefinitionError
from tests.unit.driver import command

NAMES = ("a", "b", "c")


def flow(limited: str, **limits: object) -> Saga:
    steps = []
    for name in NAMES:
        options: dict[str, object] = {"timeout": 600}
        if name == limited:
            options.update(limits)
        steps.append(
            Step(
                name,
                service=f"svc_{name}",
                command=command(f"do_{name}"),
                compensation=command(f"undo_{name}"),
                **options,  # type: ignore[arg-type]
            )
        )
    return Saga("flow", steps=steps)


def undone(h: SagaHarness) -> list[str]:
    return [c.step for c in h.commands("s") if c.command.startswith("undo_") and c.attempt == 1]


def before_and_including(name: str) -> list[str]:
    return list(reversed(NAMES[: NAMES.index(name) + 1]))


@pytest.mark.parametrize("name", NAMES)
async def test_heartbeats_keep_a_long_attempt_alive(name: str) -> None:
    async with SagaHarness(App([flow(name, heartbeat_timeout=30)])) as h:
        h.participant(f"svc_{name}").on(f"do_{name}", working(300, beat_every=10))
        await h.start("flow", "s", {})
        await h.advance(seconds=150)
        state = await h.saga("s")
        assert state.step(name).status is StepStatus.RUNNING
        assert state.step(name).heartbeat_at is not None  # visible in saga show
        await h.advance(seconds=200)
        assert (await h.saga("s")).status is SagaStatus.COMPLETED


@pytest.mark.parametrize("name", NAMES)
async def test_a_handler_that_stops_beating_times_out_early_and_is_undone(name: str) -> None:
    async with SagaHarness(App([flow(name, heartbeat_timeout=30)])) as h:
        h.participant(f"svc_{name}").on(f"do_{name}", working(100, beat_every=10, replies=False))
        await h.start("flow", "s", {})
        await h.advance(seconds=125)
        assert (await h.saga("s")).status is SagaStatus.STARTED  # beats until 100 s, +30
        await h.advance(seconds=10)
        state = await h.saga("s")
        assert state.status is SagaStatus.FAILED  # long before the 600 s timeout
        timed_out = [e for e in state.history if e.event is EventName.STEP_TIMED_OUT]
        assert [e.detail for e in timed_out] == ["no heartbeat within 30s"]
        assert undone(h) == before_and_including(name)


@pytest.mark.parametrize("name", NAMES)
async def test_a_command_nobody_picks_up_is_reported_as_such(name: str) -> None:
    async with SagaHarness(App([flow(name, dispatch_timeout=60)])) as h:
        h.participant(f"svc_{name}").on(f"do_{name}", down())
        await h.start("flow", "s", {})
        await h.advance(seconds=61)
        state = await h.saga("s")
        assert state.status is SagaStatus.FAILED
        events = [e.event for e in state.history if e.step == name]
        assert EventName.STEP_NOT_PICKED_UP in events
        assert EventName.STEP_TIMED_OUT not in events
        assert undone(h) == before_and_including(name)  # it may have been taken just then


async def test_the_retry_policy_decides_whether_an_unpicked_command_is_sent_again() -> None:
    retry = RetryPolicy(max_attempts=3, retry_timeouts=True, initial_backoff=1, max_backoff=1)
    async with SagaHarness(App([flow("b", dispatch_timeout=60, retry=retry)])) as h:
        h.participant("svc_b").on("do_b", down(), down(), late(10))
        await h.start("flow", "s", {})
        await h.advance(seconds=200)
        state = await h.saga("s")
        assert state.status is SagaStatus.COMPLETED
        assert [c.attempt for c in h.commands("s") if c.command == "do_b"] == [1, 2, 3]
        picked = [e for e in state.history if e.event is EventName.STEP_NOT_PICKED_UP]
        assert len(picked) == 2


async def test_a_command_picked_up_in_time_gets_its_whole_timeout() -> None:
    async with SagaHarness(App([flow("b", dispatch_timeout=60)])) as h:
        h.participant("svc_b").on("do_b", late(300))  # picked up at once, answers at 300 s
        await h.start("flow", "s", {})
        await h.advance(seconds=400)
        assert (await h.saga("s")).status is SagaStatus.COMPLETED


@pytest.mark.parametrize("name", NAMES)
async def test_a_budget_spent_across_retries_fails_the_step(name: str) -> None:
    retry = RetryPolicy(
        max_attempts=None, retry_timeouts=True, initial_backoff=1, max_backoff=1, jitter=0
    )
    async with SagaHarness(App([flow(name, timeout=30, budget=100, retry=retry)])) as h:
        h.participant(f"svc_{name}").on(f"do_{name}", hang())
        await h.start("flow", "s", {})
        await h.advance(seconds=200)
        state = await h.saga("s")
        assert state.status is SagaStatus.FAILED
        attempts = [c.attempt for c in h.commands("s") if c.command == f"do_{name}"]
        assert attempts == [1, 2, 3, 4]  # 30 s each, a 1 s backoff between: 100 s in all
        assert any(
            "BudgetExhausted" in (e.detail or "") or "budget" in (e.detail or "")
            for e in state.history
        )
        assert state.finished_at is not None
        assert state.finished_at - state.created_at < __import__("datetime").timedelta(seconds=130)
        assert undone(h) == before_and_including(name)


def test_limits_are_checked_when_the_step_is_built() -> None:
    with pytest.raises(DefinitionError, match="shorter than one attempt's timeout"):
        flow("a", timeout=60, budget=30)
    with pytest.raises(DefinitionError, match="would never fire"):
        flow("a", timeout=60, heartbeat_timeout=120)
    with pytest.raises(DefinitionError, match="timers need at least 1s"):
        flow("a", dispatch_timeout=0.5)
