"""A daemon redeployed on a changed app while sagas are in flight, with real processes.

Sagas of v1 (the example order saga) are held at a slow payment step when the daemon is
restarted on an app that only has v2 (the confirmation step removed): the daemon stays ready,
nothing is parked, and the sagas wait visibly with their replies kept. Restarted again with
both versions, they finish on v1 (confirmation sent), while new sagas run on v2.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest

from orchestrator.processes import SagaProcesses
from orchestrator.state import SagaStatus
from orchestrator.store import SagaFilter
from orchestrator.stores import open_store
from plumbing.rabbitmq import RabbitTransport
from plumbing.topology import QueuePolicy, orchestrator_topology
from tests.e2e.test_order_saga_e2e import SERVICES, environment, orders, parked_reasons, send_starts

pytestmark = [
    pytest.mark.slow,
    pytest.mark.rabbitmq,
    pytest.mark.postgres,
    pytest.mark.timeout(600),
]

# Payment takes this long: the daemon is redeployed meanwhile. It must outlast sending the 20
# starts, their first steps and a redeploy (1-2 s on an idle machine, 10x that loaded), or a
# saga could complete on v1 before the redeploy; and stay below the 60 s step timeout.
SLOW = "slow:30"
COUNT = 20


async def wait_for(condition: Callable[[], Awaitable[bool]], within: float = 120) -> None:
    """Poll until ``condition()`` holds (each poll reads the store)."""
    async with asyncio.timeout(within):
        while not await condition():  # noqa: ASYNC110 - the store has no change feed to await
            await asyncio.sleep(0.3)


async def test_a_redeploy_without_v1_holds_its_sagas_and_one_with_it_finishes_them(
    vhost_url: str, database_url: str
) -> None:
    env = environment(vhost_url, database_url, timeout=60)
    processes = SagaProcesses("examples.order_fulfillment:app", SERVICES, env)
    store = open_store(database_url)
    transport = RabbitTransport(vhost_url)
    work = [
        (f"v1-{n:02d}", scenario, {**data, "order_id": f"v1-{n:02d}", "simulate": {}})
        for n, (_, scenario, data) in enumerate(orders(COUNT))
    ]
    for _, _, data in work:
        data["simulate"] = {"process_payment": SLOW}
    daemon = processes.orchestrator
    try:
        await processes.start()
        await transport.declare(orchestrator_topology((), QueuePolicy()))
        await send_starts(transport, work)

        async def all_at_payment() -> bool:
            states = [await store.load(order_id) for order_id, _, _ in work]
            return all(
                record is not None and record.state.step("process_payment").attempt == 1
                for record in states
            )

        await wait_for(all_at_payment)
        await daemon.stop()
        daemon.args = ("orchestrator", "--app", "tests.e2e.versioned_apps:v2_only")
        # v2 has no send_confirmation: a timeout override for it would be refused at start-up.
        timeouts = json.loads(daemon.env["SAGA_STEP_TIMEOUTS"])
        del timeouts["order_fulfillment.send_confirmation"]
        daemon.env = {**daemon.env, "SAGA_STEP_TIMEOUTS": json.dumps(timeouts)}
        await daemon.start()
        await daemon.wait_ready()

        async def all_held() -> bool:
            held = await store.find(SagaFilter(held=True, limit=COUNT + 1))
            return len(held) == COUNT

        await wait_for(all_held)
        held = await store.find(SagaFilter(held=True, limit=COUNT + 1))
        for item in held:
            assert item.hold is not None
            assert item.hold.waiting_for is not None
            assert "no definition order_fulfillment v1" in item.hold.reason
            assert item.state.status is SagaStatus.STARTED
        await daemon.wait_ready()  # still ready: nothing crashed
        assert daemon.process is not None
        assert daemon.process.returncode is None

        await daemon.stop()
        daemon.args = ("orchestrator", "--app", "tests.e2e.versioned_apps:both")
        await daemon.start()
        await daemon.wait_ready()
        fresh = [("v2-00", work[0][1], {**work[0][2], "order_id": "v2-00", "simulate": {}})]
        await send_starts(transport, fresh)

        async def all_done() -> bool:
            counts = await store.count_by_status()
            return counts.get(("order_fulfillment", "completed"), 0) == COUNT + 1

        await wait_for(all_done, within=240)
        for order_id, _, _ in work:
            record = await store.load(order_id)
            assert record is not None
            assert record.hold is None
            assert record.state.definition_version == 1
            assert record.state.step("send_confirmation").status.value == "completed"
        new = await store.load("v2-00")
        assert new is not None
        assert new.state.definition_version == 2
        assert [step.name for step in new.state.steps] == [
            "reserve_inventory",
            "process_payment",
            "create_shipment",
        ]
        assert await parked_reasons(vhost_url) == []
    finally:
        await processes.stop()
        await transport.close()
        await store.close()
