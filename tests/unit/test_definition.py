"""Invalid saga definitions fail when they are built, with a sentence that says what is wrong."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import BaseModel

from contracts.messages import Command
from contracts.orders import OrderData, ProcessPayment, RefundPayment
from examples.order_fulfillment import app, order_fulfillment
from orchestrator.definition import App, RetryPolicy, Saga, Step, StepKind
from plumbing.errors import DefinitionError
from tests.unit.driver import command

DO, UNDO = command("do_it"), command("undo_it")


def step(name: str = "a", **overrides: object) -> Step:
    fields: dict[str, object] = {"service": "svc", "command": DO, "compensation": UNDO}
    fields.update(overrides)
    return Step(name, **fields)  # type: ignore[arg-type]


def test_the_example_saga_is_valid_and_infers_kinds() -> None:
    kinds = [s.kind for s in order_fulfillment.steps]
    assert kinds == [StepKind.COMPENSATABLE] * 3 + [StepKind.RETRIABLE]
    assert [s.timeout for s in order_fulfillment.steps] == [
        timedelta(minutes=2),
        timedelta(minutes=1),
        timedelta(minutes=15),
        timedelta(minutes=2),
    ]
    assert app.services == {"inventory", "payment", "shipping", "notification"}


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Saga("s", steps=[step("a"), step("a")]), "two steps named 'a'"),
        (lambda: Saga("s", steps=[]), "has no steps"),
        (lambda: step(compensation=None), "has no compensation"),
        (
            lambda: step(compensation=None, kind=StepKind.COMPENSATABLE),
            "compensatable but has no compensation",
        ),
        (lambda: step(kind=StepKind.PIVOT), "cannot have a compensation"),
        (
            lambda: Saga("s", steps=[step("p", compensation=None, kind=StepKind.PIVOT), step("b")]),
            "comes after 'p', the point of no return",
        ),
        (
            lambda: Saga(
                "s", steps=[step("r", compensation=None, kind=StepKind.RETRIABLE), step("b")]
            ),
            "only retriable steps may follow",
        ),
        (
            lambda: step(compensation=None, kind=StepKind.RETRIABLE, retry=RetryPolicy()),
            "must never give up",
        ),
        (lambda: step(timeout=0), "timers need at least 1s"),
        (lambda: step(timeout=-5), "timers need at least 1s"),
        (lambda: step(timeout=timedelta(days=31)), "longest supported is 30 days"),
        (lambda: step(timeout="10"), "must be a number of seconds"),
        (lambda: step(compensation_timeout=0.5), "timers need at least 1s"),
        (lambda: RetryPolicy(max_attempts=0), "at least 1"),
        (lambda: RetryPolicy(multiplier=0.5), "multiplier"),
        (lambda: RetryPolicy(jitter=1.5), "jitter"),
        (lambda: RetryPolicy(initial_backoff=10, max_backoff=5), "shorter than initial_backoff"),
        (lambda: RetryPolicy(initial_backoff=0), "must be positive"),
        (lambda: step("Bad Name"), "lower_snake_case"),
        (lambda: step(service="Payments"), "lower_snake_case"),
        (lambda: step(command=dict), "contracts.Command subclass"),
        (lambda: Saga("s", steps=[step()], deadline=0), "timers need at least 1s"),
        (lambda: App([order_fulfillment, order_fulfillment]), "two sagas are named"),
    ],
)
def test_invalid_definitions_are_refused(build: object, message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        build()  # type: ignore[operator]


def test_a_command_field_nobody_provides_is_refused() -> None:
    class Data(BaseModel):
        order_id: str

    with pytest.raises(DefinitionError, match="ProcessPayment needs amount, customer_id"):
        Saga(
            "pay",
            data=Data,
            steps=[
                Step("pay", service="payment", command=ProcessPayment, compensation=RefundPayment)
            ],
        )


def test_fields_may_come_from_earlier_results() -> None:
    class Data(BaseModel):
        order_id: str

    class Quote(BaseModel):
        customer_id: str
        amount: str
        payment_method: str

    class GetQuote(Command):
        order_id: str

    Saga(
        "pay",
        data=Data,
        steps=[
            Step("quote", service="pricing", command=GetQuote, result=Quote, compensation=GetQuote),
            Step("pay", service="payment", command=ProcessPayment, compensation=RefundPayment),
        ],
    )


def test_step_timeouts_are_overridden_by_configuration() -> None:
    tuned = app.with_step_timeouts({"order_fulfillment.create_shipment": 5})
    shipment = tuned["order_fulfillment"].step("create_shipment")
    assert shipment.timeout == timedelta(seconds=5)
    assert shipment.compensation_timeout == timedelta(seconds=5)
    assert app["order_fulfillment"].step("create_shipment").timeout == timedelta(minutes=15)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("create_shipment", "must be '<saga_type>.<step>'"),
        ("nope.create_shipment", "must be '<saga_type>.<step>'"),
        ("order_fulfillment.ship", "has no step named 'ship'"),
    ],
)
def test_bad_timeout_overrides_are_refused(key: str, message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        app.with_step_timeouts({key: 5})


def test_order_data_rejects_unknown_simulations() -> None:
    with pytest.raises(ValueError, match="use fail, hang, error:N or slow:SECONDS"):
        OrderData.model_validate(
            {
                "order_id": "o",
                "customer_id": "c",
                "items": [{"sku": "a", "quantity": 1, "unit_price": "1.00"}],
                "payment_method": "card",
                "shipping_address": "x",
                "simulate": {"process_payment": "explode"},
            }
        )
