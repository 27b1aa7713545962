"""The four participant services of the order saga, with in-process ledgers.

Each honours the order's ``simulate`` mapping for the command it is handling (keyed by step
or compensation name): ``fail`` refuses, ``hang`` never answers, ``error:N`` errors on the
first N attempts and then succeeds, ``slow:SECONDS`` takes that long. Ids are derived from the
order id, so a retried command produces the same ids.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from decimal import Decimal

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
from participants import CommandContext, NoReply, Participant, ParticipantError


async def simulate(
    command: OrderCommand, ctx: CommandContext, refusal: str = "SimulatedFailure"
) -> None:
    """Act out the behaviour the order asks for this command, if any."""
    behaviour = command.simulate.get(type(command).name())
    if behaviour is None:
        return
    kind, _, argument = behaviour.partition(":")
    if kind == "fail":
        raise ParticipantError(f"simulated refusal of {type(command).name()}", type=refusal)
    if kind == "hang":
        raise NoReply
    if kind == "error" and ctx.attempt <= int(argument):
        raise ParticipantError(
            f"simulated transient error {ctx.attempt} of {argument}",
            type="SimulatedError",
            non_retryable=False,
        )
    if kind == "slow":
        await ctx.sleep(float(argument))


@dataclass
class Ledger:
    """What a service has done, by order id (for tests and the e2e checker)."""

    applied: dict[str, str] = field(default_factory=dict)
    undone: set[str] = field(default_factory=set)


inventory = Participant("inventory")
inventory_ledger = Ledger()


@inventory.handler
async def reserve_inventory(cmd: ReserveInventory, ctx: CommandContext) -> InventoryReserved:
    """Hold stock for the order."""
    await simulate(cmd, ctx, refusal="OutOfStock")
    reservation_id = f"res-{cmd.order_id}"
    inventory_ledger.applied[cmd.order_id] = reservation_id
    return InventoryReserved(reservation_id=reservation_id)


@inventory.handler
async def release_inventory(cmd: ReleaseInventory, ctx: CommandContext) -> None:
    """Give the stock back (nothing to do if it was never reserved)."""
    await simulate(cmd, ctx)
    if cmd.order_id in inventory_ledger.applied:
        inventory_ledger.undone.add(cmd.order_id)


payment = Participant("payment")
payment_ledger = Ledger()


@payment.handler
async def process_payment(cmd: ProcessPayment, ctx: CommandContext) -> PaymentProcessed:
    """Charge the customer."""
    await simulate(cmd, ctx, refusal="PaymentDeclined")
    payment_id = f"pay-{cmd.order_id}"
    payment_ledger.applied[cmd.order_id] = payment_id
    return PaymentProcessed(payment_id=payment_id, amount=Decimal(cmd.amount))


@payment.handler
async def refund_payment(cmd: RefundPayment, ctx: CommandContext) -> None:
    """Refund the charge (nothing to do if there was none)."""
    await simulate(cmd, ctx)
    if cmd.order_id in payment_ledger.applied:
        payment_ledger.undone.add(cmd.order_id)


shipping = Participant("shipping")
shipping_ledger = Ledger()


@shipping.handler
async def create_shipment(cmd: CreateShipment, ctx: CommandContext) -> ShipmentCreated:
    """Book the shipment."""
    await simulate(cmd, ctx, refusal="AddressRejected")
    shipment_id = f"shp-{cmd.order_id}"
    shipping_ledger.applied[cmd.order_id] = shipment_id
    return ShipmentCreated(
        shipment_id=shipment_id, tracking_number=f"TRK{zlib.crc32(cmd.order_id.encode()):010d}"
    )


@shipping.handler
async def cancel_shipment(cmd: CancelShipment, ctx: CommandContext) -> None:
    """Cancel the booking (nothing to do if there was none)."""
    await simulate(cmd, ctx)
    if cmd.order_id in shipping_ledger.applied:
        shipping_ledger.undone.add(cmd.order_id)


notification = Participant("notification")
notification_ledger = Ledger()


@notification.handler
async def send_confirmation(cmd: SendConfirmation, ctx: CommandContext) -> ConfirmationSent:
    """Email the customer."""
    await simulate(cmd, ctx)
    notification_id = f"ntf-{cmd.order_id}"
    notification_ledger.applied[cmd.order_id] = notification_id
    return ConfirmationSent(notification_id=notification_id)
