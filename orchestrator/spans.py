"""OpenTelemetry spans for what a decision ended: step attempts, compensations, the saga.

Recorded after a decision is committed, from the state before it (when the attempt began)
and its lifecycle events (how it ended); see :mod:`plumbing.telemetry`. Without OpenTelemetry
installed this does nothing.
"""

from __future__ import annotations

from datetime import datetime

from contracts.events import EventName, LifecycleEvent
from orchestrator.state import SagaState, StepStatus
from plumbing import telemetry

_TIMED_OUT = {EventName.STEP_TIMED_OUT, EventName.STEP_NOT_PICKED_UP}


def record(before: SagaState, after: SagaState, events: tuple[LifecycleEvent, ...]) -> None:
    """Record a span for every attempt, compensation and saga these events ended."""
    if not telemetry.enabled():
        return
    timed_out = {event.step for event in events if event.event in _TIMED_OUT}
    for event in events:
        if event.step is None:
            if event.event in (EventName.SAGA_COMPLETED, EventName.SAGA_FAILED):
                _span(after, f"saga {after.saga_type}", after.created_at, event, {})
            continue
        step = before.step(event.step)
        name = event.event
        ended_forward = step.status is StepStatus.RUNNING and (
            name in (EventName.STEP_COMPLETED, EventName.STEP_FAILED, *_TIMED_OUT)
            or (name is EventName.STEP_RETRYING and event.step not in timed_out)
        )
        if ended_forward and step.attempt_at is not None:
            _span(
                after,
                f"{after.saga_type}.{step.name} #{step.attempt}",
                step.attempt_at,
                event,
                {"saga.step": step.name, "saga.attempt": step.attempt, "saga.direction": "forward"},
            )
        ended_undo = step.status is StepStatus.COMPENSATING and name in (
            EventName.COMPENSATION_COMPLETED,
            EventName.COMPENSATION_FAILED,
        )
        if ended_undo and step.compensation_at is not None:
            _span(
                after,
                f"{after.saga_type}.{step.name} compensation #{step.compensation_attempt}",
                step.compensation_at,
                event,
                {
                    "saga.step": step.name,
                    "saga.attempt": step.compensation_attempt,
                    "saga.direction": "compensation",
                },
            )


def _span(
    state: SagaState,
    name: str,
    start: datetime,
    event: LifecycleEvent,
    attributes: dict[str, str | int | bool],
) -> None:
    ok = event.event in (
        EventName.STEP_COMPLETED,
        EventName.COMPENSATION_COMPLETED,
        EventName.SAGA_COMPLETED,
    )
    telemetry.record_span(
        name,
        traceparent=state.traceparent,
        tracestate=state.tracestate,
        start=start,
        end=event.at,
        attributes={
            "saga.id": state.saga_id,
            "saga.type": state.saga_type,
            "saga.version": state.definition_version,
            "saga.outcome": event.event.value,
            **attributes,
        },
        error=None if ok else (event.detail or event.event.value),
    )
