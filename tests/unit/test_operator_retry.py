"""An operator's retry of a refused compensation is a new attempt generation that can succeed.

The participant stored its refusal under the compensation's idempotency key; a retry with the
same key would only replay that refusal, and the saga would go straight back to stuck.
"""

from __future__ import annotations

from contracts.orders import InventoryReserved, ReleaseInventory, ReserveInventory
from examples.order_fulfillment import app
from orchestrator.state import SagaStatus
from orchestrator.testing import SagaHarness, fail
from participants import Participant, ParticipantError
from tests.unit.test_harness import ORDER


def inventory_that_refuses_once() -> tuple[Participant, list[str]]:
    """An inventory service whose first release is refused (e.g. the warehouse was down)."""
    inventory = Participant("inventory")
    releases: list[str] = []

    @inventory.handler
    async def reserve_inventory(cmd: ReserveInventory) -> InventoryReserved:
        return InventoryReserved(reservation_id=f"res-{cmd.order_id}")

    @inventory.handler
    async def release_inventory(cmd: ReleaseInventory) -> None:
        releases.append(cmd.order_id)
        if len(releases) == 1:
            raise ParticipantError("warehouse system down", type="WarehouseDown")

    return inventory, releases


async def test_a_retried_compensation_runs_again_under_a_new_key_and_the_saga_ends() -> None:
    inventory, releases = inventory_that_refuses_once()
    async with SagaHarness(app).mount(inventory) as h:
        h.participant("payment").on("process_payment", fail("card declined"))
        state = await h.start("order_fulfillment", "o-1", ORDER)
        assert state.status is SagaStatus.STUCK
        state = await h.retry("o-1")
        assert state.status is SagaStatus.FAILED
        assert releases == ["o-1", "o-1"]  # the handler ran again instead of replaying
        keys = [c.idempotency_key for c in h.commands("o-1") if c.command == "release_inventory"]
        assert keys == ["comp:o-1:reserve_inventory", "comp.2:o-1:reserve_inventory"]
        started = [e for e in state.history if e.detail and "generation 2" in e.detail]
        assert len(started) == 1
