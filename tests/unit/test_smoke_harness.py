"""The example saga's three demo paths through the harness with the real example services."""

from __future__ import annotations

from examples.order_fulfillment import app, inventory, notification, payment, shipping
from orchestrator.testing import SagaHarness

ORDER = {
    "order_id": "o-1",
    "customer_id": "c-1",
    "items": [{"sku": "SKU-1", "quantity": 2, "unit_price": "12.50"}],
    "payment_method": "card",
    "shipping_address": "1 Main St",
}


async def test_hanging_shipment_is_compensated_in_reverse_order() -> None:
    async with SagaHarness(app).mount(inventory, payment, shipping, notification) as h:
        await h.start(
            "order_fulfillment", "o-1", {**ORDER, "simulate": {"create_shipment": "hang"}}
        )
        await h.advance(minutes=16)
        state = await h.saga("o-1")
        assert state.status == "failed"
        assert h.command_names("o-1") == [
            "reserve_inventory",
            "process_payment",
            "create_shipment",
            "cancel_shipment",
            "refund_payment",
            "release_inventory",
        ]
