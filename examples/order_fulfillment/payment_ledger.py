"""The payment service with its effect in the outcome's transaction: exactly-once charges.

The same commands as ``services.payment``, but each charge and refund is a row in a
``payments`` table written through ``ctx.transaction``: the transaction in which the SDK also
records the command's outcome. A crash anywhere leaves either both (the redelivered command is
answered from the stored outcome) or neither (it runs again); a duplicate never charges twice.
Run it with a PostgreSQL idempotency store::

    SAGA_IDEMPOTENCY_URL=postgresql://... saga participant \\
        --app examples.order_fulfillment.payment_ledger:payment

Without one (tests, the demo), ``ctx.transaction`` is None and the rows go to a dict.

What the transaction cannot cover is only at least once: a call to a real payment gateway
would pass ``ctx.idempotency_key`` so that the gateway drops a repeat.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from contracts.orders import PaymentProcessed, ProcessPayment, RefundPayment
from examples.order_fulfillment.services import simulate
from participants import CommandContext, Participant

SCHEMA = """
    CREATE TABLE IF NOT EXISTS payments (
        order_id    text NOT NULL,
        kind        text NOT NULL CHECK (kind IN ('charge', 'refund')),
        amount      numeric(12, 2) NOT NULL,
        request_key text NOT NULL,
        at          timestamptz NOT NULL DEFAULT now()
    )
"""
"""The ledger table (no unique key on purpose: exactly once comes from the transaction)."""

_SCHEMA_LOCK = 0x5A6A_0102  # serialises the CREATE TABLE of replicas starting together

payment = Participant("payment")
in_memory: dict[str, list[tuple[str, Decimal]]] = {}
"""The ledger when there is no database transaction (tests and the demo)."""

_schema_ready = False


async def _record(ctx: CommandContext, order_id: str, kind: str, amount: Decimal) -> None:
    """One ledger row, in the transaction that will also record the outcome."""
    global _schema_ready  # noqa: PLW0603 - once per process, not per command
    connection: Any = ctx.transaction
    if connection is None:
        in_memory.setdefault(order_id, []).append((kind, amount))
        return
    if not _schema_ready:
        await connection.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
        await connection.execute(SCHEMA)
        _schema_ready = True
    await connection.execute(
        "INSERT INTO payments (order_id, kind, amount, request_key) VALUES ($1, $2, $3, $4)",
        order_id,
        kind,
        amount,
        ctx.idempotency_key,
    )


@payment.handler(transactional=True)
async def process_payment(cmd: ProcessPayment, ctx: CommandContext) -> PaymentProcessed:
    """Charge the customer: a ``charge`` row, exactly once."""
    await simulate(cmd, ctx, refusal="PaymentDeclined")
    amount = Decimal(cmd.amount)
    await _record(ctx, cmd.order_id, "charge", amount)
    return PaymentProcessed(payment_id=f"pay-{cmd.order_id}", amount=amount)


@payment.handler(transactional=True)
async def refund_payment(cmd: RefundPayment, ctx: CommandContext) -> None:
    """Refund the charge: a ``refund`` row, exactly once."""
    await simulate(cmd, ctx)
    await _record(ctx, cmd.order_id, "refund", Decimal(cmd.amount))
