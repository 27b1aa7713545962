"""What the orchestrator asks of its store per saga on the hot path, over real RabbitMQ and
PostgreSQL: one write per transition and no reads (the cost the bench's ``xact/step`` adds up).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Collection

from contracts.events import SagaCompleted, SagaFailed
from examples.order_fulfillment import app, inventory, notification, payment, shipping
from orchestrator.client import SagaClient
from orchestrator.store import SagaRecord
from orchestrator.stores.postgres import PostgresStore
from participants import Observer
from tests.integration.in_process import running
from tests.integration.test_client import order


class CountedStore(PostgresStore):
    """Counts the calls that serve messages (the background loops' queries are left out)."""

    def __init__(self, url: str, table: str) -> None:
        super().__init__(url, table=table)
        self.calls: Counter[str] = Counter()

    async def create(self, record: SagaRecord) -> bool:
        self.calls["create"] += 1
        return await super().create(record)

    async def load(self, saga_id: str) -> SagaRecord | None:
        self.calls["load"] += 1
        return await super().load(saga_id)

    async def save(
        self, record: SagaRecord, expected_version: int, *, drop: Collection[str] = ()
    ) -> bool:
        self.calls["save"] += 1
        return await super().save(record, expected_version, drop=drop)

    async def mark_published(self, saga_id: str, message_ids: Collection[str]) -> None:
        self.calls["mark_published"] += 1
        await super().mark_published(saga_id, message_ids)


async def test_each_transition_is_one_write_and_no_saga_is_read_back(
    vhost_url: str, postgres_url: str, unique: str
) -> None:
    store = CountedStore(postgres_url, f"saga_trips_{unique}")
    await store.setup()
    sagas = 20
    ended: set[str] = set()
    all_ended = asyncio.Event()
    # Outcomes come as events (waiting with SagaClient.wait would query, and a query reads).
    watcher = Observer("trips")

    @watcher.on(SagaCompleted, SagaFailed)
    async def end(event: SagaCompleted | SagaFailed) -> None:
        ended.add(f"{event.saga_id} {event.event.value}")
        if len(ended) == sagas:
            all_ended.set()

    try:
        services = (watcher, inventory, payment, shipping, notification)
        async with running(vhost_url, app, store, services), SagaClient(vhost_url) as client:
            for n in range(sagas):
                await client.start("order_fulfillment", f"trip-{n}", order(f"trip-{n}"))
            async with asyncio.timeout(300):
                await all_ended.wait()
        assert ended == {f"trip-{n} SagaCompleted" for n in range(sagas)}
        # Starting is one insert; each of the four replies one compare-and-set that also drops
        # what was published. Nothing is loaded, and no write only marks messages published.
        assert store.calls == Counter(create=sagas, save=4 * sagas)
    finally:
        await store.drop()
        await store.close()
