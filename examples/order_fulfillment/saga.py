"""The order-fulfillment saga: reserve stock, charge, ship, confirm; undo in reverse on failure."""

from __future__ import annotations

from contracts.orders import (
    CancelShipment,
    ConfirmationSent,
    CreateShipment,
    InventoryReserved,
    OrderData,
    PaymentProcessed,
    ProcessPayment,
    RefundPayment,
    ReleaseInventory,
    ReserveInventory,
    SendConfirmation,
    ShipmentCreated,
)
from orchestrator.definition import App, Saga, Step, StepKind

order_fulfillment = Saga(
    "order_fulfillment",
    data=OrderData,
    steps=[
        Step(
            "reserve_inventory",
            service="inventory",
            command=ReserveInventory,
            result=InventoryReserved,
            compensation=ReleaseInventory,
            timeout=120,
        ),
        Step(
            "process_payment",
            service="payment",
            command=ProcessPayment,
            result=PaymentProcessed,
            compensation=RefundPayment,
            timeout=60,
        ),
        Step(
            "create_shipment",
            service="shipping",
            command=CreateShipment,
            result=ShipmentCreated,
            compensation=CancelShipment,
            timeout=900,
        ),
        # Once the order has shipped there is no going back: the confirmation is retried
        # until it goes out.
        Step(
            "send_confirmation",
            service="notification",
            command=SendConfirmation,
            result=ConfirmationSent,
            kind=StepKind.RETRIABLE,
            timeout=120,
        ),
    ],
)
"""Timeouts: 2 min, 1 min, 15 min, 2 min (override with ``SAGA_STEP_TIMEOUTS``)."""

app = App([order_fulfillment])
"""The orchestrator application: ``saga orchestrator --app examples.order_fulfillment:app``."""
