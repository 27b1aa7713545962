"""``saga demo``: the order saga end to end, three ways it can go.

1. ``order-1001`` completes: stock reserved, card charged, shipment booked, customer told.
2. ``order-1002`` is declined at payment: the reserved stock is released.
3. ``order-1003``'s shipment never answers: after its 15-minute timeout the shipment is
   cancelled (it may have been booked), the payment refunded and the stock released, in that
   order.

Without ``SAGA_AMQP_URL`` everything runs in this process on the embedded in-memory broker and
store with virtual time, so the fifteen minutes pass in milliseconds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from contracts.orders import OrderData
from orchestrator.state import SagaState

DEMO_ORDERS: tuple[OrderData, ...] = (
    OrderData.model_validate(
        {
            "order_id": "order-1001",
            "customer_id": "cust-42",
            "items": [
                {"sku": "KB-MECH-01", "quantity": 1, "unit_price": "89.00"},
                {"sku": "USB-C-2M", "quantity": 2, "unit_price": "9.50"},
            ],
            "payment_method": "card:visa:4242",
            "shipping_address": "12 Harbour Road, Leith",
        }
    ),
    OrderData.model_validate(
        {
            "order_id": "order-1002",
            "customer_id": "cust-77",
            "items": [{"sku": "MON-27-4K", "quantity": 1, "unit_price": "349.00"}],
            "payment_method": "card:mastercard:0005",
            "shipping_address": "3 Rue des Lilas, Lyon",
            "simulate": {"process_payment": "fail"},
        }
    ),
    OrderData.model_validate(
        {
            "order_id": "order-1003",
            "customer_id": "cust-13",
            "items": [{"sku": "CHAIR-ERGO", "quantity": 1, "unit_price": "420.00"}],
            "payment_method": "card:amex:0001",
            "shipping_address": "88 Elm Street, Springfield",
            "simulate": {"create_shipment": "hang"},
        }
    ),
)
"""The three demo orders and what each one simulates."""


async def run_embedded() -> list[SagaState]:
    """Run the demo orders on the in-memory broker and store with virtual time."""
    from examples.order_fulfillment import app, inventory, notification, payment, shipping
    from orchestrator.testing import SagaHarness

    start = datetime.now(UTC).replace(microsecond=0)
    async with SagaHarness(app, start=start).mount(inventory, payment, shipping, notification) as h:
        for order in DEMO_ORDERS:
            await h.start("order_fulfillment", order.order_id, order)
        # Long enough for the slowest timeout (create_shipment: 15 minutes) and what follows.
        await h.advance(timedelta(minutes=20).total_seconds())
        return [await h.saga(order.order_id) for order in DEMO_ORDERS]


def render_json(states: Sequence[SagaState], out: TextIO) -> None:
    """``{"sagas": [...]}``, each saga in the shape shared with ``saga show --json``."""
    json.dump({"sagas": [state.summary() for state in states]}, out, indent=2)
    out.write("\n")


def render_text(states: Sequence[SagaState], out: TextIO) -> None:
    """Each saga's timeline, for a human."""
    for index, state in enumerate(states):
        if index:
            out.write("\n")
        render_timeline(state, out)


def render_timeline(state: SagaState, out: TextIO) -> None:
    """One saga: header, step statuses, then its history with offsets from the start."""
    took = (state.finished_at or state.updated_at) - state.created_at
    out.write(f"{state.saga_id}  {state.saga_type}  {state.status.value.upper()}  ({span(took)})\n")
    if state.failure_reason:
        out.write(f"  reason: {state.failure_reason}\n")
    out.write(f"  steps:  {steps_line(state)}\n")
    if state.history_dropped:
        out.write(f"  ({state.history_dropped} older history entries dropped)\n")
    for entry in state.history:
        offset = "+" + span(entry.at - state.created_at)
        subject = entry.step or ""
        if entry.attempt is not None:
            subject += f" #{entry.attempt}"
        line = f"  {offset:>9}  {entry.event.value:<26} {subject:<24}"
        if entry.detail:
            line += f" {entry.detail}"
        out.write(line.rstrip() + "\n")


def steps_line(state: SagaState) -> str:
    """Each step and its status in order; a parallel group's members in brackets, joined
    by ``+``: ``[reserve_inventory=completed + authorize_payment=running]  ship=not_started``."""
    parts: list[str] = []
    members: list[str] = []
    for index, step in enumerate(state.steps):
        shown = f"{step.name}={step.status.value}"
        if step.group is None:
            parts.append(shown)
            continue
        members.append(shown)
        following = state.steps[index + 1] if index + 1 < len(state.steps) else None
        if following is None or following.group != step.group:
            parts.append("[" + " + ".join(members) + "]")
            members = []
    return "  ".join(parts)


def span(delta: timedelta) -> str:
    """A duration for a human: ``4.2s``, ``15m00s``."""
    seconds = delta.total_seconds()
    if seconds < 60:
        return f"{seconds:.3g}s" if seconds else "0s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s"


def summaries(states: Sequence[SagaState]) -> list[dict[str, Any]]:
    """The JSON summaries of ``states``."""
    return [state.summary() for state in states]
