"""Parallel groups: members dispatched together, joined when all complete; when one fails or
times out, the others are waited for and everything that acted is undone, groups in strict
reverse order and, within a group, one member at a time in reverse declaration order."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest

from contracts.schema import EXAMPLE_CONTRACTS, asyncapi_document
from orchestrator.definition import App, Parallel, Saga, Step, StepKind
from orchestrator.demo import render_timeline, steps_line
from orchestrator.state import SagaStatus, StepStatus
from orchestrator.testing import SagaHarness, error, fail, hang, late
from plumbing.errors import DefinitionError
from tests.unit.driver import command

TIMEOUT = 60.0


def step(name: str, **options: object) -> Step:
    return Step(
        name,
        service=f"svc_{name}",
        command=command(f"do_{name}"),
        compensation=command(f"undo_{name}"),
        timeout=TIMEOUT,
        **options,  # type: ignore[arg-type]
    )


def saga(layout: str) -> Saga:
    """``a (b c) d`` -> a, then b and c together, then d."""
    items: list[Step | Parallel] = []
    group: list[Step] | None = None
    for token in layout.replace("(", " ( ").replace(")", " ) ").split():
        if token == "(":
            group = []
        elif token == ")":
            assert group is not None
            items.append(Parallel(*group))
            group = None
        elif group is not None:
            group.append(step(token))
        else:
            items.append(step(token))
    return Saga("flow", steps=items)


def forwards(h: SagaHarness) -> list[str]:
    return [c.step for c in h.commands("s") if c.command.startswith("do_")]


def undos(h: SagaHarness) -> list[str]:
    return [c.step for c in h.commands("s") if c.command.startswith("undo_") and c.attempt == 1]


LAYOUTS = ["(a b) c d", "a (b c) d", "a b (c d)", "a (b c d) e"]


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_a_group_runs_together_and_the_saga_completes(layout: str) -> None:
    definition = saga(layout)
    async with SagaHarness(App([definition])) as h:
        for name in ("b", "c"):
            h.participant(f"svc_{name}").on(f"do_{name}", late(5))
        state = await h.start("flow", "s", {})
        await h.advance(seconds=30)
        state = await h.saga("s")
        assert state.status is SagaStatus.COMPLETED
        assert sorted(forwards(h)) == sorted(s.name for s in definition.steps)
        # Every member of a stage was sent before any step of the next one.
        order = forwards(h)
        for later, earlier in zip(definition.stage_of[1:], definition.stage_of, strict=False):
            assert later >= earlier
        for stage in definition.stages:
            names = {definition.steps[i].name for i in stage}
            positions = [order.index(name) for name in names]
            assert max(positions) - min(positions) == len(names) - 1


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("how", ["fail", "timeout"])
async def test_a_member_that_fails_undoes_its_siblings_and_every_earlier_stage(
    layout: str, how: str
) -> None:
    definition = saga(layout)
    for stage in definition.stages:
        if len(stage) < 2:
            continue
        for index in stage:
            member = definition.steps[index].name
            async with SagaHarness(App([definition])) as h:
                # The others answer late, so the failure comes while they are running.
                for other in stage:
                    name = definition.steps[other].name
                    if name != member:
                        h.participant(f"svc_{name}").on(f"do_{name}", late(10))
                if how == "fail":
                    h.participant(f"svc_{member}").on(f"do_{member}", fail("no"))
                else:
                    h.participant(f"svc_{member}").on(f"do_{member}", hang())
                await h.start("flow", "s", {})
                await h.advance(seconds=5 * TIMEOUT)
                state = await h.saga("s")
                assert state.status is SagaStatus.FAILED, (layout, member, how)
                before = {definition.steps[i].name for i in range(stage[0])}
                siblings = {definition.steps[i].name for i in stage} - {member}
                acted = before | siblings | ({member} if how == "timeout" else set())
                expected = [s.name for s in reversed(definition.steps) if s.name in acted]
                assert undos(h) == expected, (layout, member, how)
                # Nothing after the group was ever started.
                after = {
                    definition.steps[i].name for i in range(stage[-1] + 1, len(definition.steps))
                }
                assert not after & set(forwards(h))


async def test_no_compensation_is_sent_while_a_member_is_still_running() -> None:
    async with SagaHarness(App([saga("a (b c) d")])) as h:
        h.participant("svc_b").on("do_b", fail("no"))
        h.participant("svc_c").on("do_c", late(30))
        await h.start("flow", "s", {})
        state = await h.saga("s")
        assert state.status is SagaStatus.COMPENSATING
        assert state.step("c").status is StepStatus.RUNNING
        assert undos(h) == []  # c has not answered yet
        await h.advance(seconds=31)
        assert undos(h) == ["c", "a"]
        assert (await h.saga("s")).status is SagaStatus.FAILED


async def test_a_member_waiting_to_retry_is_not_retried_once_a_sibling_failed() -> None:
    async with SagaHarness(App([saga("(a b) c")])) as h:
        h.participant("svc_a").on("do_a", error("transient"))
        h.participant("svc_b").on("do_b", late(30, None))
        await h.start("flow", "s", {})
        assert (await h.saga("s")).step("a").status is StepStatus.RETRY_SCHEDULED
        h.participant("svc_b").on("do_b", fail("no"))
        await h.abort("s", "changed my mind")
        await h.advance(seconds=120)
        state = await h.saga("s")
        assert state.status is SagaStatus.FAILED
        assert [c.attempt for c in h.commands("s") if c.command == "do_a"] == [1]
        # b was running when aborted: it may have acted, so it is undone; a never succeeded.
        assert undos(h) == ["b"]


async def test_group_members_see_earlier_results_not_each_others() -> None:
    async with SagaHarness(App([saga("a (b c)")])) as h:
        await h.start("flow", "s", {})
        assert (await h.saga("s")).status is SagaStatus.COMPLETED


def test_groups_are_validated_when_built() -> None:
    with pytest.raises(DefinitionError, match="at least two steps"):
        Parallel(step("a"))
    pivot = Step("p", service="svc_p", command=command("do_p"), kind=StepKind.PIVOT)
    with pytest.raises(DefinitionError, match="all compensatable or all retriable"):
        Parallel(step("a"), pivot)
    retriable = Step("r", service="svc_r", command=command("do_r"), kind=StepKind.RETRIABLE)
    with pytest.raises(DefinitionError, match="all compensatable or all retriable"):
        Parallel(step("a"), retriable)
    with pytest.raises(DefinitionError, match="two groups named"):
        Saga(
            "x",
            steps=[
                Parallel(step("a"), step("b"), name="g"),
                Parallel(step("c"), step("d"), name="g"),
            ],
        )


def test_groups_change_the_fingerprint() -> None:
    assert saga("a (b c) d").fingerprint != saga("a b c d").fingerprint
    assert saga("a (b c) d").stages == ((0,), (1, 2), (3,))


async def test_the_timeline_and_saga_show_mark_a_groups_members() -> None:
    async with SagaHarness(App([saga("a (b c) d")])) as h:
        h.participant("svc_c").on("do_c", hang())
        await h.start("flow", "s", {})
        state = await h.saga("s")
    assert [step.group for step in state.steps] == [None, "b+c", "b+c", None]
    assert steps_line(state) == "a=completed  [b=completed + c=running]  d=not_started"
    assert [step["group"] for step in state.summary()["steps"]] == [None, "b+c", "b+c", None]
    out = io.StringIO()
    render_timeline(state, out)
    assert "[b=completed + c=running]" in out.getvalue()


def test_the_asyncapi_export_lists_each_sagas_stages_with_its_groups() -> None:
    definition = saga("a (b c) d")
    flows = {"flow.v1": definition.flow()}
    document = asyncapi_document(app=replace(EXAMPLE_CONTRACTS, sagas=flows))
    stages = document["x-sagas"]["flow.v1"]["stages"]
    assert [[s["name"] for s in stage["steps"]] for stage in stages] == [["a"], ["b", "c"], ["d"]]
    assert [stage.get("parallel") for stage in stages] == [None, "b+c", None]
    assert stages[1]["steps"][0] == {
        "name": "b",
        "kind": "compensatable",
        "service": "svc_b",
        "command": "do_b",
        "compensation": "undo_b",
    }
