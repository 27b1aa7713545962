"""Prometheus metrics: saga-level, built on a registry that is passed in.

Labels are a small fixed set (``saga_type``, ``step``, ``outcome``, ``status``, ``queue``,
``reason``); a saga id is never a label. Recording a metric must never change how a message
is settled, so every observation here is plain arithmetic on values already at hand.

Families (all prefixed ``saga_``):

============================================  ==========================================
``saga_started_total``                        sagas started, by type
``saga_completed_total``                      sagas completed, by type
``saga_failed_total``                         sagas rolled back, by type
``saga_stuck_total``                          sagas parked as stuck, by type
``saga_step_outcomes_total``                  step attempts by outcome (completed, failed,
                                              error, timed_out, not_picked_up)
``saga_step_retries_total``                   step retries scheduled
``saga_compensations_total``                  compensation attempts by outcome (completed,
                                              failed, timed_out)
``saga_operator_actions_total``               operator actions applied, by type and action
                                              (retry, abort, resolve)
``saga_late_replies_total``                   replies that arrived too late to count
``saga_stale_timers_total``                   timers that found nothing to do
``saga_step_duration_seconds``                first send to completion of a step
``saga_duration_seconds``                     start to end of a saga, by final status
``saga_active``                               unfinished sagas per type and current status
                                              (started, pending, compensating, stuck), read
                                              from the store
``saga_outbox_backlog``                       unpublished outbox messages
``saga_outbox_oldest_age_seconds``            age of the oldest unpublished message
``saga_timer_lateness_seconds``               how long after its due time a timer fired
``saga_timers_fired_total``                   timer firings by source (broker, sweeper)
``saga_dead_lettered_total``                  messages parked, by queue and reason
``saga_publish_failures_total``               publishes not confirmed, by reason
``saga_version_conflicts_total``              transitions that lost the version race
``saga_held``                                 sagas held, by type and what they wait for
                                              (``v<N>``: a definition; ``operator``)
``saga_holds_total``                          sagas held by this daemon, by cause
                                              (definition, error)
``saga_loop_errors_total``                    failures inside a background loop
``saga_messages_total``                       messages handled, by queue and outcome
``saga_consumers_ready``                      1 while every consumer is registered
============================================  ==========================================

Participant services export their own families (:mod:`participants.metrics`) beside the
ones every process has (:class:`plumbing.metrics.ProcessMetrics`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from contracts.events import EventName, LifecycleEvent
from orchestrator.definition import App
from orchestrator.state import SagaState, SagaStatus
from plumbing.metrics import STEP_BUCKETS, ProcessMetrics

_SAGA_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600, 4 * 3600, 86400)
_LATENESS_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)

_STEP_OUTCOMES = {
    EventName.STEP_COMPLETED: "completed",
    EventName.STEP_FAILED: "failed",
    EventName.STEP_TIMED_OUT: "timed_out",
    EventName.STEP_NOT_PICKED_UP: "not_picked_up",
}
_COMPENSATION_OUTCOMES = {
    EventName.COMPENSATION_COMPLETED: "completed",
    EventName.COMPENSATION_FAILED: "failed",
}
_COMPENSATION_TIMEOUT = "CompensationTimeout"
"""The error type of a compensation attempt that got no reply in time: its own outcome."""
ACTIVE_STATUSES = tuple(status for status in SagaStatus if not status.is_terminal)
"""The statuses ``saga_active`` reports: a finished saga is counted by the ``_total``s."""
_SAGA_COUNTERS = {
    EventName.SAGA_STARTED: "started",
    EventName.SAGA_COMPLETED: "completed",
    EventName.SAGA_FAILED: "failed",
    EventName.SAGA_STUCK: "stuck",
    EventName.LATE_REPLY: "late_replies",
}


class Metrics(ProcessMetrics):
    """Every metric the orchestrator exports, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self._held_labels: set[tuple[str, str]] = set()
        self.started = Counter(
            "saga_started_total", "Sagas started.", ["saga_type"], registry=registry
        )
        self.completed = Counter(
            "saga_completed_total",
            "Sagas whose steps all completed.",
            ["saga_type"],
            registry=registry,
        )
        self.failed = Counter(
            "saga_failed_total",
            "Sagas rolled back by compensation.",
            ["saga_type"],
            registry=registry,
        )
        self.stuck = Counter(
            "saga_stuck_total",
            "Sagas parked because a compensation kept failing.",
            ["saga_type"],
            registry=registry,
        )
        self.step_outcomes = Counter(
            "saga_step_outcomes_total",
            "Step attempts by outcome: completed, failed, error, timed_out, not_picked_up.",
            ["saga_type", "step", "outcome"],
            registry=registry,
        )
        self.step_retries = Counter(
            "saga_step_retries_total",
            "Step retries scheduled.",
            ["saga_type", "step"],
            registry=registry,
        )
        self.compensations = Counter(
            "saga_compensations_total",
            "Compensation attempts by outcome: completed, failed, timed_out.",
            ["saga_type", "step", "outcome"],
            registry=registry,
        )
        self.late_replies = Counter(
            "saga_late_replies_total",
            "Replies for an attempt the saga no longer waited for.",
            ["saga_type"],
            registry=registry,
        )
        self.stale_timers = Counter(
            "saga_stale_timers_total", "Timers that found nothing due.", registry=registry
        )
        self.step_duration = Histogram(
            "saga_step_duration_seconds",
            "Time from a step's first command to its completion.",
            ["saga_type", "step"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.saga_duration = Histogram(
            "saga_duration_seconds",
            "Time from start to the end of a saga, by final status.",
            ["saga_type", "status"],
            buckets=_SAGA_BUCKETS,
            registry=registry,
        )
        self.operator_actions = Counter(
            "saga_operator_actions_total",
            "Operator actions applied through the saga rules, by action: retry, abort, resolve.",
            ["saga_type", "action"],
            registry=registry,
        )
        self.active = Gauge(
            "saga_active",
            "Unfinished sagas per type and current status (started, pending, compensating, "
            "stuck), as counted in the store.",
            ["saga_type", "status"],
            registry=registry,
        )
        self.outbox_backlog = Gauge(
            "saga_outbox_backlog",
            "Outbox messages not yet confirmed as published.",
            registry=registry,
        )
        self.outbox_oldest_age = Gauge(
            "saga_outbox_oldest_age_seconds",
            "Age of the oldest unpublished outbox message (0 when empty).",
            registry=registry,
        )
        self.timer_lateness = Histogram(
            "saga_timer_lateness_seconds",
            "How long after its due time a timer was handled.",
            ["source"],
            buckets=_LATENESS_BUCKETS,
            registry=registry,
        )
        self.timers_fired = Counter(
            "saga_timers_fired_total",
            "Wake-ups that fired something, by source: broker, sweeper.",
            ["source"],
            registry=registry,
        )
        self.version_conflicts = Counter(
            "saga_version_conflicts_total",
            "Transitions that lost the version race and were decided again.",
            registry=registry,
        )
        self.held = Gauge(
            "saga_held",
            "Sagas held, by what they wait for: a definition version (v<N>) or an operator.",
            ["saga_type", "waiting_for"],
            registry=registry,
        )
        self.holds = Counter(
            "saga_holds_total",
            "Sagas this daemon held, by cause: definition (not loaded), error (handling failed).",
            ["saga_type", "cause"],
            registry=registry,
        )
        self.loop_errors = Counter(
            "saga_loop_errors_total",
            "Failures inside a background loop (sweep, relay, purge, gauges) or a held saga.",
            ["loop"],
            registry=registry,
        )
        self.messages = Counter(
            "saga_messages_total",
            "Messages handled, by queue and outcome.",
            ["queue", "outcome"],
            registry=registry,
        )

    def prepare(self, app: App) -> None:
        """Create every saga-level series at zero, so ``rate()`` sees even the first event.

        A counter series that first appears already at 1 has no earlier sample, and
        Prometheus cannot tell that it rose.
        """
        for saga in app.sagas:
            for counter in (
                self.started,
                self.completed,
                self.failed,
                self.stuck,
                self.late_replies,
            ):
                counter.labels(saga.name)
            for action in ("retry", "abort", "resolve"):
                self.operator_actions.labels(saga.name, action)
            for step in saga.steps:
                self.step_retries.labels(saga.name, step.name)
                for outcome in ("completed", "failed", "error", "timed_out", "not_picked_up"):
                    self.step_outcomes.labels(saga.name, step.name, outcome)
                if step.compensation is not None:
                    for outcome in ("completed", "failed", "timed_out"):
                        self.compensations.labels(saga.name, step.name, outcome)
        for reason in ("returned", "nacked", "timeout", "connection", "channel"):
            self.publish_failures.labels(reason)

    def observe_events(
        self, events: tuple[LifecycleEvent, ...], state: SagaState, now: datetime
    ) -> None:
        """Count what one decision did, from its lifecycle events and the state it produced."""
        saga_type = state.saga_type
        for event in events:
            self._observe(event, saga_type, state, now)

    def _observe(
        self, event: LifecycleEvent, saga_type: str, state: SagaState, now: datetime
    ) -> None:
        step = event.step or ""
        name = event.event
        if name in _STEP_OUTCOMES:
            self.step_outcomes.labels(saga_type, step, _STEP_OUTCOMES[name]).inc()
        if name in _COMPENSATION_OUTCOMES:
            outcome = _COMPENSATION_OUTCOMES[name]
            error = getattr(event, "error", None)
            if error is not None and error.type == _COMPENSATION_TIMEOUT:
                outcome = "timed_out"
            self.compensations.labels(saga_type, step, outcome).inc()
        if name in _SAGA_COUNTERS:
            getattr(self, _SAGA_COUNTERS[name]).labels(saga_type).inc()
        if name is EventName.STEP_COMPLETED:
            started = state.step(step).started_at
            if started is not None:
                seconds = (now - started).total_seconds()
                self.step_duration.labels(saga_type, step).observe(seconds)
        elif name is EventName.STEP_RETRYING:
            self.step_retries.labels(saga_type, step).inc()
            if event.detail is None or not event.detail.startswith("StepTimeout"):
                self.step_outcomes.labels(saga_type, step, "error").inc()
        elif name in (EventName.SAGA_COMPLETED, EventName.SAGA_FAILED):
            status = "completed" if name is EventName.SAGA_COMPLETED else "failed"
            seconds = (now - state.created_at).total_seconds()
            self.saga_duration.labels(saga_type, status).observe(seconds)

    def set_active(
        self, counts: Mapping[tuple[str, str], int], saga_types: tuple[str, ...]
    ) -> None:
        """Replace the active gauge with counts read from the store (finished sagas left out).

        Every known type and unfinished status gets a value (zero included), so that alerts
        such as ``saga_active{status="stuck"} > 0`` resolve when the last stuck saga is handled.
        """
        types = set(saga_types) | {saga_type for saga_type, _ in counts}
        for saga_type in types:
            for status in ACTIVE_STATUSES:
                self.active.labels(saga_type, status.value).set(
                    counts.get((saga_type, status.value), 0)
                )

    def set_held(self, counts: Mapping[tuple[str, str], int], saga_types: tuple[str, ...]) -> None:
        """Replace the held gauge with counts read from the store, keyed by definition key.

        Every known type gets an ``operator`` series (zero included) so its alert resolves.
        """
        values: dict[tuple[str, str], int] = {
            (saga_type, "operator"): 0 for saga_type in saga_types
        }
        for (saga_type, waiting_for), count in counts.items():
            label = "operator"
            if waiting_for:
                label = "v" + waiting_for.split(":")[1]
            values[saga_type, label] = values.get((saga_type, label), 0) + count
        for (saga_type, label), count in values.items():
            self.held.labels(saga_type, label).set(count)
        for labels in list(self._held_labels - values.keys()):
            self.held.labels(*labels).set(0)
        self._held_labels |= values.keys()

    def set_outbox(self, size: int, oldest: datetime | None, now: datetime) -> None:
        """Record the outbox backlog read from the store."""
        self.outbox_backlog.set(size)
        self.outbox_oldest_age.set(max((now - oldest).total_seconds(), 0.0) if oldest else 0.0)
