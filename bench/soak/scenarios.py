"""What the soak's orders simulate, and what must come of each: status and ledger effects.

The outcome of every scenario is independent of timing as long as no outage outlasts a step
timeout (the soak sets 60 s, several times its longest broker restart), so each saga's end is
checked exactly, not statistically.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

STEPS = ("reserve_inventory", "process_payment", "create_shipment", "send_confirmation")
STEP_TIMEOUT = 60.0
"""Seconds; every step and compensation of the soak's order saga."""


@dataclass(frozen=True)
class Scenario:
    """One kind of order: its ``simulate`` mapping and the outcome it must reach."""

    name: str
    simulate: dict[str, str]
    status: str
    """The terminal status: ``completed`` or ``failed`` (stuck ones once an operator resolved
    them)."""
    forward: tuple[str, ...]
    """Steps whose forward effect must be in the ledger, in order."""
    undone: tuple[str, ...]
    """Steps whose compensation effect must be in the ledger, in this (reverse) order."""
    weight: int
    stuck: bool = False
    """Its compensation is refused: it rests ``stuck`` until the soak's operator resolves it."""


_ALL = STEPS
_R, _P, _S = "reserve_inventory", "process_payment", "create_shipment"

SCENARIOS = (
    Scenario("ok", {}, "completed", _ALL, (), weight=30),
    Scenario("slow-payment", {_P: "slow:2"}, "completed", _ALL, (), weight=4),
    Scenario("decline@reserve", {_R: "fail"}, "failed", (), (), weight=4),
    Scenario("decline@payment", {_P: "fail"}, "failed", (_R,), (_R,), weight=6),
    Scenario("decline@shipment", {_S: "fail"}, "failed", (_R, _P), (_P, _R), weight=6),
    Scenario("hang@reserve", {_R: "hang"}, "failed", (), (), weight=2),
    Scenario("hang@payment", {_P: "hang"}, "failed", (_R,), (_R,), weight=2),
    Scenario("hang@shipment", {_S: "hang"}, "failed", (_R, _P), (_P, _R), weight=2),
    Scenario("transient@payment", {_P: "error:2"}, "completed", _ALL, (), weight=6),
    Scenario("transient@shipment-exhausted", {_S: "error:5"}, "failed", (_R, _P), (_P, _R), 4),
    Scenario("transient@confirmation", {"send_confirmation": "error:3"}, "completed", _ALL, (), 4),
    Scenario(
        "refund-transient",
        {_S: "fail", "refund_payment": "error:2"},
        "failed",
        (_R, _P),
        (_P, _R),
        weight=4,
    ),
    Scenario(
        "refund-refused",
        {_S: "fail", "refund_payment": "fail"},
        "failed",
        (_R, _P),
        (_R,),  # the refund is resolved by the operator by hand; the release still runs
        weight=3,
        stuck=True,
    ),
)
BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}


def order(n: int, scenario: Scenario, run: str) -> tuple[str, dict[str, object]]:
    """The saga id and start data of order ``n`` of a run."""
    order_id = f"soak-{run}-{n:06d}-{scenario.name}"
    data: dict[str, object] = {
        "order_id": order_id,
        "customer_id": f"cust-{n % 97}",
        "items": [{"sku": f"SKU-{n % 13}", "quantity": 1 + n % 3, "unit_price": "19.99"}],
        "payment_method": "card",
        "shipping_address": f"{n} Soak Street",
        "simulate": scenario.simulate,
    }
    return order_id, data


def scenario_of(saga_id: str) -> Scenario:
    """The scenario an order id was made for (its last dash-separated part)."""
    return BY_NAME[saga_id.split("-", 3)[3]]


def picker(seed: int) -> random.Random:
    """The random source that draws scenarios by weight (seeded: a run can be replayed)."""
    return random.Random(seed)


def draw(rng: random.Random) -> Scenario:
    """One scenario, by weight."""
    return rng.choices(SCENARIOS, weights=[s.weight for s in SCENARIOS])[0]
