"""Publishing what decisions append to sagas' outboxes, at a few round trips per transition.

The plain way costs a separate store write per transition to mark its messages published,
one publisher confirm awaited after another, and a trip through the delay ladder for every
step timeout, although most steps answer long before their timeout. :class:`OutboxPublisher`
keeps every guarantee (state and outbox commit together; every message is published at
least once, by this process or by the outbox relay after its grace period) and spends less:

* **Confirms are pipelined**: a transition's messages are published together and their
  confirms awaited together.
* **Marking is folded or batched**: the ids published for a saga are dropped from its stored
  outbox by the saga's next transition (part of the same write), or, if none comes soon, by
  one batched write for many sagas.
* **Timers are held back**: a timer is kept in this process (it is in the stored outbox
  already) for ``timer_hold`` seconds, or until it is due. If the saga moves on meanwhile and
  no longer waits for it, the next transition drops it and it is never published; otherwise it
  is published as a delayed message. A crash loses nothing: the relay publishes a held timer
  after its grace period, and the store sweep fires whatever is due.

Holding and batching happen only while :meth:`run` runs (the daemon); elsewhere (the CLI, the
test harness) every message is published and marked at once.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog
from pydantic import ValidationError

from contracts.messages import TimerMessage
from orchestrator.engine import pending_due
from orchestrator.state import SagaState
from orchestrator.store import SagaRecord, SagaStore
from plumbing.clock import Clock
from plumbing.errors import BrokerError, PublishFailed, StoreUnavailable
from plumbing.transport import MessageKind, Outgoing, Transport

log = structlog.get_logger("outbox")

_RELEASE_BATCH = 256  # sagas whose held timers are published at once


@dataclass
class Drops:
    """What a saga's next save removes from its stored outbox, and how to undo the taking."""

    ids: set[str] = field(default_factory=set)
    timers: dict[str, tuple[Outgoing, TimerMessage]] = field(default_factory=dict)


class OutboxPublisher:
    """Publishes outbox entries for the orchestrator; see the module docstring.

    Args:
        timer_hold: seconds a timer is held back before it is published (0: never held).
            Keep it below the relay's grace, so that the relay does not publish it first.
        mark_delay: seconds published ids wait for the saga's next transition before they
            are marked by a batched write.
        on_published: called with each message published (for metrics).
    """

    def __init__(
        self,
        store: SagaStore,
        transport: Transport,
        clock: Clock,
        *,
        timer_hold: float = 2.0,
        mark_delay: float = 0.2,
        on_published: Callable[[Outgoing], None] | None = None,
    ) -> None:
        self.store = store
        self.transport = transport
        self.clock = clock
        self.timer_hold = timer_hold
        self.mark_delay = mark_delay
        self.on_published = on_published
        self.running = False
        self._unmarked: dict[str, set[str]] = {}
        self._held: dict[str, dict[str, tuple[Outgoing, TimerMessage]]] = {}
        self._releases: list[tuple[datetime, str, str]] = []

    # --- publishing -------------------------------------------------------------------------

    async def publish(
        self, record: SagaRecord, wanted: Callable[[Outgoing], bool] = lambda _: True
    ) -> int:
        """Publish the ``wanted`` entries of a record's outbox (timers may be held back).

        A failed publish is left in the outbox for the relay; returns how many went out.
        """
        now = self.clock.now()
        ready = []
        for entry in record.outbox:
            if not wanted(entry):
                continue
            release = self._release_at(entry, now)
            if release is None:
                ready.append(entry)
            else:
                self._hold(record.saga_id, entry, release)
        return await self._send(record.saga_id, ready)

    def _release_at(self, entry: Outgoing, now: datetime) -> datetime | None:
        """When a timer held back now is to be published; None to publish it now."""
        if not self.running or self.timer_hold <= 0 or entry.kind is not MessageKind.TIMER:
            return None
        release = entry.created_at + timedelta(seconds=self.timer_hold)
        if entry.deliver_at is not None:
            release = min(release, entry.deliver_at)
        return release if release > now else None

    def _hold(self, saga_id: str, entry: Outgoing, release: datetime) -> None:
        try:
            timer = TimerMessage.model_validate_json(entry.body)
        except ValidationError:
            log.warning("timer_unreadable", saga_id=saga_id, message_id=entry.message_id)
            return  # left in the outbox: the relay publishes it
        self._held.setdefault(saga_id, {})[entry.message_id] = (entry, timer)
        heapq.heappush(self._releases, (release, saga_id, entry.message_id))

    async def _send(self, saga_id: str, entries: list[Outgoing]) -> int:
        """Publish together, confirms awaited together; mark what went out."""
        if not entries:
            return 0
        results = await asyncio.gather(
            *(self.transport.publish(entry) for entry in entries), return_exceptions=True
        )
        done = []
        for entry, result in zip(entries, results, strict=True):
            if isinstance(result, PublishFailed):
                log.warning(
                    "outbox_publish_failed",
                    saga_id=saga_id,
                    message_id=entry.message_id,
                    error=str(result),
                )
            elif isinstance(result, BaseException):
                raise result
            else:
                done.append(entry.message_id)
                if self.on_published is not None:
                    self.on_published(entry)
        await self._mark(saga_id, done)
        return len(done)

    async def _mark(self, saga_id: str, message_ids: Collection[str]) -> None:
        if not message_ids:
            return
        if not self.running:
            await self.store.mark_published(saga_id, message_ids)
            return
        self._unmarked.setdefault(saga_id, set()).update(message_ids)

    # --- what the next save drops ------------------------------------------------------------

    def drops(self, saga_id: str, state: SagaState) -> Drops:
        """Take what the saga's next save, to ``state``, removes from its stored outbox: ids
        published and not marked yet, and held timers ``state`` no longer waits for."""
        taken = Drops(self._unmarked.pop(saga_id, set()))
        held = self._held.get(saga_id, {})
        for message_id, (_, timer) in list(held.items()):
            if pending_due(state, timer) is None:
                taken.timers[message_id] = held.pop(message_id)
                taken.ids.add(message_id)
        if not held:
            self._held.pop(saga_id, None)
        return taken

    def restore(self, saga_id: str, taken: Drops) -> None:
        """Give back what :meth:`drops` took when the save did not happen."""
        published = taken.ids - taken.timers.keys()
        if published:
            self._unmarked.setdefault(saga_id, set()).update(published)
        if taken.timers:
            self._held.setdefault(saga_id, {}).update(taken.timers)

    # --- background work ---------------------------------------------------------------------

    async def run(self, *, poll: float = 0.25) -> None:
        """Hold timers and batch marks until cancelled; then publish and mark what is left."""
        self.running = True
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._release_loop(poll))
                group.create_task(self._mark_loop())
        finally:
            self.running = False

    async def drain(self) -> None:
        """Publish every held timer and mark everything published (at shutdown)."""
        held = [
            (saga_id, message_id)
            for saga_id, entries in self._held.items()
            for message_id in entries
        ]
        await self._release(held)
        await self._flush_marks()

    async def _release_loop(self, poll: float) -> None:
        while True:
            now = self.clock.now()
            due = []
            while self._releases and self._releases[0][0] <= now:
                _, saga_id, message_id = heapq.heappop(self._releases)
                due.append((saga_id, message_id))
            try:
                await self._release(due)
            except (StoreUnavailable, BrokerError) as e:
                log.warning("held_timers_not_published", error=str(e))
            await self.clock.sleep(poll)

    async def _release(self, due: Iterable[tuple[str, str]]) -> None:
        by_saga: dict[str, list[Outgoing]] = {}
        for saga_id, message_id in due:
            held = self._held.get(saga_id, {})
            found = held.pop(message_id, None)
            if not held:
                self._held.pop(saga_id, None)
            if found is not None:  # dropped meanwhile: the saga no longer waits for it
                by_saga.setdefault(saga_id, []).append(found[0])
        # Sagas' timers go out together, their confirms awaited together: one after another,
        # a publisher falls behind as soon as timers come due faster than a confirm returns
        # (many sagas waiting on slow steps), and the held ones pile up in memory.
        sagas = list(by_saga.items())
        for start in range(0, len(sagas), _RELEASE_BATCH):
            chunk = sagas[start : start + _RELEASE_BATCH]
            await asyncio.gather(*(self._send(saga_id, entries) for saga_id, entries in chunk))

    async def _mark_loop(self) -> None:
        while True:
            # A little patience: most sagas write again within it and take their ids along.
            # (A poll on the clock, not an event: the test harness's virtual time needs every
            # background task to wait on the clock.)
            await self.clock.sleep(self.mark_delay)
            try:
                await self._flush_marks()
            except StoreUnavailable as e:
                log.warning("outbox_marks_deferred", error=str(e))

    async def _flush_marks(self) -> None:
        batch, self._unmarked = self._unmarked, {}
        if not batch:
            return
        try:
            await self.store.mark_published_many(batch)
        except BaseException:
            for saga_id, ids in batch.items():
                self._unmarked.setdefault(saga_id, set()).update(ids)
            raise
