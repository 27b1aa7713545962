"""The orchestrator: the small I/O shell around the pure core.

For every message: load the saga, ``decide``, save state and outbox in one compare-and-set,
publish the outbox with publisher confirms, mark it published, then settle the message. A lost
version race reloads and decides again. A failed publish is not an error for the message: the
state is committed and the outbox relay publishes the rest later.

Background work runs in one TaskGroup: the consumers, the sweep that fires overdue timeouts
from the store (the truth behind every timer), the outbox relay that re-publishes messages a
crash left behind, the retention purge and the store-backed gauges.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import structlog

from contracts import names
from contracts.events import EventName
from contracts.messages import Reply, StartSaga, TimerMessage
from orchestrator.definition import App
from orchestrator.effects import PublishEvent, outgoing
from orchestrator.engine import (
    HISTORY_LIMIT,
    Decision,
    Event,
    OperatorAbort,
    OperatorResolve,
    OperatorRetry,
    Outcome,
    ReplyReceived,
    Wakeup,
    decide,
    start_saga,
)
from orchestrator.metrics import Metrics
from orchestrator.state import SagaState
from orchestrator.store import SagaRecord, SagaStore
from plumbing import tracing
from plumbing.clock import Clock, SystemClock
from plumbing.codec import decode
from plumbing.errors import (
    BrokerError,
    ConcurrencyExhausted,
    InvalidSagaData,
    MessageRejected,
    PublishFailed,
    SagaConflict,
    SagaNotFound,
    StoreUnavailable,
    UnknownSagaType,
)
from plumbing.topology import QueuePolicy, Topology, orchestrator_topology
from plumbing.transport import DeadLetter, Delivery, Disposition, Outgoing, Transport

log = structlog.get_logger("orchestrator")

OperatorAction = OperatorRetry | OperatorAbort | OperatorResolve
"""What an operator can do to a saga."""


class Handled(StrEnum):
    """What the shell did with a message besides applying it (an engine :class:`Outcome`).

    Both are the ``outcome`` label of ``saga_messages_total``.
    """

    STARTED = "started"
    SAGA_NOT_FOUND = "saga_not_found"
    REQUEUED = "requeued"
    DEAD_LETTERED = "dead_lettered"


@dataclass(frozen=True)
class EngineConfig:
    """Tuning of the orchestrator's loops; every interval is in seconds."""

    sweep_interval: float = 5.0
    sweep_batch: int = 500
    relay_interval: float = 5.0
    outbox_grace: float = 10.0
    purge_interval: float = 300.0
    gauge_interval: float = 15.0
    conflict_retries: int = 25
    store_retry_delay: float = 1.0
    store_retry_max: float = 30.0
    history_limit: int = HISTORY_LIMIT
    published_events: frozenset[EventName] | None = None
    """Lifecycle events to publish to observers; ``None`` publishes every one."""
    queue_policy: QueuePolicy = field(default_factory=QueuePolicy)


class Orchestrator:
    """Runs the saga types of an :class:`App` over a store and a transport."""

    def __init__(
        self,
        app: App,
        store: SagaStore,
        transport: Transport,
        *,
        clock: Clock | None = None,
        config: EngineConfig | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.app = app
        self.store = store
        self.transport = transport
        self.clock: Clock = clock or SystemClock()
        self.config = config or EngineConfig()
        self.metrics = metrics
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()

    @property
    def topology(self) -> Topology:
        """Exchanges, queues and bindings this orchestrator needs."""
        return orchestrator_topology(self.app.services, self.config.queue_policy)

    # --- Commands ---------------------------------------------------------------------------

    async def start(
        self,
        saga_type: str,
        saga_id: str,
        data: Mapping[str, Any],
        *,
        traceparent: str | None = None,
    ) -> SagaState:
        """Start a saga, or return the existing one with this id (starting is idempotent).

        Raises:
            UnknownSagaType: the app has no saga type ``saga_type``.
            InvalidSagaData: ``data`` does not match the saga's data model.
            SagaConflict: the id is taken by a saga of another type.
        """
        if saga_type not in self.app:
            known = ", ".join(saga.name for saga in self.app.sagas)
            raise UnknownSagaType(f"no saga type {saga_type!r}; this app runs {known}")
        existing = await self.store.load(saga_id)
        if existing is not None:
            return self._same_type(existing, saga_type)
        now = self.clock.now()
        decision = start_saga(
            self.app[saga_type],
            saga_id,
            data,
            now,
            traceparent=tracing.continue_or_start(traceparent),
            history_limit=self.config.history_limit,
        )
        record = SagaRecord(decision.state, 1, self._outbox(decision, now))
        if not await self.store.create(record):
            raced = await self.store.load(saga_id)
            if raced is None:  # created and purged in between: vanishingly rare, but honest
                raise SagaNotFound(f"saga {saga_id} disappeared while being started")
            return self._same_type(raced, saga_type)
        self._observe(decision, now)
        await self._publish(record)
        return decision.state

    def _same_type(self, record: SagaRecord, saga_type: str) -> SagaState:
        if record.state.saga_type != saga_type:
            raise SagaConflict(
                f"saga id {record.saga_id} is already used by a {record.state.saga_type} saga"
            )
        return record.state

    async def apply(self, saga_id: str, event: Event) -> Decision:
        """Apply one event to one saga, deciding again after every lost version race.

        Raises:
            SagaNotFound: no saga has this id.
            ConcurrencyExhausted: the version race was lost ``conflict_retries`` times.
            ActionRefused: an operator action does not apply.
        """
        _, decision = await self._apply(saga_id, event)
        return decision

    async def _apply(self, saga_id: str, event: Event) -> tuple[SagaState, Decision]:
        """:meth:`apply`, also returning the state the winning decision was made from."""
        for _ in range(self.config.conflict_retries):
            record = await self.store.load(saga_id)
            if record is None:
                raise SagaNotFound(f"no saga has id {saga_id!r}")
            saga_type = record.state.saga_type
            if saga_type not in self.app:
                raise UnknownSagaType(
                    f"saga {saga_id} is a {saga_type!r}, which this app does not run"
                )
            now = self.clock.now()
            decision = decide(
                record.state,
                event,
                now,
                self.app[saga_type],
                history_limit=self.config.history_limit,
            )
            if not decision.changed:
                self._observe(decision, now)
                return record.state, decision
            # The store appends these to the saga's outbox; entries of earlier decisions stay
            # with whoever is publishing them (or the relay, if they were left behind).
            saved = SagaRecord(decision.state, record.version + 1, self._outbox(decision, now))
            if await self.store.save(saved, record.version):
                self._observe(decision, now)
                await self._publish(saved)
                return record.state, decision
            if self.metrics:
                self.metrics.version_conflicts.inc()
        raise ConcurrencyExhausted(
            f"saga {saga_id}: lost the version race {self.config.conflict_retries} times in a row"
        )

    async def operate(self, saga_id: str, action: OperatorAction) -> SagaState:
        """Apply an operator action (retry, abort, resolve) through the saga rules."""
        decision = await self.apply(saga_id, action)
        log.info("operator_action_applied", saga_id=saga_id, action=type(action).__name__)
        return decision.state

    # --- Outbox -----------------------------------------------------------------------------

    def _outbox(self, decision: Decision, now: datetime) -> tuple[Outgoing, ...]:
        """The messages a decision adds to the outbox (unwanted lifecycle events left out)."""
        wanted = self.config.published_events
        entries: dict[str, Outgoing] = {}
        for effect in decision.effects:
            if (
                isinstance(effect, PublishEvent)
                and wanted is not None
                and effect.event.event not in wanted
            ):
                continue
            message = outgoing(effect, now)
            entries[message.message_id] = message
        return tuple(entries.values())

    async def _publish(
        self, record: SagaRecord, wanted: Callable[[Outgoing], bool] = lambda _: True
    ) -> int:
        """Publish the ``wanted`` entries of a record's outbox, in order.

        Stops at the first failure: the relay publishes the rest after the grace period.
        """
        done: list[str] = []
        for entry in record.outbox:
            if not wanted(entry):
                continue
            try:
                await self.transport.publish(entry)
            except PublishFailed as e:
                log.warning(
                    "outbox_publish_failed",
                    saga_id=record.saga_id,
                    message_id=entry.message_id,
                    error=str(e),
                )
                break
            done.append(entry.message_id)
        if done:
            await self.store.mark_published(record.saga_id, done)
        return len(done)

    # --- Message handlers -------------------------------------------------------------------

    async def on_start(self, delivery: Delivery) -> Disposition | DeadLetter:
        """Handle a start request from the ``saga.start`` queue."""
        return await self._guarded(delivery, self._handle_start)

    async def on_reply(self, delivery: Delivery) -> Disposition | DeadLetter:
        """Handle a participant reply from the ``saga.replies`` queue."""
        return await self._guarded(delivery, self._handle_reply)

    async def on_timer(self, delivery: Delivery) -> Disposition | DeadLetter:
        """Handle a wake-up from the ``saga.timers`` queue."""
        return await self._guarded(delivery, self._handle_timer)

    async def _guarded(
        self, delivery: Delivery, handler: Callable[[Delivery], Awaitable[Outcome | Handled]]
    ) -> Disposition | DeadLetter:
        """The one place where a message's fate is decided."""
        queue = delivery.queue
        # Each delivery is handled in its own task, so these bindings die with it.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            queue=queue,
            message_id=delivery.message_id,
            correlation_id=delivery.correlation_id,
            trace_id=tracing.trace_id(delivery.headers.get(names.HEADER_TRACEPARENT)),
        )
        try:
            outcome = await self._patiently(handler, delivery)
        except (MessageRejected, UnknownSagaType, InvalidSagaData, SagaConflict) as e:
            return self._dead_letter(queue, _reason_label(e), str(e))
        except SagaNotFound as e:
            if queue == names.TIMERS_QUEUE:  # the saga was purged; its timer has nothing to do
                self._count(queue, Handled.SAGA_NOT_FOUND)
                return Disposition.ACK
            return self._dead_letter(queue, Handled.SAGA_NOT_FOUND, str(e))
        except (ConcurrencyExhausted, StoreUnavailable) as e:
            log.warning("message_requeued", error=str(e))
            self._count(queue, Handled.REQUEUED)
            return Disposition.REQUEUE
        self._count(queue, outcome)
        log.debug("message_handled", outcome=outcome)
        return Disposition.ACK

    async def _patiently(
        self, handler: Callable[[Delivery], Awaitable[Outcome | Handled]], delivery: Delivery
    ) -> Outcome | Handled:
        """Run ``handler``, waiting out a store outage instead of requeueing.

        Every requeue counts toward the queue's delivery limit, so a short outage would park
        innocent messages. Holding the message keeps it ours, and the full prefetch window
        stops the broker from sending more: backpressure, not redelivery. Only a shutdown
        gives the message back.
        """
        delay = self.config.store_retry_delay
        while True:
            try:
                return await handler(delivery)
            except StoreUnavailable as e:
                if self._stopping.is_set():
                    raise
                log.warning("store_unavailable_waiting", error=str(e), retry_in=delay)
                await self.clock.sleep(delay)
                delay = min(delay * 2, self.config.store_retry_max)

    def _dead_letter(self, queue: str, label: str, reason: str) -> DeadLetter:
        log.warning("message_dead_lettered", reason=reason)
        if self.metrics:
            self.metrics.dead_lettered.labels(queue, label).inc()
        self._count(queue, Handled.DEAD_LETTERED)
        return DeadLetter(reason)

    def _count(self, queue: str, outcome: Outcome | Handled) -> None:
        if self.metrics:
            self.metrics.messages.labels(queue, outcome).inc()

    async def _handle_start(self, delivery: Delivery) -> Handled:
        request = decode(delivery, StartSaga)
        structlog.contextvars.bind_contextvars(saga_id=request.saga_id, saga_type=request.saga_type)
        await self.start(
            request.saga_type, request.saga_id, request.data, traceparent=request.traceparent
        )
        return Handled.STARTED

    async def _handle_reply(self, delivery: Delivery) -> Outcome:
        reply = decode(delivery, Reply)
        structlog.contextvars.bind_contextvars(
            saga_id=reply.saga_id, step=reply.step, attempt=reply.attempt
        )
        decision = await self.apply(reply.saga_id, ReplyReceived(reply))
        return decision.outcome

    async def _handle_timer(self, delivery: Delivery) -> Outcome:
        timer = decode(delivery, TimerMessage)
        structlog.contextvars.bind_contextvars(
            saga_id=timer.saga_id, step=timer.step, timer=timer.timer.value
        )
        decision = await self.apply(timer.saga_id, Wakeup(timer))
        if self.metrics and decision.outcome is Outcome.APPLIED:
            self.metrics.timers_fired.labels("broker").inc()
            lateness = (self.clock.now() - timer.due_at).total_seconds()
            self.metrics.timer_lateness.labels("broker").observe(max(lateness, 0.0))
        return decision.outcome

    def _observe(self, decision: Decision, now: datetime) -> None:
        if self.metrics is None:
            return
        if decision.outcome is Outcome.STALE_TIMER:
            self.metrics.stale_timers.inc()
        self.metrics.observe_events(decision.events, decision.state, now)

    # --- Background loops -------------------------------------------------------------------

    async def sweep_once(self) -> int:
        """Fire every saga whose stored due time has passed; returns how many fired."""
        now = self.clock.now()
        fired = 0
        for saga_id in await self.store.due(now, self.config.sweep_batch):
            try:
                before, decision = await self._apply(saga_id, Wakeup())
            except SagaNotFound:
                continue
            due_at = before.next_due_at
            if decision.outcome is Outcome.APPLIED:
                fired += 1
                if self.metrics:
                    self.metrics.timers_fired.labels("sweeper").inc()
                    if due_at is not None:
                        lateness = (self.clock.now() - due_at).total_seconds()
                        self.metrics.timer_lateness.labels("sweeper").observe(max(lateness, 0.0))
        if fired:
            log.info("sweep_fired", count=fired)
        return fired

    async def relay_once(self, *, grace: float | None = None) -> int:
        """Publish outbox messages older than the grace period; returns how many."""
        older_than = self.clock.now() - timedelta(
            seconds=self.config.outbox_grace if grace is None else grace
        )
        published = 0
        for record in await self.store.unpublished(older_than, self.config.sweep_batch):
            # Fresh entries belong to the handler that wrote them; only stale ones are ours.
            published += await self._publish(record, lambda entry: entry.created_at <= older_than)
        if published:
            log.info("outbox_relayed", count=published)
        return published

    async def purge_once(self) -> int:
        """Delete finished sagas past their retention."""
        purged = await self.store.purge(self.clock.now())
        if purged:
            log.info("sagas_purged", count=purged)
        return purged

    async def refresh_gauges(self) -> None:
        """Recompute the store-backed gauges (in-flight sagas, outbox backlog)."""
        if self.metrics is None:
            return
        counts = await self.store.count_by_status()
        self.metrics.set_in_flight(counts, tuple(saga.name for saga in self.app.sagas))
        size, oldest = await self.store.outbox_backlog()
        self.metrics.set_outbox(size, oldest, self.clock.now())

    async def _every(
        self, interval: float, job: Callable[[], Awaitable[object]], name: str
    ) -> None:
        while True:
            try:
                await job()
            except (StoreUnavailable, BrokerError) as e:
                log.warning("background_job_failed", job=name, error=str(e))
            await self.clock.sleep(interval)

    # --- Running ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Declare the topology, consume, and run the background loops until :meth:`stop`.

        Shutdown is graceful: consumers stop taking messages, in-flight ones finish, and the
        outbox is flushed before the loops are cancelled.
        """
        await self.store.setup()
        await self.transport.declare(self.topology)
        await self.refresh_gauges()
        async with asyncio.TaskGroup() as group:
            consumers = []
            readiness = []
            for queue, handler in (
                (names.START_QUEUE, self.on_start),
                (names.REPLIES_QUEUE, self.on_reply),
                (names.TIMERS_QUEUE, self.on_timer),
            ):
                ready = asyncio.Event()
                readiness.append(ready)
                consumers.append(
                    group.create_task(
                        self.transport.consume(queue, handler, ready=ready), name=f"consume:{queue}"
                    )
                )
            loops = [
                group.create_task(
                    self._every(self.config.sweep_interval, self.sweep_once, "sweep")
                ),
                group.create_task(
                    self._every(self.config.relay_interval, self.relay_once, "relay")
                ),
                group.create_task(
                    self._every(self.config.purge_interval, self.purge_once, "purge")
                ),
                group.create_task(
                    self._every(self.config.gauge_interval, self.refresh_gauges, "gauges")
                ),
            ]
            for ready in readiness:
                await ready.wait()
            self.ready.set()
            if self.metrics:
                self.metrics.consumers_ready.set(1)
            log.info("orchestrator_ready", sagas=[saga.name for saga in self.app.sagas])
            await self._stopping.wait()
            self.ready.clear()
            if self.metrics:
                self.metrics.consumers_ready.set(0)
            for task in consumers:
                task.cancel()  # consumers finish their in-flight messages before they return
            await asyncio.gather(*consumers, return_exceptions=True)
            try:
                await self.relay_once(grace=0)
            except (StoreUnavailable, BrokerError) as e:
                log.warning("outbox_flush_failed", error=str(e))
            for task in loops:
                task.cancel()
        log.info("orchestrator_stopped")

    def stop(self) -> None:
        """Ask :meth:`run` to shut down gracefully."""
        self._stopping.set()


def _reason_label(error: Exception) -> str:
    """A low-cardinality label for the dead-letter metric."""
    labels: dict[type[Exception], str] = {
        MessageRejected: "malformed",
        UnknownSagaType: "unknown_saga_type",
        InvalidSagaData: "invalid_data",
        SagaConflict: "saga_conflict",
    }
    return labels.get(type(error), "rejected")
