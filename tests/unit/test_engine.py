"""The saga rules, one scenario at a time, on the pure core (no broker, no store)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from contracts.events import EventName
from contracts.messages import Direction, ReplyStatus, TimerKind
from contracts.orders import OrderData
from examples.order_fulfillment import order_fulfillment
from orchestrator.definition import RetryPolicy
from orchestrator.effects import SendCommand
from orchestrator.engine import (
    OperatorAbort,
    OperatorResolve,
    OperatorRetry,
    Outcome,
    Wakeup,
)
from orchestrator.state import SagaStatus, StepStatus
from plumbing.errors import ActionRefused
from tests.unit.driver import Driver, chain

N = 5
ORDER_1 = {
    "order_id": "o-1",
    "customer_id": "c-1",
    "items": [{"sku": "a", "quantity": 1, "unit_price": "5.00"}],
    "payment_method": "card",
    "shipping_address": "x",
}


def events(driver: Driver) -> list[str]:
    assert driver.state is not None
    return [entry.event.value for entry in driver.state.history]


def test_happy_path_runs_every_step_in_order_and_completes() -> None:
    d = Driver(chain(N))
    d.start()
    for _ in range(N):
        d.reply()
    assert d.state is not None
    assert d.state.status is SagaStatus.COMPLETED
    assert d.forwards() == [f"s{i}" for i in range(N)]
    assert d.compensations() == []
    assert all(step.status is StepStatus.COMPLETED for step in d.state.steps)
    assert events(d)[0] == "SagaStarted"
    assert events(d)[-1] == "SagaCompleted"
    assert d.state.next_due_at is None


@pytest.mark.parametrize("failing", range(N))
def test_failure_at_each_step_compensates_earlier_steps_in_reverse(failing: int) -> None:
    d = Driver(chain(N))
    d.start()
    for _ in range(failing):
        d.reply()
    d.reply(ReplyStatus.FAILED)
    while d.state and d.state.status is SagaStatus.COMPENSATING:
        d.reply()
    assert d.state is not None
    assert d.state.status is SagaStatus.FAILED
    assert d.compensations() == [f"s{i}" for i in reversed(range(failing))]
    assert d.state.steps[failing].status is StepStatus.FAILED
    assert all(d.state.steps[i].status is StepStatus.COMPENSATED for i in range(failing))
    assert all(d.state.steps[i].status is StepStatus.NOT_STARTED for i in range(failing + 1, N))
    assert d.state.failure_reason == f"step s{failing} failed (Boom)"


@pytest.mark.parametrize("hanging", range(N))
def test_timeout_at_each_step_compensates_it_too_in_reverse(hanging: int) -> None:
    d = Driver(chain(N))
    d.start()
    for _ in range(hanging):
        d.reply()
    d.fire_next()  # the hanging step's timeout
    assert d.state is not None
    assert EventName.STEP_TIMED_OUT in [e.event for e in d.state.history]
    while d.state.status is SagaStatus.COMPENSATING:
        d.reply()
    assert d.state.status is SagaStatus.FAILED
    assert d.compensations() == [f"s{i}" for i in reversed(range(hanging + 1))]
    assert d.state.steps[hanging].status is StepStatus.COMPENSATED


def test_timed_out_step_is_not_compensated_when_it_says_so() -> None:
    saga = chain(3)
    steps = list(saga.steps)
    from dataclasses import replace

    steps[2] = replace(steps[2], compensate_on_timeout=False)
    d = Driver(replace(saga, steps=tuple(steps)))
    d.start()
    d.reply()
    d.reply()
    d.fire_next()
    while d.state and d.state.status is SagaStatus.COMPENSATING:
        d.reply()
    assert d.compensations() == ["s1", "s0"]


def test_order_saga_shipment_timeout_sends_cancel_refund_release_in_that_order() -> None:
    d = Driver(order_fulfillment)
    order = OrderData.model_validate(
        {
            "order_id": "o-7",
            "customer_id": "c",
            "items": [{"sku": "a", "quantity": 3, "unit_price": "2.50"}],
            "payment_method": "card",
            "shipping_address": "x",
        }
    )
    from orchestrator.engine import start_saga

    data = order.model_dump(mode="json", exclude={"amount"})
    d._record(start_saga(order_fulfillment, "o-7", data, d.now))
    d.reply(result={"reservation_id": "r-7"})
    d.reply(result={"payment_id": "p-7", "amount": "7.50"})
    d.advance(899)
    d.apply(Wakeup())
    assert d.state is not None
    assert d.state.status is SagaStatus.STARTED
    d.advance(1)
    d.fire_next()
    names = [e.command for e in d.sent if e.direction is Direction.COMPENSATION]
    assert names == ["cancel_shipment"]
    d.reply()
    d.reply()
    d.reply()
    names = [e.command for e in d.sent if e.direction is Direction.COMPENSATION]
    assert names == ["cancel_shipment", "refund_payment", "release_inventory"]
    refund = next(e for e in d.sent if e.command == "refund_payment")
    assert refund.payload["payment_id"] == "p-7"
    assert refund.payload["amount"] == "7.50"
    release = next(e for e in d.sent if e.command == "release_inventory")
    assert release.payload["reservation_id"] == "r-7"
    cancel = next(e for e in d.sent if e.command == "cancel_shipment")
    assert cancel.payload["shipment_id"] is None  # the shipment never answered
    assert d.state.status is SagaStatus.FAILED


def test_step_results_flow_into_later_commands() -> None:
    d = Driver(order_fulfillment)
    from orchestrator.engine import start_saga

    d._record(start_saga(order_fulfillment, "o-1", ORDER_1, d.now))
    assert d.last.payload["items"] == [{"sku": "a", "quantity": 1, "unit_price": "5.00"}]
    d.reply(result={"reservation_id": "r-1"})
    assert d.last.command == "process_payment"
    assert d.last.payload["amount"] == "5.00"
    d.reply(result={"payment_id": "p-1", "amount": "5.00"})
    assert d.last.payload["reservation_id"] == "r-1"
    d.reply(result={"shipment_id": "s-1", "tracking_number": "T1"})
    assert d.last.payload["payment_id"] == "p-1"
    assert d.last.payload["tracking_number"] == "T1"


def test_transient_error_is_retried_with_the_same_idempotency_key() -> None:
    d = Driver(chain(2))
    d.start()
    first = d.last
    d.reply(ReplyStatus.ERROR)
    assert d.state is not None
    assert d.state.status is SagaStatus.PENDING
    assert d.state.steps[0].status is StepStatus.RETRY_SCHEDULED
    assert d.timers[-1].timer is TimerKind.RETRY
    d.fire_next()
    second = d.last
    assert second.attempt == 2
    assert second.idempotency_key == first.idempotency_key
    assert second.message_id != first.message_id
    assert d.state.status is SagaStatus.STARTED
    d.reply()
    d.reply()
    assert d.state.status is SagaStatus.COMPLETED


def test_errors_past_the_retry_policy_fail_the_step() -> None:
    d = Driver(chain(2, retry=RetryPolicy(max_attempts=3)))
    d.start()
    d.reply()
    for _ in range(2):
        d.reply(ReplyStatus.ERROR)
        d.fire_next()
    d.reply(ReplyStatus.ERROR)
    assert d.state is not None
    assert d.state.steps[1].status is StepStatus.FAILED
    assert d.state.steps[1].attempt == 3
    assert d.state.status is SagaStatus.COMPENSATING
    assert d.compensations() == ["s0"]


def test_only_listed_error_types_are_retried() -> None:
    d = Driver(chain(1, retry=RetryPolicy(max_attempts=5, retry_on=frozenset({"Timeout"}))))
    d.start()
    d.reply(ReplyStatus.ERROR, error_type="ValueError")
    assert d.state is not None
    assert d.state.status is SagaStatus.FAILED
    assert d.state.steps[0].attempt == 1


def test_business_failure_is_never_retried() -> None:
    d = Driver(chain(1, retry=RetryPolicy(max_attempts=5)))
    d.start()
    d.reply(ReplyStatus.FAILED)
    assert d.state is not None
    assert d.state.status is SagaStatus.FAILED
    assert len(d.sent) == 1


def test_timeouts_retry_when_the_policy_says_so_and_the_step_stays_in_doubt() -> None:
    d = Driver(chain(2, retry=RetryPolicy(max_attempts=2, retry_timeouts=True)))
    d.start()
    d.reply()
    d.fire_next()  # s1 attempt 1 times out -> retry scheduled
    assert d.state is not None
    assert d.state.steps[1].status is StepStatus.RETRY_SCHEDULED
    d.fire_next()  # retry due -> attempt 2
    assert d.last.attempt == 2
    d.reply(ReplyStatus.ERROR)  # attempt 2 errors and the policy is spent
    # attempt 1 may still have acted, so s1 is compensated before s0
    assert d.state.steps[1].in_doubt
    assert d.state.steps[1].status is StepStatus.COMPENSATING
    while d.state.status is SagaStatus.COMPENSATING:
        d.reply()
    assert d.compensations() == ["s1", "s0"]


def test_backoff_is_exponential_capped_jittered_and_deterministic() -> None:
    policy = RetryPolicy(
        max_attempts=None, initial_backoff=1, multiplier=2, max_backoff=30, jitter=0.2
    )
    delays = [policy.backoff(n, "seed").total_seconds() for n in range(1, 10)]
    assert delays == [policy.backoff(n, "seed").total_seconds() for n in range(1, 10)]
    for n, delay in enumerate(delays, start=1):
        raw = min(2 ** (n - 1), 30)
        assert max(raw * 0.8, 1.0) - 1e-9 <= delay <= max(raw, 1.0)
    spread = {policy.backoff(5, f"saga-{i}").total_seconds() for i in range(20)}
    assert len(spread) > 10  # different sagas back off by different amounts


def test_reply_for_an_older_attempt_is_recorded_and_ignored() -> None:
    d = Driver(chain(2))
    d.start()
    first = d.last
    d.reply(ReplyStatus.ERROR)
    d.fire_next()
    decision = d.reply(ReplyStatus.COMPLETED, to=first)
    assert decision.outcome is Outcome.LATE_REPLY
    assert decision.commands == ()
    assert d.state is not None
    assert d.state.steps[0].status is StepStatus.RUNNING
    assert d.state.history[-1].event is EventName.LATE_REPLY


def test_duplicate_reply_is_recorded_once_and_dispatches_nothing() -> None:
    d = Driver(chain(3))
    d.start()
    first = d.last
    d.reply()
    decision = d.reply(to=first)
    assert decision.outcome is Outcome.LATE_REPLY
    assert decision.commands == ()
    assert d.forwards() == ["s0", "s1"]


def test_late_success_after_timeout_changes_nothing_and_compensation_goes_on() -> None:
    d = Driver(chain(3))
    d.start()
    d.reply()
    hung = d.last
    d.fire_next()
    assert d.compensations() == ["s1"]
    decision = d.reply(to=hung)
    assert decision.outcome is Outcome.LATE_REPLY
    assert d.state is not None
    assert d.state.status is SagaStatus.COMPENSATING
    assert d.compensations() == ["s1"]


def test_stale_timer_changes_nothing() -> None:
    d = Driver(chain(2))
    d.start()
    timer = d.timers[-1]
    d.advance(5)
    d.reply()  # s1 now runs until T0 + 15 s
    d.now = timer.due_at + timedelta(seconds=1)
    before = d.state
    decision = d.apply(Wakeup(timer))
    assert decision.outcome is Outcome.STALE_TIMER
    assert not decision.changed
    assert decision.state is before


def test_early_timer_is_rearmed_for_its_due_time() -> None:
    d = Driver(chain(1))
    d.start()
    timer = d.timers[-1]
    d.advance(3)
    decision = d.apply(Wakeup(timer))
    assert decision.outcome is Outcome.REARMED
    rearmed = d.timers[-1]
    assert rearmed.due_at == timer.due_at
    assert d.state is not None
    assert d.state.status is SagaStatus.STARTED


def test_nothing_is_sent_after_the_saga_completed() -> None:
    d = Driver(chain(2))
    d.start()
    first = d.last
    d.reply()
    d.reply()
    for event_decision in (d.reply(to=first), d.reply(ReplyStatus.FAILED, to=first)):
        assert event_decision.commands == ()
    d.advance(3600)
    decision = d.apply(Wakeup())
    assert decision.effects == ()


def test_compensation_is_retried_then_parks_the_saga_as_stuck() -> None:
    d = Driver(chain(2, compensation_retry=RetryPolicy(max_attempts=3, retry_timeouts=True)))
    d.start()
    d.reply()
    d.reply(ReplyStatus.FAILED)
    assert d.compensations() == ["s0"]
    d.reply(ReplyStatus.ERROR)
    assert d.state is not None
    assert d.state.steps[0].status is StepStatus.COMPENSATION_RETRY_SCHEDULED
    d.fire_next()
    assert d.last.attempt == 2
    assert d.last.direction is Direction.COMPENSATION
    d.fire_next()  # the second compensation attempt times out
    d.fire_next()
    d.reply(ReplyStatus.ERROR)  # third failure: the policy is spent
    assert d.state.status is SagaStatus.STUCK
    assert d.state.steps[0].status is StepStatus.COMPENSATION_FAILED
    assert d.state.next_due_at is None
    assert d.state.history[-1].event is EventName.SAGA_STUCK
    sent = len(d.sent)
    d.advance(86400)
    assert d.apply(Wakeup()).effects == ()
    assert len(d.sent) == sent

    d.apply(OperatorRetry())
    assert d.state.status is SagaStatus.COMPENSATING
    assert d.last.direction is Direction.COMPENSATION
    assert d.last.attempt == 4
    d.reply()
    assert d.state.status is SagaStatus.FAILED


def test_a_compensation_refused_for_business_reasons_parks_at_once() -> None:
    d = Driver(chain(2))
    d.start()
    d.reply()
    d.reply(ReplyStatus.FAILED)
    d.reply(ReplyStatus.FAILED)
    assert d.state is not None
    assert d.state.status is SagaStatus.STUCK


def test_operator_resolve_marks_the_stuck_compensation_done_and_carries_on() -> None:
    d = Driver(chain(3))
    d.start()
    d.reply()
    d.reply()
    d.reply(ReplyStatus.FAILED)
    d.reply(ReplyStatus.FAILED)  # s1's compensation refuses
    assert d.state is not None
    assert d.state.status is SagaStatus.STUCK
    d.apply(OperatorResolve("refunded by hand, ticket 42"))
    assert d.state.steps[1].status is StepStatus.COMPENSATED
    assert d.compensations() == ["s1", "s0"]
    d.reply()
    assert d.state.status is SagaStatus.FAILED


def test_operator_abort_compensates_the_in_flight_step_and_the_earlier_ones() -> None:
    d = Driver(chain(4))
    d.start()
    d.reply()
    d.reply()
    d.apply(OperatorAbort("customer cancelled"))
    assert d.state is not None
    assert d.state.status is SagaStatus.COMPENSATING
    assert d.state.failure_reason == "customer cancelled"
    while d.state.status is SagaStatus.COMPENSATING:
        d.reply()
    assert d.compensations() == ["s2", "s1", "s0"]


@pytest.mark.parametrize("situation", ["completed", "compensating", "stuck"])
def test_operator_abort_is_refused_when_it_cannot_apply(situation: str) -> None:
    d = Driver(chain(2))
    d.start()
    if situation == "completed":
        d.reply()
        d.reply()
    else:
        d.reply()
        d.reply(ReplyStatus.FAILED)
        if situation == "stuck":
            d.reply(ReplyStatus.FAILED)
    with pytest.raises(ActionRefused):
        d.apply(OperatorAbort())


def test_operator_retry_is_refused_unless_stuck() -> None:
    d = Driver(chain(2))
    d.start()
    with pytest.raises(ActionRefused, match="only a stuck saga"):
        d.apply(OperatorRetry())


def test_past_the_pivot_the_saga_only_goes_forward() -> None:
    d = Driver(chain(4, pivot_at=1, retriable_from=2))
    d.start()
    d.reply()
    d.reply()  # the pivot completes
    with pytest.raises(ActionRefused, match="point of no return"):
        d.apply(OperatorAbort())
    d.reply(ReplyStatus.FAILED)  # s2 is retriable: even a refusal is retried
    assert d.state is not None
    assert d.state.status is SagaStatus.PENDING
    d.fire_next()  # attempt 2 sent
    d.fire_next()  # ... times out, and a retriable step retries timeouts too
    d.fire_next()  # attempt 3 sent
    assert d.last.step == "s2"
    assert d.last.attempt == 3
    d.reply()
    d.reply()
    assert d.state.status is SagaStatus.COMPLETED
    assert d.compensations() == []


def test_abort_is_refused_while_the_pivot_is_in_flight() -> None:
    d = Driver(chain(3, pivot_at=1, retriable_from=2))
    d.start()
    d.reply()
    with pytest.raises(ActionRefused, match="pivot step 's1'"):
        d.apply(OperatorAbort())


def test_a_failing_pivot_compensates_the_steps_before_it() -> None:
    d = Driver(chain(4, pivot_at=2, retriable_from=3))
    d.start()
    d.reply()
    d.reply()
    d.reply(ReplyStatus.FAILED)
    while d.state and d.state.status is SagaStatus.COMPENSATING:
        d.reply()
    assert d.compensations() == ["s1", "s0"]


def test_the_deadline_rolls_back_a_saga_before_its_point_of_no_return() -> None:
    d = Driver(chain(3, timeout=600, deadline=60))
    d.start()
    d.reply()
    d.fire_next()  # the deadline is due before s1's timeout
    assert d.state is not None
    assert d.state.status is SagaStatus.COMPENSATING
    assert "deadline" in (d.state.failure_reason or "")
    while d.state.status is SagaStatus.COMPENSATING:
        d.reply()
    assert d.compensations() == ["s1", "s0"]


def test_the_deadline_no_longer_applies_past_the_pivot() -> None:
    d = Driver(chain(3, timeout=600, deadline=60, pivot_at=1, retriable_from=2))
    d.start()
    d.reply()
    d.reply()  # pivot completes: the deadline is dropped
    assert d.state is not None
    assert d.state.deadline_at is None
    d.advance(120)
    d.apply(Wakeup())
    assert d.state.status is SagaStatus.STARTED
    d.reply()
    assert d.state.status is SagaStatus.COMPLETED


def test_invalid_result_is_an_error_that_is_retried() -> None:
    d = Driver(order_fulfillment)
    from orchestrator.engine import start_saga

    d._record(start_saga(order_fulfillment, "o-1", ORDER_1, d.now))
    d.reply(result={"wrong": "shape"})
    assert d.state is not None
    assert d.state.steps[0].status is StepStatus.RETRY_SCHEDULED
    assert d.state.steps[0].error is not None
    assert d.state.steps[0].error.type == "InvalidResult"


def test_history_stays_bounded_and_keeps_its_first_entry() -> None:
    d = Driver(chain(2))
    d.start()
    first = d.last
    d.reply()
    for _ in range(500):
        d.reply(to=first)
    assert d.state is not None
    assert len(d.state.history) == 200
    assert d.state.history[0].event is EventName.SAGA_STARTED
    # SagaStarted, s0 started and completed, s1 started, then 500 late replies
    assert len(d.state.history) + d.state.history_dropped == 504
    # event ids stay unique and increasing even after dropping
    ids = [
        int(e.event.event_id.rsplit(":", 1)[1])
        for dec in d.decisions
        for e in dec.effects
        if not isinstance(e, SendCommand) and hasattr(e, "event")
    ]
    assert ids == sorted(ids)
    assert len(ids) == len(set(ids))


def test_a_deadline_during_the_pivot_is_dropped_and_not_fired_again() -> None:
    # Regression (found by the property tests): the deadline was cleared in memory but the
    # decision looked unchanged, so the cleared deadline was never saved and every sweep
    # fired it again.
    d = Driver(chain(2, pivot_at=0, retriable_from=1, deadline=5))
    d.start()
    d.advance(5)
    decision = d.apply(Wakeup())
    assert decision.changed
    assert decision.state.deadline_at is None
    assert decision.state.next_due_at is not None
    assert decision.state.next_due_at > d.now
    assert decision.state.status is SagaStatus.STARTED  # the pivot still decides
