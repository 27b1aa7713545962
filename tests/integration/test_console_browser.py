"""The console page in a real browser: Debian's chromium driven by Playwright.

The orchestrator, the example's payment, shipping and notification services and an inventory
service whose release the test can break and fix all run in this process over RabbitMQ (a
virtual host of the test's own) with the PostgreSQL store; the console serves the page from
the same store and broker. No browser is downloaded: Playwright drives the system's chromium
(``SAGA_TEST_CHROMIUM`` names another binary).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
import pytest

from contracts import names
from contracts.orders import InventoryReserved, ReleaseInventory, ReserveInventory
from examples.order_fulfillment import app, notification, payment, shipping
from orchestrator.console.auth import Access
from orchestrator.console.server import serve_console
from orchestrator.runtime import Orchestrator
from orchestrator.state import SagaStatus
from orchestrator.store import SagaStore
from orchestrator.stores import open_store
from participants import CommandContext, Participant, ParticipantError
from plumbing.rabbitmq import RabbitTransport
from tests.conftest import unavailable
from tests.integration.console_support import BAD_START, eventually, order, queue_depth

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq, pytest.mark.timeout(600)]

WAIT_MS = 60_000
"""How long the page may take to show something, in milliseconds (a loaded machine)."""


def chromium() -> str:
    """The system's chromium binary."""
    path = os.environ.get("SAGA_TEST_CHROMIUM") or shutil.which("chromium")
    if path is None:
        unavailable("chromium", "not installed (Debian package: chromium)")
    return path


@dataclass
class Warehouse:
    """An inventory service whose release of stock refuses while ``broken``."""

    broken: bool = True

    def service(self) -> Participant:
        inventory = Participant("inventory")

        @inventory.handler
        async def reserve_inventory(
            cmd: ReserveInventory, ctx: CommandContext
        ) -> InventoryReserved:
            return InventoryReserved(reservation_id=f"res-{cmd.order_id}")

        @inventory.handler
        async def release_inventory(cmd: ReleaseInventory, ctx: CommandContext) -> None:
            if self.broken:
                raise ParticipantError("the warehouse system is down", type="WarehouseDown")

        return inventory


@dataclass
class Running:
    """Everything the browser test talks to."""

    url: str
    amqp_url: str
    store: SagaStore
    engine: Orchestrator
    warehouse: Warehouse


@pytest.fixture
async def running(database_url: str, vhost_url: str) -> AsyncIterator[Running]:
    """The orchestrator, four services and the console, until the test ends."""
    store = open_store(database_url)
    await store.setup()
    warehouse = Warehouse()
    transports = [RabbitTransport(vhost_url) for _ in range(5)]
    engine = Orchestrator(app, store, transports[0])
    services = (warehouse.service(), payment, shipping, notification)
    try:
        async with asyncio.TaskGroup() as group:
            daemon = group.create_task(engine.run())
            workers = [
                group.create_task(service.run(transport))
                for service, transport in zip(services, transports[1:], strict=True)
            ]
            async with asyncio.timeout(60):
                await engine.ready.wait()
            try:
                async with serve_console(
                    app, store, Access(local=True), host="127.0.0.1", port=0, amqp_url=vhost_url
                ) as url:
                    yield Running(url, vhost_url, store, engine, warehouse)
            finally:
                engine.stop()
                await daemon
                for worker in workers:
                    worker.cancel()
    finally:
        for transport in transports:
            await transport.close()
        await store.close()


@pytest.fixture
async def page(running: Running) -> AsyncIterator[object]:
    """A chromium page with every confirmation and prompt accepted."""
    from playwright.async_api import Dialog, async_playwright

    async def accept(dialog: Dialog) -> None:
        await dialog.accept("checked by the test" if dialog.type == "prompt" else None)

    async with async_playwright() as playwright:
        # Tests run as root in CI containers, where chromium's sandbox cannot start.
        browser = await playwright.chromium.launch(
            executable_path=chromium(), args=["--no-sandbox"]
        )
        try:
            tab = await browser.new_page()
            tab.set_default_timeout(WAIT_MS)
            tab.on("dialog", accept)
            yield tab
        finally:
            await browser.close()


async def test_an_operator_finds_a_stuck_saga_retries_it_and_watches_it_finish(
    running: Running, page: object
) -> None:
    from playwright.async_api import Page, expect

    assert isinstance(page, Page)
    await running.engine.start("order_fulfillment", "o-done", order("o-done"))
    await running.engine.start(
        "order_fulfillment", "o-stuck", order("o-stuck", process_payment="fail")
    )

    async def stuck() -> bool:
        record = await running.store.load("o-stuck")
        return record is not None and record.state.status is SagaStatus.STUCK

    await eventually(stuck, "o-stuck getting stuck")
    running.warehouse.broken = False  # the operator fixed the warehouse; now retry

    await page.goto(running.url + "/")
    await expect(page.get_by_test_id("count-stuck")).to_contain_text("1")
    await page.get_by_test_id("filter-status").select_option("stuck")
    await page.get_by_test_id("apply").click()
    rows = page.get_by_test_id("saga-row")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("undo reserve_inventory (compensation_failed)")
    await rows.first.get_by_role("link", name="o-stuck").click()

    await expect(page.get_by_test_id("saga-status")).to_have_text("stuck")
    timeline = page.get_by_test_id("timeline")
    await expect(timeline.get_by_test_id("bar-forward-reserve_inventory")).to_have_count(1)
    await expect(timeline.get_by_test_id("bar-failed-process_payment")).to_have_count(1)
    await expect(timeline.get_by_test_id("bar-compensation-reserve_inventory")).to_have_count(1)
    await expect(page.get_by_test_id("result-reserve_inventory")).to_contain_text("res-o-stuck")
    await expect(page.get_by_test_id("step-process_payment")).to_contain_text("PaymentDeclined")
    await expect(page.get_by_test_id("action-abort")).to_be_disabled()

    await page.get_by_test_id("action-retry").click()
    await expect(page.get_by_test_id("notice")).to_contain_text("stuck -> compensating")
    await expect(page.get_by_test_id("saga-status")).to_have_text("failed")  # rolled back whole
    await expect(page.get_by_test_id("history")).to_contain_text("SagaFailed")

    record = await running.store.load("o-stuck")
    assert record is not None
    assert record.state.status is SagaStatus.FAILED
    assert any(entry.by for entry in record.state.history)  # the page named the operator


async def test_an_operator_replays_a_parked_message(running: Running, page: object) -> None:
    from playwright.async_api import Page, expect

    assert isinstance(page, Page)
    connection = await aio_pika.connect(running.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(
            aio_pika.Message(BAD_START, content_type="application/json"),
            routing_key=names.START_QUEUE,
        )

    async def parked() -> bool:
        return await queue_depth(running.amqp_url, names.PARKED_QUEUE) == 1

    await eventually(parked, "the orchestrator parking the bad start request")

    await page.goto(running.url + "/#/parked")
    rows = page.get_by_test_id("parked-row")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text(names.START_QUEUE)
    first_id = await rows.first.get_by_role("link").inner_text()
    await rows.first.get_by_role("link").click()
    await expect(page.get_by_test_id("parked-body")).to_contain_text('"saga_id": 7')

    await page.get_by_test_id("replay").click()
    await expect(page.get_by_test_id("notice")).to_contain_text(
        f"message {first_id} replayed to {names.START_QUEUE}"
    )
    # Back in saga.start, the orchestrator read it again and, still unreadable, parked it anew.
    await expect(rows).to_have_count(1)
    await expect(rows.first.get_by_role("link")).not_to_have_text(first_id)
