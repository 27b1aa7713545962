"""The participant SDK's side of dispatch and heartbeat timeouts: real ``Participant`` handlers
acknowledge pick-ups, send coalesced heartbeats, and refuse a command picked up too late."""

from __future__ import annotations

from datetime import timedelta

from contracts.events import EventName
from contracts.messages import (
    Command,
    CommandEnvelope,
    Direction,
    Heartbeat,
    PickedUp,
    ReplyStatus,
)
from orchestrator.definition import App, RetryPolicy, Saga, Step
from orchestrator.state import SagaStatus, StepStatus
from orchestrator.testing import SagaHarness, VirtualClock
from participants import CommandContext, NoReply, Participant
from participants.progress import Beats
from tests.unit.driver import T0


class CopyFiles(Command):
    """Copy ``files`` files, one every ``seconds_each``, with a heartbeat call per file; with
    ``stalls_after``, the handler goes silent after that many files and never answers."""

    files: int
    seconds_each: float = 5.0
    stalls_after: int | None = None


class DeleteCopies(Command):
    """Undo a copy."""


def app(*, dispatch_timeout: float | None = None, heartbeat_timeout: float | None = None) -> App:
    step = Step(
        "copy",
        service="files",
        command=CopyFiles,
        compensation=DeleteCopies,
        timeout=600,
        retry=RetryPolicy(max_attempts=1),
        dispatch_timeout=dispatch_timeout,
        heartbeat_timeout=heartbeat_timeout,
    )
    return App([Saga("backup", steps=[step])])


def files_service() -> tuple[Participant, list[str]]:
    """The service, and what its handlers did, in order."""
    files = Participant("files")
    done: list[str] = []

    @files.handler
    async def copy_files(cmd: CopyFiles, ctx: CommandContext) -> dict[str, int]:
        for n in range(cmd.files):
            if n == cmd.stalls_after:
                # Stands for a handler wedged on something: no more heartbeats, no reply.
                # (A handler really wedged would also hold the saga's lock in this process,
                # which the harness's virtual clock cannot tell from work.)
                raise NoReply
            await ctx.heartbeat(f"copied {n} of {cmd.files}")
            await ctx.sleep(cmd.seconds_each)
        done.append(f"copy {cmd.files}")
        return {"copied": cmd.files}

    @files.handler
    async def delete_copies(cmd: DeleteCopies) -> None:
        done.append("delete")

    return files, done


def heartbeats(h: SagaHarness) -> list[Heartbeat]:
    replies = h.published("reply")
    return [
        Heartbeat.model_validate_json(m.body)
        for m in replies
        if m.message_id.startswith("heartbeat:")
    ]


async def test_a_real_handler_acknowledges_the_pickup_so_it_gets_its_whole_timeout() -> None:
    files, done = files_service()
    async with SagaHarness(app(dispatch_timeout=60)).mount(files) as h:
        await h.start("backup", "b-1", {"files": 24})  # 24 x 5 s = 120 s, past pickup_by
        await h.advance(seconds=30)
        assert (await h.saga("b-1")).step("copy").picked_up_at is not None
        await h.advance(seconds=200)
        state = await h.saga("b-1")
        assert state.status is SagaStatus.COMPLETED
        assert EventName.STEP_NOT_PICKED_UP not in {e.event for e in state.history}
        assert done == ["copy 24"]


async def test_heartbeats_keep_a_long_handler_alive_and_are_coalesced() -> None:
    files, done = files_service()
    async with SagaHarness(app(heartbeat_timeout=30)).mount(files) as h:
        # 100 files, 1 s each, a heartbeat call per file: one heartbeat sent per 10 s.
        await h.start("backup", "b-1", {"files": 100, "seconds_each": 1})
        await h.advance(seconds=55)
        step = (await h.saga("b-1")).step("copy")
        assert step.status is StepStatus.RUNNING
        assert step.heartbeat == "copied 50 of 100"  # what saga show prints
        (shown,) = (await h.record("b-1")).summary()["steps"]  # saga show --json, the API
        assert shown["heartbeat"] == "copied 50 of 100"
        assert shown["heartbeat_at"] is not None
        await h.advance(seconds=100)
        assert (await h.saga("b-1")).status is SagaStatus.COMPLETED
    sent = heartbeats(h)
    assert len(sent) == 10  # at 0, 10, ..., 90 s: not 100
    assert [b.details for b in sent][:2] == ["copied 0 of 100", "copied 10 of 100"]
    assert done == ["copy 100"]


async def test_a_handler_that_stops_beating_times_out_early_and_is_compensated() -> None:
    files, done = files_service()
    async with SagaHarness(app(heartbeat_timeout=30)).mount(files) as h:
        # Beats for the first 20 files (the last heartbeat at 90 s), then goes silent.
        await h.start("backup", "b-1", {"files": 100, "stalls_after": 20})
        await h.advance(seconds=115)
        assert (await h.saga("b-1")).status is SagaStatus.STARTED
        await h.advance(seconds=10)
        state = await h.saga("b-1")
        assert state.status is SagaStatus.FAILED  # long before the 600 s timeout
        timed_out = [e.detail for e in state.history if e.event is EventName.STEP_TIMED_OUT]
        assert timed_out == ["no heartbeat within 30s"]
    assert done == ["delete"]  # in doubt, so compensated


async def test_a_step_without_a_heartbeat_timeout_sends_no_heartbeats() -> None:
    files, _ = files_service()
    async with SagaHarness(app()).mount(files) as h:
        await h.start("backup", "b-1", {"files": 10})
        await h.advance(seconds=60)
        assert (await h.saga("b-1")).status is SagaStatus.COMPLETED
    assert heartbeats(h) == []
    assert not [m for m in h.published("reply") if m.message_id.startswith("picked_up:")]


def envelope(**fields: object) -> CommandEnvelope:
    values: dict[str, object] = {
        "message_id": "b-1:copy:1",
        "saga_id": "b-1",
        "saga_type": "backup",
        "step": "copy",
        "command": "copy_files",
        "direction": Direction.FORWARD,
        "attempt": 1,
        "idempotency_key": "b-1:copy",
        "payload": {"files": 1, "seconds_each": 0},
        "reply_to": "saga.replies",
        "sent_at": T0,
    }
    values.update(fields)
    return CommandEnvelope.model_validate(values)


async def test_a_command_picked_up_after_its_pickup_deadline_is_refused_not_executed() -> None:
    files, done = files_service()
    clock = VirtualClock(T0 + timedelta(seconds=61))
    sent: list[PickedUp | Heartbeat] = []

    async def progress(message: PickedUp | Heartbeat) -> None:
        sent.append(message)

    reply = await files.handle(envelope(pickup_by=T0 + timedelta(seconds=60)), clock, progress)
    assert reply is not None
    assert reply.status is ReplyStatus.ERROR
    assert reply.error is not None
    assert reply.error.type == "PickupExpired"
    assert done == []
    assert sent == []  # no pick-up acknowledged after the deadline
    # An attempt that did run answers from the store, however late its redelivery.
    clock = VirtualClock(T0 + timedelta(seconds=30))
    again = envelope(message_id="b-1:copy:2", attempt=2, pickup_by=T0 + timedelta(seconds=60))
    first = await files.handle(again, clock, progress)
    assert first is not None
    assert first.status is ReplyStatus.COMPLETED
    late = VirtualClock(T0 + timedelta(seconds=600))
    redelivered = await files.handle(again, late, progress)
    assert redelivered is not None
    assert redelivered.status is ReplyStatus.COMPLETED
    assert done == ["copy 1"]
    assert [type(m).__name__ for m in sent] == ["PickedUp"]


async def test_heartbeats_are_coalesced_to_a_third_of_the_timeout() -> None:
    clock = VirtualClock(T0)
    sent: list[Heartbeat] = []

    async def sink(message: PickedUp | Heartbeat) -> None:
        assert isinstance(message, Heartbeat)
        sent.append(message)

    beats = Beats(envelope(heartbeat_timeout=30), clock, sink)
    for second in range(61):
        await beats.beat(f"at {second}")
        clock.set(clock.now() + timedelta(seconds=1))
    assert [m.details for m in sent] == [f"at {s}" for s in range(0, 61, 10)]
    assert len({m.message_id for m in sent}) == len(sent)  # each one its own message
