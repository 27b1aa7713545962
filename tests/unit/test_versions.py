"""Definitions that change while sagas are in flight: every saga ends on the version it started.

v1 is ``a b c d``. Each scenario deploys a v2 (a step removed, one inserted in the middle, one
appended) while a v1 saga waits on a step (or on a compensation). With both versions loaded
the v1 saga finishes exactly as v1 says; with only v2 loaded it is held, visibly, keeping its
reply, and finishes once v1 is back.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from orchestrator.definition import App, Saga, Step
from orchestrator.state import SagaStatus
from orchestrator.testing import SagaHarness, fail, late, succeed
from plumbing.errors import ActionRefused, DefinitionError
from tests.unit.driver import command

SLOW = 60.0  # seconds the awaited reply takes; step timeouts are far longer
V1 = ("a", "b", "c", "d")
VARIANTS = {
    "removed": ("a", "b", "c"),
    "inserted": ("a", "b", "x", "c", "d"),
    "appended": ("a", "b", "c", "d", "e"),
}


def definition(names: tuple[str, ...], version: int) -> Saga:
    """A saga of compensatable steps ``names``: commands ``do_<n>``, compensations ``undo_<n>``."""
    return Saga(
        "flow",
        steps=[
            Step(
                name,
                service=f"svc_{name}",
                command=command(f"do_{name}"),
                compensation=command(f"undo_{name}"),
                timeout=20 * SLOW,
            )
            for name in names
        ],
        version=version,
    )


V1_SAGA = definition(V1, 1)


@dataclass(frozen=True)
class Waiting:
    """Where the v1 saga waits when v2 is deployed: a forward step, or a compensation."""

    index: int
    compensating: bool

    def script(self, h: SagaHarness) -> None:
        name = V1[self.index]
        if not self.compensating:
            h.participant(f"svc_{name}").on(f"do_{name}", late(SLOW))
            return
        # Step ``index`` fails, so the compensation of the step before it is awaited.
        h.participant(f"svc_{name}").on(f"do_{name}", fail("refused"))
        before = V1[self.index - 1]
        h.participant(f"svc_{before}").on(f"undo_{before}", late(SLOW))

    @property
    def expected(self) -> list[str]:
        """The commands v1 sends for this saga, in order."""
        if not self.compensating:
            return [f"do_{name}" for name in V1]
        done = V1[: self.index]
        return [f"do_{name}" for name in V1[: self.index + 1]] + [
            f"undo_{name}" for name in reversed(done)
        ]

    @property
    def status(self) -> SagaStatus:
        return SagaStatus.FAILED if self.compensating else SagaStatus.COMPLETED


POSITIONS = [Waiting(i, False) for i in range(len(V1))] + [
    Waiting(i, True) for i in range(1, len(V1))
]


def ids(position: Waiting) -> str:
    return f"{'undo' if position.compensating else 'at'}-{V1[position.index]}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("position", POSITIONS, ids=ids)
async def test_with_both_versions_loaded_a_v1_saga_ends_as_v1_says(
    variant: str, position: Waiting
) -> None:
    v2 = definition(VARIANTS[variant], 2)
    async with SagaHarness(App([V1_SAGA])) as h:
        position.script(h)
        await h.start("flow", "old", {})
        await h.deploy(App([V1_SAGA, v2]))
        await h.start("flow", "new", {})
        await h.advance(seconds=2 * SLOW)
        old = await h.saga("old")
        assert old.status is position.status
        assert h.command_names("old") == position.expected
        assert old.definition_version == 1
        new = await h.saga("new")  # scripted like the old one, so it may fail the same way
        assert new.definition_version == 2
        assert [step.name for step in new.steps] == list(VARIANTS[variant])
        assert not new.status.is_active
        assert h.parked == []


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("position", POSITIONS, ids=ids)
async def test_with_only_v2_loaded_a_v1_saga_waits_visibly_then_finishes_on_v1(
    variant: str, position: Waiting
) -> None:
    v2 = definition(VARIANTS[variant], 2)
    async with SagaHarness(App([V1_SAGA])) as h:
        position.script(h)
        await h.start("flow", "old", {})
        sent_before = h.command_names("old")
        await h.deploy(App([v2]))
        await h.advance(seconds=2 * SLOW)  # the awaited reply arrives while v1 is missing
        await h.sweep()
        record = await h.record("old")
        assert record.hold is not None
        assert record.hold.waiting_for is not None
        assert record.hold.waiting_for.startswith("flow:1:")
        assert "no definition flow v1" in record.hold.reason
        assert len(record.state.inbox) == 1  # the reply is kept, not parked
        assert h.command_names("old") == sent_before  # nothing moved
        assert h.parked == []
        with pytest.raises(ActionRefused, match="is held"):
            await h.abort("old")

        await h.deploy(App([V1_SAGA, v2]))
        await h.sweep()  # the daemon that has v1 resumes it
        record = await h.record("old")
        assert record.hold is None
        assert record.state.inbox == ()
        await h.advance(seconds=2 * SLOW)
        assert (await h.saga("old")).status is position.status
        assert h.command_names("old") == position.expected


async def test_a_definition_edited_in_place_is_detected_by_its_fingerprint() -> None:
    edited = definition(("a", "b", "x", "d"), 1)  # same version, other steps
    assert edited.fingerprint != V1_SAGA.fingerprint
    async with SagaHarness(App([V1_SAGA])) as h:
        Waiting(1, False).script(h)
        await h.start("flow", "old", {})
        await h.deploy(App([edited]))
        await h.advance(seconds=2 * SLOW)
        record = await h.record("old")
        assert record.hold is not None
        assert "changed in place" in record.hold.reason
        assert h.command_names("old") == ["do_a", "do_b"]


async def test_timeouts_and_retry_policies_do_not_change_the_fingerprint() -> None:
    tuned = App([V1_SAGA]).with_step_timeouts({"flow.b": 5})
    assert tuned.version("flow", 1) is not None
    assert tuned["flow"].fingerprint == V1_SAGA.fingerprint


async def test_an_operator_moves_a_held_saga_to_a_compatible_version() -> None:
    v2 = definition(VARIANTS["appended"], 2)
    async with SagaHarness(App([V1_SAGA])) as h:
        Waiting(1, False).script(h)
        await h.start("flow", "old", {})
        await h.deploy(App([v2]))
        await h.advance(seconds=2 * SLOW)
        assert (await h.record("old")).hold is not None
        state = await h.resume("old", to_version=2)
        assert state.definition_version == 2
        await h.advance(seconds=2 * SLOW)
        assert (await h.saga("old")).status is SagaStatus.COMPLETED
        assert h.command_names("old") == [f"do_{name}" for name in VARIANTS["appended"]]


async def test_a_migration_that_would_skip_a_step_is_refused() -> None:
    v2 = definition(VARIANTS["inserted"], 2)  # x comes before c
    async with SagaHarness(App([V1_SAGA])) as h:
        Waiting(2, False).script(h)  # the saga has started a, b and c
        await h.start("flow", "old", {})
        await h.deploy(App([v2]))
        with pytest.raises(ActionRefused, match="must be the first steps of v2"):
            await h.resume("old", to_version=2)


async def test_new_sagas_take_the_newest_version_or_the_one_asked_for() -> None:
    v2 = definition(VARIANTS["appended"], 2)
    async with SagaHarness(App([V1_SAGA, v2])) as h:
        assert (await h.start("flow", "newest", {})).definition_version == 2
        assert (await h.start("flow", "pinned", {}, version=1)).definition_version == 1
        assert h.command_names("pinned") == [f"do_{name}" for name in V1]


def test_two_definitions_of_one_version_are_refused() -> None:
    with pytest.raises(DefinitionError, match="next version number"):
        App([V1_SAGA, definition(("a", "b"), 1)])


async def test_the_saga_deadline_fires_on_its_own_timer_without_a_sweep() -> None:
    saga = Saga(
        "flow",
        steps=[
            Step(
                name,
                service=f"svc_{name}",
                command=command(f"do_{name}"),
                compensation=command(f"undo_{name}"),
                timeout=3600,
            )
            for name in V1
        ],
        deadline=600,
    )
    async with SagaHarness(App([saga])) as h:
        h.participant("svc_b").on("do_b", late(3000))
        await h.start("flow", "late", {})
        await h.advance(seconds=601)  # no sweep: the deadline's own timer fires
        state = await h.saga("late")
        assert state.status is SagaStatus.FAILED
        assert "deadline" in (state.failure_reason or "")
        assert h.command_names("late") == ["do_a", "do_b", "undo_b", "undo_a"]


async def test_succeed_is_the_default_script() -> None:
    async with SagaHarness(App([V1_SAGA])) as h:
        h.participant("svc_a").on("do_a", succeed())
        assert (await h.start("flow", "ok", {})).status is SagaStatus.COMPLETED
