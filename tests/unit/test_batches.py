"""Group commit (:mod:`plumbing.batches`): what arrives during a flush goes in the next one."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plumbing.batches import BatchCut, Batcher


class Writes:
    """A flush that records its batches; each waits for ``release`` while it is held."""

    def __init__(self, *, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()
        self.fail_on = fail_on

    def hold(self) -> None:
        self.release.clear()
        self.started.clear()

    async def __call__(self, items: list[str]) -> list[str]:
        self.batches.append(list(items))
        self.started.set()
        await self.release.wait()
        if self.fail_on in items:
            raise OSError(f"cannot write {self.fail_on}")
        return [item.upper() for item in items]


def by_row(item: str) -> str:
    return item.split(":", maxsplit=1)[0]


async def behind_a_flush(
    writes: Writes, first: str, *others: str
) -> tuple[Batcher[str, str], asyncio.Future[str], list[asyncio.Future[str]]]:
    """``first`` being written (held), and ``others`` submitted meanwhile."""
    batcher: Batcher[str, str] = Batcher(writes, key=by_row)
    writes.hold()
    flushing = asyncio.ensure_future(batcher.submit(first))
    await asyncio.wait_for(writes.started.wait(), 10)
    waiting = [asyncio.ensure_future(batcher.submit(item)) for item in others]
    await asyncio.sleep(0)  # let them queue up behind the flush in flight
    return batcher, flushing, waiting


async def test_a_lone_write_is_flushed_at_once_and_gets_its_own_result() -> None:
    writes = Writes()
    batcher: Batcher[str, str] = Batcher(writes, key=by_row)
    assert await asyncio.wait_for(batcher.submit("a"), 10) == "A"
    assert writes.batches == [["a"]]


async def test_writes_that_arrive_during_a_flush_go_together_in_the_next() -> None:
    writes = Writes()
    _, first, others = await behind_a_flush(writes, "a", "b", "c", "d")
    writes.release.set()
    results = await asyncio.wait_for(asyncio.gather(first, *others), 10)
    assert results == ["A", "B", "C", "D"]
    assert writes.batches == [["a"], ["b", "c", "d"]]


async def test_one_row_is_never_named_twice_in_a_batch() -> None:
    writes = Writes()
    _, first, others = await behind_a_flush(writes, "x:1", "x:2", "y:1", "x:3")
    writes.release.set()
    await asyncio.wait_for(asyncio.gather(first, *others), 10)
    assert writes.batches == [["x:1"], ["x:2", "y:1"], ["x:3"]]


async def test_a_failed_flush_fails_its_batch_only() -> None:
    writes = Writes(fail_on="b")
    batcher, first, failing = await behind_a_flush(writes, "a", "b", "c")
    writes.release.set()
    assert await asyncio.wait_for(first, 10) == "A"
    for task in failing:
        with pytest.raises(OSError, match="cannot write b"):
            await asyncio.wait_for(task, 10)
    assert await asyncio.wait_for(batcher.submit("d"), 10) == "D"


async def test_a_waiter_cancelled_while_waiting_is_left_out() -> None:
    writes = Writes()
    _, first, (quitter, stayer) = await behind_a_flush(writes, "a", "b", "c")
    quitter.cancel()
    writes.release.set()
    assert await asyncio.wait_for(first, 10) == "A"
    assert await asyncio.wait_for(stayer, 10) == "C"
    assert writes.batches == [["a"], ["c"]]


async def test_a_waiter_cancelled_as_it_is_handed_the_turn_passes_it_on() -> None:
    a_written = asyncio.Event()
    batches: list[list[str]] = []
    quitters: list[asyncio.Future[str]] = []

    async def flush(items: list[str]) -> list[str]:
        batches.append(list(items))
        if "a" in items:
            await a_written.wait()
            # Runs after this flush hands the turn to "b", before "b" wakes up to take it.
            asyncio.get_running_loop().call_soon(quitters[0].cancel)
        return [item.upper() for item in items]

    batcher: Batcher[str, str] = Batcher(flush, key=by_row)
    first = asyncio.ensure_future(batcher.submit("a"))
    await asyncio.sleep(0)
    quitters.append(asyncio.ensure_future(batcher.submit("b")))
    stayer = asyncio.ensure_future(batcher.submit("c"))
    await asyncio.sleep(0)
    a_written.set()
    assert await asyncio.wait_for(first, 10) == "A"
    assert await asyncio.wait_for(stayer, 10) == "C"
    with pytest.raises(asyncio.CancelledError):
        await quitters[0]
    assert batches == [["a"], ["c"]]


async def test_a_flush_cut_short_tells_the_others_they_may_be_written() -> None:
    a_written, b_entered, never = asyncio.Event(), asyncio.Event(), asyncio.Event()
    batches: list[list[str]] = []

    async def flush(items: list[str]) -> list[str]:
        batches.append(list(items))
        if "a" in items:
            await a_written.wait()
        if "b" in items:
            b_entered.set()
            await never.wait()  # cut short by its leader's cancellation
        return [item.upper() for item in items]

    batcher: Batcher[str, str] = Batcher(flush, key=by_row)
    first = asyncio.ensure_future(batcher.submit("a"))
    await asyncio.sleep(0)
    leader = asyncio.ensure_future(batcher.submit("b"))
    follower = asyncio.ensure_future(batcher.submit("c"))
    await asyncio.sleep(0)
    a_written.set()
    assert await asyncio.wait_for(first, 10) == "A"
    await asyncio.wait_for(b_entered.wait(), 10)  # "b" leads the flush of b and c
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    with pytest.raises(BatchCut):
        await asyncio.wait_for(follower, 10)
    assert await asyncio.wait_for(batcher.submit("d"), 10) == "D"
    assert batches == [["a"], ["b", "c"], ["d"]]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(["p:1", "p:2", "q:1", "r:1", "r:2", "s:1"]), max_size=30))
def test_every_item_is_written_once_and_answered_with_its_own_result(items: list[str]) -> None:
    async def scenario() -> None:
        writes = Writes()
        batcher: Batcher[str, str] = Batcher(writes, key=by_row, limit=3)
        results = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit(item) for item in items)), 10
        )
        assert results == [item.upper() for item in items]
        written = sorted(item for batch in writes.batches for item in batch)
        assert written == sorted(items)
        for batch in writes.batches:
            assert len(batch) <= 3
            assert len({by_row(item) for item in batch}) == len(batch)

    asyncio.run(scenario())
