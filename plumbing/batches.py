"""Group commit: writes that arrive while one is under way go out together in the next one.

A :class:`Batcher` runs one flush at a time. The caller that finds it idle flushes its own item
at once (nothing waits for a timer, so a quiet process pays no latency); whatever is submitted
meanwhile waits, and when the flush ends the first waiter flushes all of them in one go. Under
load a batch is as large as what arrived during one round trip: the cost of a round trip and a
commit is shared, with no background task and no tuning knob.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_LEAD: Final = object()
"""What a waiter's future holds when it is its turn to flush."""


class BatchCut(Exception):
    """The flush of a batch was cancelled with this item in it: it may or may not be written."""


@dataclass(eq=False)
class _Entry(Generic[T]):
    item: T
    key: Hashable
    future: asyncio.Future[object] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Batcher(Generic[T, R]):
    """Hands items to ``flush`` in batches, one flush at a time.

    Args:
        flush: writes a batch and returns one result per item, in order. An exception fails
            every item of that batch (each caller gets it) and none of the next.
        key: items with the same key never share a batch (one statement must not name one
            row twice); the second waits for the next batch.
        limit: items per batch at most.
    """

    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        key: Callable[[T], Hashable],
        limit: int = 200,
    ) -> None:
        if limit < 1:
            raise ValueError("a batch holds at least one item")
        self._flush = flush
        self._key = key
        self.limit = limit
        self._waiting: list[_Entry[T]] = []
        self._busy = False

    async def submit(self, item: T) -> R:
        """Write ``item`` in the next batch and return its result."""
        entry = _Entry(item, self._key(item))
        self._waiting.append(entry)
        if self._busy:
            try:
                outcome = await entry.future
            except asyncio.CancelledError:
                self._abandon(entry)
                raise
            if outcome is not _LEAD:
                return outcome  # type: ignore[return-value]  # a result of flush, typed R
            entry.future = asyncio.get_running_loop().create_future()
        else:
            self._busy = True
        await self._lead()
        return entry.future.result()  # type: ignore[return-value]  # a result of flush

    async def _lead(self) -> None:
        """Flush one batch (the caller's own item is in it), then pass the turn on."""
        batch = self._take()
        try:
            results = await self._flush([entry.item for entry in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"flush returned {len(results)} results for {len(batch)}")
        except BaseException as e:
            # A cancelled flush may or may not have written: the others learn it as an error.
            failure = e if isinstance(e, Exception) else BatchCut(f"the write was cut: {e!r}")
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(failure)
            raise
        else:
            for entry, result in zip(batch, results, strict=True):
                if not entry.future.done():
                    entry.future.set_result(result)
        finally:
            self._pass_turn()

    def _take(self) -> list[_Entry[T]]:
        """The next batch, in arrival order: at most ``limit`` items, one per key."""
        batch: list[_Entry[T]] = []
        keys: set[Hashable] = set()
        left: list[_Entry[T]] = []
        for entry in self._waiting:
            if len(batch) < self.limit and entry.key not in keys:
                batch.append(entry)
                keys.add(entry.key)
            else:
                left.append(entry)
        self._waiting = left
        return batch

    def _pass_turn(self) -> None:
        """Wake the first waiter to flush the next batch, or go idle."""
        while self._waiting:
            first = self._waiting[0]
            if not first.future.done():
                first.future.set_result(_LEAD)
                return
            self._waiting.pop(0)  # cancelled while waiting: nobody to hand the turn to
        self._busy = False

    def _abandon(self, entry: _Entry[T]) -> None:
        """A waiter was cancelled: drop its item, and pass the turn on if it had it."""
        if entry in self._waiting:
            self._waiting.remove(entry)
        handed = entry.future.done() and not entry.future.cancelled()
        if handed and entry.future.exception() is None and entry.future.result() is _LEAD:
            self._pass_turn()
