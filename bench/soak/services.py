"""The soak's four participant services: the order saga's commands, every real effect a ledger row.

Run as ``saga participant --app bench.soak.services:inventory`` (and ``:payment``,
``:shipping``, ``:notification``) with ``SAGA_IDEMPOTENCY_URL`` naming the soak's PostgreSQL
database, which holds the :data:`LEDGER` table.

Each handler acts out the order's ``simulate`` mapping first (``fail``, ``hang``, ``error:N``,
``slow:S``, as the example services do), then records its effect:

* inventory, payment and shipping are exactly-once services: the ledger row is written in
  ``ctx.transaction``, the transaction that also records the command's outcome, so a SIGKILL
  anywhere leaves both or neither. A double row from them is a bug, whatever was killed.
* notification stands for an e-mail gateway, an effect outside any database transaction: its
  row is committed on a connection of its own before the SDK records the outcome. A process
  killed between the two sends the confirmation again on redelivery, so a double row there is
  expected, but only from a process that was killed (each row names the pid that wrote it).

A compensation writes a row only when there is something to undo (its step's forward row
exists): a step that timed out without acting is compensated by doing nothing.
"""

from __future__ import annotations

import os
import zlib
from decimal import Decimal
from typing import Any

from contracts.orders import (
    CancelShipment,
    ConfirmationSent,
    CreateShipment,
    InventoryReserved,
    OrderCommand,
    PaymentProcessed,
    ProcessPayment,
    RefundPayment,
    ReleaseInventory,
    ReserveInventory,
    SendConfirmation,
    ShipmentCreated,
)
from examples.order_fulfillment.services import simulate
from participants import CommandContext, Participant

LEDGER = "soak_effects"
"""The ledger table: one row per real effect, in the order the effects happened."""

LEDGER_SCHEMA = f"""
    CREATE TABLE IF NOT EXISTS {LEDGER} (
        seq       bigserial PRIMARY KEY,
        saga_id   text NOT NULL,
        step      text NOT NULL,
        direction text NOT NULL CHECK (direction IN ('forward', 'compensation')),
        attempt   integer NOT NULL,
        service   text NOT NULL,
        pid       integer NOT NULL,
        at        timestamptz NOT NULL DEFAULT clock_timestamp()
    )
"""
"""No unique key on purpose: a double effect must show, not be refused by the table."""

inventory = Participant("inventory")
payment = Participant("payment")
shipping = Participant("shipping")
notification = Participant("notification")

_INSERT = (
    f"INSERT INTO {LEDGER} (saga_id, step, direction, attempt, service, pid) "
    "VALUES ($1, $2, $3, $4, $5, $6)"
)
_own_pool: Any = None
"""notification's connection pool, outside the SDK's transactions (opened on first use)."""


async def _record(ctx: CommandContext, service: str) -> None:
    """The effect's ledger row, in the transaction that will also record the outcome."""
    await ctx.transaction.execute(
        _INSERT, ctx.saga_id, ctx.step, ctx.direction.value, ctx.attempt, service, os.getpid()
    )


async def _undo(ctx: CommandContext, service: str) -> None:
    """The compensation's row, if the forward effect it undoes happened."""
    acted = await ctx.transaction.fetchval(
        f"SELECT count(*) FROM {LEDGER} WHERE saga_id = $1 AND step = $2 AND direction = 'forward'",
        ctx.saga_id,
        ctx.step,
    )
    if acted:
        await _record(ctx, service)


@inventory.handler(transactional=True)
async def reserve_inventory(cmd: ReserveInventory, ctx: CommandContext) -> InventoryReserved:
    """Hold stock."""
    await simulate(cmd, ctx, refusal="OutOfStock")
    await _record(ctx, "inventory")
    return InventoryReserved(reservation_id=f"res-{cmd.order_id}")


@inventory.handler(transactional=True)
async def release_inventory(cmd: ReleaseInventory, ctx: CommandContext) -> None:
    """Give the stock back."""
    await simulate(cmd, ctx)
    await _undo(ctx, "inventory")


@payment.handler(transactional=True)
async def process_payment(cmd: ProcessPayment, ctx: CommandContext) -> PaymentProcessed:
    """Charge the customer."""
    await simulate(cmd, ctx, refusal="PaymentDeclined")
    await _record(ctx, "payment")
    return PaymentProcessed(payment_id=f"pay-{cmd.order_id}", amount=Decimal(cmd.amount))


@payment.handler(transactional=True)
async def refund_payment(cmd: RefundPayment, ctx: CommandContext) -> None:
    """Refund the charge."""
    await simulate(cmd, ctx)
    await _undo(ctx, "payment")


@shipping.handler(transactional=True)
async def create_shipment(cmd: CreateShipment, ctx: CommandContext) -> ShipmentCreated:
    """Book the shipment."""
    await simulate(cmd, ctx, refusal="AddressRejected")
    await _record(ctx, "shipping")
    tracking = f"TRK{zlib.crc32(cmd.order_id.encode()):010d}"
    return ShipmentCreated(shipment_id=f"shp-{cmd.order_id}", tracking_number=tracking)


@shipping.handler(transactional=True)
async def cancel_shipment(cmd: CancelShipment, ctx: CommandContext) -> None:
    """Cancel the booking."""
    await simulate(cmd, ctx)
    await _undo(ctx, "shipping")


@notification.handler
async def send_confirmation(cmd: SendConfirmation, ctx: CommandContext) -> ConfirmationSent:
    """E-mail the customer: an effect no transaction can take back (at least once)."""
    await simulate(cmd, ctx)
    await _send_mail(cmd, ctx)
    return ConfirmationSent(notification_id=f"ntf-{cmd.order_id}")


async def _send_mail(cmd: OrderCommand, ctx: CommandContext) -> None:
    """The "mail server": a row committed on a connection outside the SDK's transaction."""
    global _own_pool  # noqa: PLW0603 - one pool per process, opened on first use
    import asyncpg

    if _own_pool is None:
        # Two connections: the service's prefetch is small, and the server's are shared.
        _own_pool = await asyncpg.create_pool(
            os.environ["SAGA_IDEMPOTENCY_URL"], min_size=1, max_size=2
        )
    pid = os.getpid()
    await _own_pool.execute(
        _INSERT, ctx.saga_id, ctx.step, ctx.direction.value, ctx.attempt, "notification", pid
    )
