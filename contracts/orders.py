"""Contracts of the example order-fulfillment saga (``examples.order_fulfillment``).

Commands are built by the orchestrator from the saga context: the order data plus the results
of earlier steps, matched by field name. That is how ``reservation_id`` and ``payment_id`` reach
the compensations that need them. A compensation's own step may have timed out before it
answered, so ids from that step are optional there: a compensation must also work by order id.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator

from contracts.messages import Command

SIMULATION_PATTERN = re.compile(r"^(fail|hang|error:\d{1,3}|slow:\d+(\.\d+)?)$")
"""Allowed values of the ``simulate`` mapping: fail, hang, error:N, slow:SECONDS."""

Simulation = Annotated[dict[str, str], Field(default_factory=dict)]


def _check_simulation(value: dict[str, str]) -> dict[str, str]:
    for name, behaviour in value.items():
        if not SIMULATION_PATTERN.match(behaviour):
            raise ValueError(
                f"simulate[{name!r}] is {behaviour!r}; use fail, hang, error:N or slow:SECONDS"
            )
    return value


class OrderItem(BaseModel):
    """One line of an order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sku: str = Field(min_length=1)
    quantity: int = Field(gt=0)
    unit_price: Decimal = Field(ge=0, decimal_places=2)


class OrderData(BaseModel):
    """The data an order-fulfillment saga starts with."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    order_id: str = Field(min_length=1)
    customer_id: str = Field(min_length=1)
    items: list[OrderItem] = Field(min_length=1)
    payment_method: str = Field(min_length=1)
    shipping_address: str = Field(min_length=1)
    simulate: Simulation
    """Demo and test hook: behaviour per step or compensation name, honoured by the examples."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def amount(self) -> Decimal:
        """The order total charged by ``process_payment``."""
        return sum((item.unit_price * item.quantity for item in self.items), Decimal("0"))

    _check = field_validator("simulate")(_check_simulation)


class OrderCommand(Command):
    """Fields every order command carries."""

    order_id: str
    simulate: Simulation


class ReserveInventory(OrderCommand):
    """Reserve stock for every item of the order."""

    items: list[OrderItem]


class InventoryReserved(BaseModel):
    """Stock is held under ``reservation_id``."""

    reservation_id: str


class ReleaseInventory(OrderCommand):
    """Compensation of ``reserve_inventory``: give the stock back."""

    reservation_id: str | None = None


class ProcessPayment(OrderCommand):
    """Charge the customer for the order."""

    customer_id: str
    amount: Decimal
    payment_method: str


class PaymentProcessed(BaseModel):
    """The customer was charged under ``payment_id``."""

    payment_id: str
    amount: Decimal


class RefundPayment(OrderCommand):
    """Compensation of ``process_payment``: refund the charge."""

    payment_id: str | None = None
    amount: Decimal


class CreateShipment(OrderCommand):
    """Book a shipment for the reserved stock."""

    items: list[OrderItem]
    shipping_address: str
    reservation_id: str


class ShipmentCreated(BaseModel):
    """A shipment was booked."""

    shipment_id: str
    tracking_number: str


class CancelShipment(OrderCommand):
    """Compensation of ``create_shipment``: cancel the booking."""

    shipment_id: str | None = None


class SendConfirmation(OrderCommand):
    """Tell the customer the order is on its way."""

    customer_id: str
    payment_id: str
    shipment_id: str
    tracking_number: str


class ConfirmationSent(BaseModel):
    """The confirmation went out."""

    notification_id: str
