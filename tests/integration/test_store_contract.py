"""The saga store contract: one suite, run against every store.

Stores: ``memory`` (the reference), ``postgres`` (the server on this machine; a table per test),
``mongomock`` (the Mongo adapter over an async facade on mongomock) and ``mongo`` (the server
``SAGA_TEST_MONGO_URL`` names: SecantusDB under ``.ci/run``, MongoDB in the hosted workflow;
a database per test). Saga states are built with the real engine from the example order saga,
so the stores hold what production holds.

Times are whole seconds (BSON dates keep milliseconds, as the Mongo store documents), and
start from today: MongoDB's TTL index (and mongomock's) deletes a finished saga whose
``purge_at`` is already in the past by the wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import socket
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import bson
import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.cursor import AsyncCursor
from pymongo.asynchronous.database import AsyncDatabase

from contracts.events import EventName
from contracts.messages import Direction, Reply, ReplyStatus
from contracts.orders import InventoryReserved, OrderData, ReleaseInventory, ReserveInventory
from examples.order_fulfillment import order_fulfillment
from orchestrator.definition import Saga, Step
from orchestrator.effects import outgoing
from orchestrator.engine import HISTORY_LIMIT, Decision, Event, ReplyReceived, decide, start_saga
from orchestrator.state import SagaStatus, StepStatus
from orchestrator.store import Cursor, Hold, Listed, SagaFilter, SagaRecord, SagaStore
from orchestrator.stores import open_store
from orchestrator.stores.memory import MemoryStore
from orchestrator.stores.mongo import MongoStore
from orchestrator.stores.postgres import ACTIVE_STATUSES, PostgresStore
from plumbing.errors import ConfigError, StoreUnavailable
from plumbing.transport import Outgoing
from plumbing.urls import redact_url
from tests.conftest import with_database
from tests.support.mongomock_async import (
    AsyncMongoMockClient,
    AsyncMongoMockCollection,
    AsyncMongoMockCursor,
    AsyncMongoMockDatabase,
)
from tests.support.stores import RoundTrips, own_table

T0 = datetime.now(UTC).replace(microsecond=0)
ORDER = {
    "customer_id": "c-1",
    "items": [{"sku": "SKU-1", "quantity": 2, "unit_price": "12.50"}],
    "payment_method": "card",
    "shipping_address": "1 Main St",
}
RESULTS: dict[str, dict[str, Any]] = {
    "reserve_inventory": {"reservation_id": "res-1"},
    "process_payment": {"payment_id": "pay-1", "amount": "25.00"},
    "create_shipment": {"shipment_id": "shp-1", "tracking_number": "TRK-1"},
    "send_confirmation": {"notification_id": "note-1"},
}

stock_check = Saga(
    "stock_check",
    data=OrderData,
    steps=[
        Step(
            "reserve_inventory",
            service="inventory",
            command=ReserveInventory,
            result=InventoryReserved,
            compensation=ReleaseInventory,
            timeout=30,
        )
    ],
)
"""A second saga type, so that listings have a type to filter on."""

SAGAS = {saga.name: saga for saga in (order_fulfillment, stock_check)}
OK, FAIL = ReplyStatus.COMPLETED, ReplyStatus.FAILED


# --- Building realistic records with the real engine ------------------------------------------


async def unpublished_records(
    store: SagaStore, older_than: datetime, limit: int
) -> list[SagaRecord]:
    """The records whose ids ``unpublished`` returns, in its order."""
    records = []
    for saga_id in await store.unpublished(older_than, limit):
        record = await store.load(saga_id)
        assert record is not None
        records.append(record)
    return records


def record_of(decision: Decision, version: int, now: datetime) -> SagaRecord:
    """What the runtime saves for a decision: its state and the messages it adds.

    A record built by a chain of these (``driven``), and then created, holds only its last
    decision's messages: earlier ones are taken as published.
    """
    return SagaRecord(decision.state, version, tuple(outgoing(e, now) for e in decision.effects))


def started(saga_id: str, at: datetime = T0, saga: Saga = order_fulfillment) -> SagaRecord:
    """A saga just started: its first command is out."""
    decision = start_saga(saga, saga_id, {**ORDER, "order_id": saga_id}, at)
    return record_of(decision, 1, at)


def apply(record: SagaRecord, event: Event, at: datetime) -> SagaRecord:
    """The record after ``event``, one version on."""
    decision = decide(record.state, event, at, SAGAS[record.state.saga_type])
    assert decision.changed
    return record_of(decision, record.version + 1, at)


def answer(record: SagaRecord, status: ReplyStatus, at: datetime) -> ReplyReceived:
    """The participant's reply to the command the saga is waiting for."""
    state = record.state
    for step in state.steps:
        if step.status is StepStatus.RUNNING:
            direction, attempt = Direction.FORWARD, step.attempt
            break
        if step.status is StepStatus.COMPENSATING:
            direction, attempt = Direction.COMPENSATION, step.compensation_attempt
            break
    else:
        raise AssertionError(f"saga {state.saga_id} waits for no reply")
    command = f"{state.saga_id}:{step.name}:{direction.value}:{attempt}"
    error = None if status is OK else {"type": "Refused", "message": "no"}
    return ReplyReceived(
        Reply(
            message_id=f"reply:{command}",
            in_reply_to=command,
            saga_id=state.saga_id,
            step=step.name,
            direction=direction,
            attempt=attempt,
            status=status,
            result=RESULTS[step.name] if status is OK else None,
            error=error,
            sent_at=at,
        )
    )


def driven(
    saga_id: str, at: datetime, *replies: ReplyStatus, saga: Saga = order_fulfillment
) -> SagaRecord:
    """A saga started at ``at`` and answered ``replies`` in turn, one second apart."""
    record = started(saga_id, at, saga)
    for n, status in enumerate(replies, start=1):
        now = at + timedelta(seconds=n)
        record = apply(record, answer(record, status, now), now)
    return record


def completed(saga_id: str, at: datetime = T0, saga: Saga = order_fulfillment) -> SagaRecord:
    """Every step completed."""
    return driven(saga_id, at, *[OK] * len(saga.steps), saga=saga)


def compensating(saga_id: str, at: datetime = T0) -> SagaRecord:
    """Payment refused: the inventory reservation is being released."""
    return driven(saga_id, at, OK, FAIL)


def failed(saga_id: str, at: datetime = T0) -> SagaRecord:
    """Payment refused and the reservation released: rolled back."""
    return driven(saga_id, at, OK, FAIL, OK)


def stuck(saga_id: str, at: datetime = T0) -> SagaRecord:
    """Payment refused and the release refused too: parked for an operator."""
    return driven(saga_id, at, OK, FAIL, FAIL)


# --- One fixture, every store -----------------------------------------------------------------


@dataclass
class Backend:
    """A store under test and a way to see how big a saga is as stored."""

    store: SagaStore
    stored_bytes: Callable[[str], Awaitable[int]]


@contextlib.asynccontextmanager
async def memory_backend(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[Backend]:
    store = MemoryStore()

    async def stored_bytes(saga_id: str) -> int:
        record = await store.load(saga_id)
        assert record is not None
        outbox = sum(len(entry.model_dump_json()) for entry in record.outbox)
        return len(record.state.to_json()) + outbox

    yield Backend(store, stored_bytes)


@contextlib.asynccontextmanager
async def postgres_backend(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[Backend]:
    store = PostgresStore(request.getfixturevalue("postgres_url"), table=f"saga_test_{unique}")

    async def stored_bytes(saga_id: str) -> int:
        async with store.pool.connection() as connection:
            size: int = await connection.fetchval(
                "SELECT octet_length(state::text) + octet_length(outbox::text) "
                f'FROM "{store.table}" WHERE saga_id = $1',
                saga_id,
            )
        return size

    try:
        yield Backend(store, stored_bytes)
    finally:
        await store.drop()
        await store.close()


def mongo_sizer(store: MongoStore) -> Callable[[str], Awaitable[int]]:
    async def stored_bytes(saga_id: str) -> int:
        document = await store.collection.find_one({"_id": saga_id})
        assert document is not None
        return len(bson.encode(document))

    return stored_bytes


@contextlib.asynccontextmanager
async def mongomock_backend(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[Backend]:
    store = MongoStore(AsyncMongoMockClient()[f"saga_test_{unique}"])  # type: ignore[arg-type]
    yield Backend(store, mongo_sizer(store))


@contextlib.asynccontextmanager
async def mongo_backend(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[Backend]:
    url = with_database(request.getfixturevalue("mongo_url"), f"saga_test_{unique}")
    store = MongoStore.from_url(url)
    try:
        yield Backend(store, mongo_sizer(store))
    finally:
        await store.database.client.drop_database(store.database.name)
        await store.close()


BACKENDS = {
    "memory": memory_backend,
    "postgres": postgres_backend,
    "mongomock": mongomock_backend,
    "mongo": mongo_backend,
}


@pytest.fixture(
    params=[
        "memory",
        pytest.param("postgres", marks=pytest.mark.postgres),
        "mongomock",
        "mongo",
    ]
)
async def backend(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[Backend]:
    """Each store, set up empty, and torn down after the test."""
    async with BACKENDS[request.param](request, unique) as backend:
        await backend.store.setup()
        await backend.store.setup()  # setup is idempotent
        yield backend


@pytest.fixture
def store(backend: Backend) -> SagaStore:
    """The store under test."""
    return backend.store


async def create_all(store: SagaStore, *records: SagaRecord) -> None:
    for record in records:
        assert await store.create(record)


def message(message_id: str, at: datetime) -> Outgoing:
    """A bare outbox entry, for tests about the outbox itself rather than what it carries."""
    return Outgoing(
        message_id=message_id,
        kind="event",
        exchange="saga.events",
        routing_key="test",
        body="{}",
        created_at=at,
    )


def ids(outbox: tuple[Outgoing, ...]) -> list[str]:
    """The entries' message ids, in order."""
    return [entry.message_id for entry in outbox]


# --- Create, load, save -----------------------------------------------------------------------


async def test_a_record_round_trips_exactly(store: SagaStore) -> None:
    record = compensating("rt-1")

    assert await store.create(record)

    assert await store.load("rt-1") == record
    assert await store.load("nobody") is None


async def test_create_is_idempotent(store: SagaStore) -> None:
    first = started("idem-1")
    other = started("idem-1", T0 + timedelta(hours=1))

    assert await store.create(first)
    assert not await store.create(other)

    assert await store.load("idem-1") == first


async def test_a_save_with_a_stale_version_is_refused(store: SagaStore) -> None:
    record = started("cas-1")
    await store.create(record)
    winner = apply(record, answer(record, OK, T0 + timedelta(seconds=1)), T0 + timedelta(seconds=1))
    loser = apply(
        record, answer(record, FAIL, T0 + timedelta(seconds=2)), T0 + timedelta(seconds=2)
    )

    assert await store.save(winner, expected_version=1)
    assert not await store.save(loser, expected_version=1)
    assert not await store.save(SagaRecord(loser.state, 4, loser.outbox), expected_version=3)

    assert await store.load("cas-1") == SagaRecord(winner.state, 2, record.outbox + winner.outbox)
    assert not await store.save(SagaRecord(started("nobody").state, 2), expected_version=1)
    assert await store.load("nobody") is None  # a save never creates
    with pytest.raises(ValueError, match="expected_version"):
        await store.save(SagaRecord(winner.state, 7), expected_version=2)


async def test_fifty_concurrent_writers_lose_no_update(store: SagaStore) -> None:
    first = started("race-1")
    await store.create(first)
    conflicts = 0
    committed: dict[int, str] = {}  # version -> the outbox entry its save added

    async def writer(n: int) -> None:
        nonlocal conflicts
        added = message(f"writer-{n}", T0 + timedelta(seconds=n + 1))
        while True:
            current = await store.load("race-1")
            assert current is not None
            data = {**current.state.data, f"writer_{n}": n}
            state = replace(current.state, data=data)
            await asyncio.sleep(0)  # deciding takes a moment: other writers get in between
            if await store.save(SagaRecord(state, current.version + 1, (added,)), current.version):
                committed[current.version + 1] = added.message_id
                return
            conflicts += 1

    await asyncio.gather(*(writer(n) for n in range(50)))

    final = await store.load("race-1")
    assert final is not None
    assert final.version == 51
    assert {key for key in final.state.data if key.startswith("writer_")} == {
        f"writer_{n}" for n in range(50)
    }
    # Every writer's entry, once, behind the saga's own, in the order the saves committed.
    assert ids(final.outbox) == ids(first.outbox) + [committed[v] for v in sorted(committed)]
    assert sorted(committed.values()) == sorted(f"writer-{n}" for n in range(50))
    assert await store.outbox_backlog() == (len(first.outbox) + 50, T0)
    assert conflicts > 0, "the writers never raced, so the test proved nothing"


async def test_saves_of_many_sagas_at_once_each_get_their_own_answer(store: SagaStore) -> None:
    """Fresh and stale saves, with and without entries to drop, all at once (the PostgreSQL
    store writes what arrives together in one transaction): each is refused or kept alone."""
    later = T0 + timedelta(seconds=30)
    records = [started(f"many-{n:02}") for n in range(30)]
    for record in records:
        await store.create(record)
    saves = []
    for n, record in enumerate(records):
        saved = apply(record, answer(record, OK, later), later)
        stale = n % 3 == 0  # a third lost a race they do not know of yet
        drop = ids(record.outbox) if n % 2 else []
        if stale:
            saved = SagaRecord(saved.state, 3, saved.outbox)  # written as if version 2 were
        saves.append(store.save(saved, saved.version - 1, drop=drop))
    written = await asyncio.gather(*saves)

    assert written == [n % 3 != 0 for n in range(30)]
    for n, record in enumerate(records):
        saved = apply(record, answer(record, OK, later), later)
        kept = [] if n % 2 else ids(record.outbox)
        expected = SagaRecord(saved.state, 2, saved.outbox) if n % 3 else record
        found = await store.load(record.saga_id)
        assert found is not None
        assert found.version == expected.version
        assert found.state == expected.state
        assert ids(found.outbox) == (kept + ids(saved.outbox) if n % 3 else ids(record.outbox))


async def test_creates_of_many_sagas_at_once_each_get_their_own_answer(store: SagaStore) -> None:
    """New and taken ids at once, one id twice: each create is refused or kept alone."""
    taken = started("many-00")
    await store.create(taken)
    records = [started(f"many-{n:02}", T0 + timedelta(seconds=n)) for n in range(12)]
    twice = started("many-05", T0 + timedelta(hours=1))

    created = await asyncio.gather(*(store.create(r) for r in [*records, twice]))

    assert created[0] is False  # taken before
    assert await store.load("many-00") == taken
    # One id created twice at once: exactly one of them is, whichever got there first.
    assert created[5] != created[12]
    assert await store.load("many-05") == (records[5] if created[5] else twice)
    assert created[1:5] + created[6:12] == [True] * 10
    for record in records[1:5] + records[6:]:
        assert await store.load(record.saga_id) == record


async def test_saves_and_marks_racing_leave_the_relay_the_unpublished_entries(
    store: SagaStore,
) -> None:
    """Saves append while relays mark published, in any order: what is left is exactly the
    unpublished entries, in commit order, and the relay's queries see their oldest time."""
    first = started("race-2")
    await store.create(first)
    writers = 20
    # The relays publish the saga's own entries and the older half of the writers': a relay
    # field derived from anything but the outbox as it ends up would show an older time.
    published = set(ids(first.outbox)) | {f"writer-{n}" for n in range(writers // 2)}
    committed: dict[int, str] = {}  # version -> the outbox entry its save added
    conflicts = marks_while_saving = 0

    async def writer(n: int) -> None:
        nonlocal conflicts
        added = message(f"writer-{n}", T0 + timedelta(seconds=n + 1))
        while True:
            current = await store.load("race-2")
            assert current is not None
            await asyncio.sleep(0)  # deciding takes a moment: relays and writers get in between
            if await store.save(
                SagaRecord(current.state, current.version + 1, (added,)), current.version
            ):
                committed[current.version + 1] = added.message_id
                return
            conflicts += 1

    async def relay() -> None:
        nonlocal marks_while_saving
        while True:
            finished = len(committed) == writers  # before the load: it then sees every entry
            current = await store.load("race-2")
            assert current is not None
            due = [message_id for message_id in ids(current.outbox) if message_id in published]
            if due:
                marks_while_saving += not finished
                await store.mark_published("race-2", due)
            elif finished:
                return
            await asyncio.sleep(0)

    await asyncio.gather(*(writer(n) for n in range(writers)), relay(), relay())

    final = await store.load("race-2")
    assert final is not None
    assert final.version == writers + 1
    unpublished = [committed[v] for v in sorted(committed) if committed[v] not in published]
    assert ids(final.outbox) == unpublished
    oldest = T0 + timedelta(seconds=writers // 2 + 1)  # the oldest entry no relay publishes
    assert await unpublished_records(store, oldest - timedelta(seconds=1), 10) == []
    assert await unpublished_records(store, oldest, 10) == [final]
    assert await store.outbox_backlog() == (writers // 2, oldest)
    assert conflicts > 0, "the writers never raced, so the test proved nothing"
    assert marks_while_saving > 0, "no relay marked while writers saved: nothing was raced"


# --- Outbox -----------------------------------------------------------------------------------


async def test_mark_published_removes_only_the_named_entries_and_keeps_the_version(
    store: SagaStore,
) -> None:
    first = started("out-1")
    later = T0 + timedelta(seconds=30)
    saved = apply(first, answer(first, OK, later), later)
    await store.create(first)
    assert await store.save(saved, 1)
    old_ids = ids(first.outbox)

    await store.mark_published("out-1", old_ids)

    after = await store.load("out-1")
    assert after == saved
    assert await unpublished_records(store, later - timedelta(seconds=1), 10) == []
    assert await unpublished_records(store, later, 10) == [after]
    assert await store.outbox_backlog() == (len(saved.outbox), later)

    await store.mark_published("out-1", ["no-such-message"])
    await store.mark_published("out-1", [])
    await store.mark_published("no-such-saga", old_ids)
    assert await store.load("out-1") == after

    await store.mark_published("out-1", old_ids + ids(saved.outbox))
    assert await store.load("out-1") == SagaRecord(saved.state, 2, ())
    assert await unpublished_records(store, later + timedelta(days=1), 10) == []
    assert await store.outbox_backlog() == (0, None)


async def test_a_save_appends_to_the_unpublished_entries_and_keeps_the_oldest_time(
    store: SagaStore,
) -> None:
    first = started("app-1")
    later = T0 + timedelta(seconds=30)
    second = apply(first, answer(first, OK, later), later)
    await store.create(first)

    assert await store.save(second, 1)

    stored = await store.load("app-1")
    assert stored == SagaRecord(second.state, 2, first.outbox + second.outbox)
    assert stored.outbox_since == T0
    assert await unpublished_records(store, T0, 10) == [stored]
    assert await store.outbox_backlog() == (len(first.outbox) + len(second.outbox), T0)

    # Entries stamped earlier than those stored (another replica's clock) become the oldest.
    skewed = message("skewed", T0 - timedelta(seconds=5))
    assert await store.save(SagaRecord(second.state, 3, (skewed,)), 2)
    assert await unpublished_records(store, T0 - timedelta(seconds=5), 10) == [
        SagaRecord(second.state, 3, (*stored.outbox, skewed))
    ]
    assert await store.outbox_backlog() == (len(stored.outbox) + 1, T0 - timedelta(seconds=5))


async def test_a_save_after_everything_was_published_starts_the_outbox_again(
    store: SagaStore,
) -> None:
    """An emptied outbox has no oldest time; the next entries' must become it."""
    first = started("again-1")
    empty = SagaRecord(started("again-2").state, 1, ())
    await create_all(store, first, empty)
    await store.mark_published("again-1", ids(first.outbox))
    later = T0 + timedelta(seconds=30)
    added = message("again-added", later)

    assert await store.save(SagaRecord(first.state, 2, (added,)), 1)
    assert await store.save(SagaRecord(empty.state, 2, (added,)), 1)

    assert await unpublished_records(store, later - timedelta(seconds=1), 10) == []
    assert {record.saga_id for record in await unpublished_records(store, later, 10)} == {
        "again-1",
        "again-2",
    }
    assert await store.load("again-1") == SagaRecord(first.state, 2, (added,))
    assert await store.outbox_backlog() == (2, later)


async def test_an_entry_published_after_a_writers_load_is_not_written_back(
    store: SagaStore,
) -> None:
    first = started("res-1")
    await store.create(first)
    loaded = await store.load("res-1")
    assert loaded is not None
    later = T0 + timedelta(seconds=30)
    decided = apply(loaded, answer(loaded, OK, later), later)

    # Between this writer's load and its save, another handler publishes the old entries.
    await store.mark_published("res-1", ids(loaded.outbox))
    assert await store.save(decided, loaded.version)

    stored = await store.load("res-1")
    assert stored == SagaRecord(decided.state, 2, decided.outbox)
    assert await unpublished_records(store, later - timedelta(seconds=1), 10) == []
    assert await store.outbox_backlog() == (len(decided.outbox), later)


async def test_a_save_without_new_entries_leaves_the_outbox_as_it_was(store: SagaStore) -> None:
    pending, published = started("keep-1"), started("keep-2", T0 + timedelta(seconds=10))
    await create_all(store, pending, published)
    await store.mark_published("keep-2", ids(published.outbox))
    backlog = await store.outbox_backlog()

    for record in (pending, published):
        data = {**record.state.data, "touched": True}
        assert await store.save(SagaRecord(replace(record.state, data=data), 2), 1)

    kept = await store.load("keep-1")
    assert kept is not None
    assert (kept.version, kept.state.data["touched"], kept.outbox) == (2, True, pending.outbox)
    emptied = await store.load("keep-2")
    assert emptied is not None
    assert (emptied.version, emptied.outbox) == (2, ())
    assert await unpublished_records(store, T0, 10) == [kept]
    assert await unpublished_records(store, T0 + timedelta(days=1), 10) == [kept]
    assert await store.outbox_backlog() == backlog == (len(pending.outbox), T0)


async def test_saga_data_that_looks_like_a_query_is_stored_as_data(store: SagaStore) -> None:
    """Strings starting with ``$`` are field paths to MongoDB's pipelines, unless quoted."""
    first = started("lit-1")
    await store.create(first)
    data = {
        **first.state.data,
        "path": "$version",
        "variable": "$$ROOT",
        "nested": {"path": "$state", "list": ["$outbox", {"deep": "$_id"}], "empty": {}},
    }
    later = T0 + timedelta(seconds=30)
    added = message("$outbox", later).model_copy(update={"body": '{"$set": "$state"}'})
    saved = SagaRecord(replace(first.state, data=data), 2, (added,))

    assert await store.save(saved, 1)

    assert await store.load("lit-1") == SagaRecord(saved.state, 2, (*first.outbox, added))


async def test_unpublished_finds_old_outboxes_oldest_first(store: SagaStore) -> None:
    a, b, c = (started(f"un-{n}", T0 + timedelta(seconds=10 * n)) for n in range(3))
    done = started("un-done")
    await create_all(store, c, done, a, b)
    await store.mark_published("un-done", [entry.message_id for entry in done.outbox])

    assert await unpublished_records(store, T0 + timedelta(seconds=10), 10) == [a, b]
    assert await unpublished_records(store, T0 + timedelta(seconds=10), 1) == [a]
    assert await unpublished_records(store, T0 - timedelta(seconds=1), 10) == []
    assert await unpublished_records(store, T0 + timedelta(hours=1), 10) == [a, b, c]


async def test_outbox_backlog_counts_every_unpublished_message(store: SagaStore) -> None:
    assert await store.outbox_backlog() == (0, None)
    a, b = started("bl-1", T0 + timedelta(seconds=5)), completed("bl-2", T0)
    await create_all(store, a, b)

    assert await store.outbox_backlog() == (len(a.outbox) + len(b.outbox), b.outbox_since)

    await store.mark_published("bl-2", [entry.message_id for entry in b.outbox])
    assert await store.outbox_backlog() == (len(a.outbox), T0 + timedelta(seconds=5))


# --- Queries ----------------------------------------------------------------------------------


async def test_due_returns_only_active_sagas_past_due_oldest_first(store: SagaStore) -> None:
    a, b, c = (started(f"due-{n}", T0 + timedelta(seconds=10 * n)) for n in range(3))
    later = started("due-later", T0 + timedelta(minutes=10))
    undoing = compensating("due-undoing", T0 - timedelta(minutes=5))
    done, parked, rolled_back = completed("due-done"), stuck("due-stuck"), failed("due-failed")
    await create_all(store, later, c, done, b, parked, undoing, a, rolled_back)
    now = T0 + timedelta(minutes=5)
    assert undoing.state.status is SagaStatus.COMPENSATING
    assert parked.state.status is SagaStatus.STUCK
    assert undoing.state.next_due_at is not None
    assert a.state.next_due_at is not None
    assert undoing.state.next_due_at < a.state.next_due_at < now

    assert await store.due(now, 10) == ["due-undoing", "due-0", "due-1", "due-2"]
    assert await store.due(now, 2) == ["due-undoing", "due-0"]
    assert await store.due(a.state.next_due_at, 10) == ["due-undoing", "due-0"]  # inclusive
    assert await store.due(T0 - timedelta(minutes=10), 10) == []


async def test_list_filters_by_status_and_type_newest_first(store: SagaStore) -> None:
    await create_all(
        store,
        started("ls-o1", T0),
        started("ls-s1", T0 + timedelta(seconds=30), stock_check),
        completed("ls-o2", T0 + timedelta(seconds=50)),  # updated at +54 s
        completed("ls-s2", T0 + timedelta(seconds=70), stock_check),  # updated at +71 s
        started("ls-o3", T0 + timedelta(seconds=100)),
    )

    async def ids(**query: Any) -> list[str]:
        return [listed.state.saga_id for listed in await store.find(SagaFilter(**query))]

    assert await ids() == ["ls-o3", "ls-s2", "ls-o2", "ls-s1", "ls-o1"]
    assert await ids(limit=2) == ["ls-o3", "ls-s2"]
    assert await ids(status=SagaStatus.STARTED) == ["ls-o3", "ls-s1", "ls-o1"]
    assert await ids(saga_type="stock_check") == ["ls-s2", "ls-s1"]
    assert await ids(status=SagaStatus.COMPLETED, saga_type="order_fulfillment") == ["ls-o2"]
    assert await ids(status=SagaStatus.STUCK) == []
    listed = await store.find(SagaFilter(saga_type="stock_check", limit=1))
    assert listed == [Listed(completed("ls-s2", T0 + timedelta(seconds=70), stock_check).state)]


async def test_list_filters_by_step_id_prefix_and_start_time_and_pages_by_cursor(
    store: SagaStore,
) -> None:
    await create_all(
        store,
        started("f-a1", T0),  # on reserve_inventory, going forward
        compensating("f-a2", T0 + timedelta(seconds=10)),  # undoing reserve_inventory
        stuck("f-b1", T0 + timedelta(seconds=20)),  # stuck on reserve_inventory's compensation
        completed("f-b2", T0 + timedelta(seconds=30)),  # on no step: finished
        started("g_%1", T0 + timedelta(seconds=40)),  # a prefix with LIKE's and regex's signs
    )

    async def ids(**query: Any) -> list[str]:
        return [listed.state.saga_id for listed in await store.find(SagaFilter(**query))]

    assert await ids(step="reserve_inventory") == ["g_%1", "f-b1", "f-a2", "f-a1"]
    assert await ids(step="process_payment") == []
    assert await ids(id_prefix="f-b") == ["f-b2", "f-b1"]
    assert await ids(id_prefix="g_%") == ["g_%1"]
    assert await ids(id_prefix="g.") == []
    window = {"created_from": T0 + timedelta(seconds=10), "created_to": T0 + timedelta(seconds=30)}
    assert await ids(**window) == ["f-b1", "f-a2"]

    pages: list[list[str]] = []
    cursor = None
    while True:
        page = await store.find(SagaFilter(limit=2, after=cursor))
        if not page:
            break
        pages.append([listed.state.saga_id for listed in page])
        cursor = Cursor(page[-1].state.updated_at, page[-1].state.saga_id)
    assert pages == [["g_%1", "f-b2"], ["f-b1", "f-a2"], ["f-a1"]]


async def test_count_by_status(store: SagaStore) -> None:
    assert await store.count_by_status() == {}
    await create_all(
        store,
        started("cnt-1"),
        started("cnt-2"),
        completed("cnt-3"),
        stuck("cnt-4"),
        started("cnt-5", saga=stock_check),
    )

    assert await store.count_by_status() == {
        ("order_fulfillment", "started"): 2,
        ("order_fulfillment", "completed"): 1,
        ("order_fulfillment", "stuck"): 1,
        ("stock_check", "started"): 1,
    }


async def test_purge_deletes_only_finished_sagas_past_retention(store: SagaStore) -> None:
    retention = timedelta(days=14)  # every store's default
    done = completed("pg-done")  # finished at T0 + 4 s
    rolled_back = failed("pg-failed", T0 + timedelta(days=1))  # finished a day later
    await create_all(store, done, rolled_back, stuck("pg-stuck"), started("pg-running"))
    assert done.state.finished_at is not None
    assert rolled_back.state.finished_at is not None

    assert await store.purge(done.state.finished_at + retention - timedelta(seconds=1)) == 0
    assert await store.purge(done.state.finished_at + retention) == 1
    assert await store.load("pg-done") is None
    assert await store.purge(rolled_back.state.finished_at + retention) == 1
    assert await store.purge(T0 + timedelta(days=3650)) == 0
    assert {listed.state.saga_id for listed in await store.find(SagaFilter())} == {
        "pg-stuck",
        "pg-running",
    }


# --- Size -------------------------------------------------------------------------------------


# 4,000 writes of a 35 kB document: seconds on the other stores, but on SecantusDB, a Python
# server, each takes 20-60 ms (1.5-4 minutes in all, 5 on a machine shared with benchmarks).
@pytest.mark.timeout(1800)
async def test_a_long_history_stays_bounded(backend: Backend) -> None:
    store = backend.store
    record = started("long-1")
    await store.create(record)
    # As in the runtime, each write's messages are published and marked before the next write
    # (a save appends to the outbox): only the last write's are still there at the end.
    await store.mark_published("long-1", ids(record.outbox))
    record = apply(record, answer(record, OK, T0), T0)  # reserve_inventory completed
    assert await store.save(record, 1)
    events = len(record.state.history)
    redeliveries = 2000

    for n in range(redeliveries):  # the same completed reply, redelivered again and again
        now = T0 + timedelta(seconds=n + 1)
        late = ReplyReceived(
            Reply(
                message_id=f"reply:long-1:reserve:{n}",
                in_reply_to="long-1:reserve_inventory:forward:1",
                saga_id="long-1",
                step="reserve_inventory",
                direction=Direction.FORWARD,
                attempt=1,
                status=OK,
                result=RESULTS["reserve_inventory"],
                sent_at=now,
            )
        )
        decision = decide(record.state, late, now, order_fulfillment)
        events += len(decision.events)
        saved = record_of(decision, record.version + 1, now)
        await store.mark_published("long-1", ids(record.outbox))
        assert await store.save(saved, record.version)
        record = saved

    stored = await store.load("long-1")
    assert stored == record
    assert stored.state.history[0].event is EventName.SAGA_STARTED  # the first entry is kept
    assert stored.state.history[-1].event is EventName.LATE_REPLY
    assert len(stored.state.history) == HISTORY_LIMIT
    assert stored.state.history_dropped + len(stored.state.history) == events
    assert await backend.stored_bytes("long-1") < 64 * 1024


# --- Store specifics: what operators and the query planner rely on -----------------------------


@pytest.mark.postgres
async def test_postgres_keeps_an_outbox_entry_saved_while_another_is_being_marked(
    postgres_url: str, unique: str
) -> None:
    """mark_published must work on the row as it is when it gets the lock, not as it was."""
    store = PostgresStore(postgres_url, table=f"saga_test_{unique}")
    await store.setup()
    try:
        first = started("mp-1")
        later = T0 + timedelta(seconds=30)
        decision = decide(first.state, answer(first, OK, later), later, order_fulfillment)
        added = [outgoing(e, later).model_dump(mode="json") for e in decision.effects]
        await store.create(first)
        async with store.pool.connection() as saver, saver.transaction():
            await saver.execute(
                f'UPDATE "{store.table}" SET outbox = outbox || $1::jsonb, version = 2 '
                "WHERE saga_id = $2",
                added,
                "mp-1",
            )
            marking = asyncio.create_task(
                store.mark_published("mp-1", [e.message_id for e in first.outbox])
            )
            await asyncio.sleep(0.2)
            assert not marking.done()  # waiting for the saver's row lock
        await marking

        after = await store.load("mp-1")
        assert after is not None
        assert after.version == 2
        assert [entry.model_dump(mode="json") for entry in after.outbox] == added
        assert await unpublished_records(store, later - timedelta(seconds=1), 10) == []
    finally:
        await store.drop()
        await store.close()


@pytest.mark.postgres
async def test_postgres_appends_to_the_outbox_as_it_is_when_the_save_gets_the_lock(
    postgres_url: str, unique: str
) -> None:
    """A save waiting for a marker's row lock appends to the marked outbox, not to its read."""
    store = PostgresStore(postgres_url, table=f"saga_test_{unique}")
    await store.setup()
    try:
        first = started("sv-1")
        later = T0 + timedelta(seconds=30)
        saved = apply(first, answer(first, OK, later), later)
        await store.create(first)
        async with store.pool.connection() as marker, marker.transaction():
            await marker.execute(store._sql["mark_published"], "sv-1", ids(first.outbox))
            saving = asyncio.create_task(store.save(saved, 1))
            await asyncio.sleep(0.2)
            assert not saving.done()  # waiting for the marker's row lock
        assert await saving

        assert await store.load("sv-1") == saved
        assert await store.outbox_backlog() == (len(saved.outbox), later)
    finally:
        await store.drop()
        await store.close()


@pytest.fixture
async def own_postgres_store(postgres_url: str, unique: str) -> AsyncIterator[PostgresStore]:
    """A PostgreSQL store on a table of its own (for what only PostgreSQL does)."""
    async with own_table(PostgresStore(postgres_url, table=f"saga_test_{unique}")) as store:
        yield store


@pytest.mark.postgres
async def test_postgres_writes_what_arrives_together_in_one_round_trip(
    own_postgres_store: PostgresStore,
) -> None:
    store = own_postgres_store
    records = [started(f"gc-{n:02}") for n in range(40)]
    for record in records:
        await store.create(record)
    trips = RoundTrips(store.pool)
    later = T0 + timedelta(seconds=30)
    written = await asyncio.gather(
        *(store.save(apply(r, answer(r, OK, later), later), 1) for r in records)
    )

    assert all(written)
    # The first save goes alone; the others arrive while it is written and go together.
    assert trips.count < len(records) // 4, f"{trips.count} round trips for 40 saves"
    trips.count = 0
    fresh = [started(f"gc-new-{n:02}") for n in range(40)]
    assert all(await asyncio.gather(*(store.create(r) for r in fresh)))
    assert trips.count < len(fresh) // 4, f"{trips.count} round trips for 40 creates"
    for record in records:
        found = await store.load(record.saga_id)
        assert found is not None
        assert found.version == 2


@pytest.mark.postgres
async def test_postgres_queries_use_their_partial_indexes(postgres_url: str, unique: str) -> None:
    store = PostgresStore(postgres_url, table=f"saga_test_{unique}")
    await store.setup()
    try:
        await create_all(store, *(started(f"ix-{n}") for n in range(20)), completed("ix-done"))
        async with store.pool.connection() as connection:
            definitions = {
                row["indexname"]: row["indexdef"]
                for row in await connection.fetch(
                    "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = $1", store.table
                )
            }
            await connection.execute("SET enable_seqscan = off")  # a tiny table: force the choice
            plans = {
                name: "\n".join(
                    row[0]
                    for row in await connection.fetch(
                        f"EXPLAIN {store._sql[name]}", T0 + timedelta(hours=1), 10
                    )
                )
                for name in ("due", "unpublished", "purge")
            }
            await connection.execute("RESET enable_seqscan")
    finally:
        await store.drop()
        await store.close()
    table = store.table
    assert "WHERE (status = ANY" in definitions[f"{table}_due"]
    assert "WHERE (outbox_since IS NOT NULL)" in definitions[f"{table}_outbox"]
    assert "WHERE (purge_at IS NOT NULL)" in definitions[f"{table}_purge"]
    assert "updated_at DESC" in definitions[f"{table}_listing"]
    assert f"{table}_due" in plans["due"]
    assert f"{table}_outbox" in plans["unpublished"]
    assert f"{table}_purge" in plans["purge"]


def test_the_postgres_due_index_covers_exactly_the_active_statuses() -> None:
    assert set(ACTIVE_STATUSES) == {status.value for status in SagaStatus if status.is_active}


@pytest.mark.parametrize(
    ("fake", "real"),
    [
        (AsyncMongoMockClient, AsyncMongoClient),
        (AsyncMongoMockDatabase, AsyncDatabase),
        (AsyncMongoMockCollection, AsyncCollection),
        (AsyncMongoMockCursor, AsyncCursor),
    ],
)
def test_the_mongomock_facade_mirrors_pymongo(fake: type, real: type) -> None:
    """Code that runs on the facade must run on PyMongo: same names, same awaitability."""
    for name, ours in vars(fake).items():
        if name.startswith("_") and name not in ("__getitem__", "__aiter__"):
            continue
        theirs = getattr(real, name)
        if isinstance(ours, property):
            assert isinstance(theirs, property), name
            continue
        assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(theirs), name
        their_parameters = inspect.signature(theirs).parameters
        takes_anything = any(
            p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in their_parameters.values()
        )
        for parameter in inspect.signature(ours).parameters:
            assert takes_anything or parameter in their_parameters, f"{name}({parameter})"


async def test_mongo_creates_its_indexes(unique: str) -> None:
    store = MongoStore(AsyncMongoMockClient()[f"saga_{unique}"])  # type: ignore[arg-type]

    await store.setup()

    indexes = await store.collection.index_information()  # type: ignore[attr-defined]
    assert list(indexes["due_v1"]["key"]) == [("next_due_at", 1), ("_id", 1)]
    assert indexes["due_v1"]["partialFilterExpression"] == {"active": True}
    assert list(indexes["outbox_v1"]["key"]) == [("outbox_since", 1), ("_id", 1)]
    assert indexes["outbox_v1"]["partialFilterExpression"] == {"has_outbox": True}
    assert list(indexes["listing_v1"]["key"]) == [
        ("status", 1),
        ("saga_type", 1),
        ("updated_at", -1),
        ("_id", -1),
    ]
    assert list(indexes["purge_v1"]["key"]) == [("purge_at", 1)]
    assert indexes["purge_v1"]["expireAfterSeconds"] == 0


async def test_mongo_documents_carry_their_index_fields_as_dates(unique: str) -> None:
    store = MongoStore(AsyncMongoMockClient()[f"saga_{unique}"], retention=timedelta(days=2))  # type: ignore[arg-type]
    running, done = started("doc-1"), completed("doc-2")
    await create_all(store, running, done)

    active = await store.collection.find_one({"_id": "doc-1"})
    finished = await store.collection.find_one({"_id": "doc-2"})

    assert active is not None
    assert finished is not None
    assert (active["status"], active["active"], active["has_outbox"]) == ("started", True, True)
    assert active["next_due_at"] == running.state.next_due_at
    assert active["outbox_since"] == T0
    assert active["purge_at"] is None
    assert (finished["status"], finished["active"], finished["next_due_at"]) == (
        "completed",
        False,
        None,
    )
    assert done.state.finished_at is not None
    assert finished["purge_at"] == done.state.finished_at + timedelta(days=2)
    assert finished["updated_at"] == done.state.updated_at


async def test_mongo_keeps_the_relay_fields_in_step_with_the_outbox(unique: str) -> None:
    """has_outbox and outbox_since follow every write, including onto a null or absent time."""
    store = MongoStore(AsyncMongoMockClient()[f"saga_{unique}"])  # type: ignore[arg-type]
    first = started("relay-1")
    later = T0 + timedelta(seconds=30)
    await store.create(first)

    async def relay_fields() -> tuple[bool, datetime | None]:
        document = await store.collection.find_one({"_id": "relay-1"})
        assert document is not None
        return document["has_outbox"], document["outbox_since"]

    assert await relay_fields() == (True, T0)
    assert await store.save(SagaRecord(first.state, 2, (message("a", later),)), 1)
    assert await relay_fields() == (True, T0)
    await store.mark_published("relay-1", [*ids(first.outbox), "a"])
    assert await relay_fields() == (False, None)
    assert await store.save(SagaRecord(first.state, 3), 2)
    assert await relay_fields() == (False, None)
    assert await store.save(SagaRecord(first.state, 4, (message("b", later),)), 3)
    assert await relay_fields() == (True, later)

    await store.mark_published("relay-1", ["b"])
    await store.collection.update_one({"_id": "relay-1"}, {"$unset": {"outbox_since": ""}})
    assert await store.save(SagaRecord(first.state, 5, (message("c", later),)), 4)
    assert await relay_fields() == (True, later)


async def test_mongo_urls_get_majority_writes_retries_and_timeouts_unless_they_say_otherwise() -> (
    None
):
    default = MongoStore.from_url("mongodb://db.example/orders", connect_timeout=2.5)
    chosen = MongoStore.from_url("mongodb://db.example/?w=1&retryWrites=false")
    try:
        client = default.database.client
        assert client.write_concern.document == {"w": "majority"}
        assert client.options.retry_writes is True
        assert client.options.server_selection_timeout == 2.5
        assert client.codec_options.tz_aware is True
        other = chosen.database.client
        assert other.write_concern.document == {"w": 1}
        assert other.options.retry_writes is False
        assert chosen.database.name == "saga"
    finally:
        await default.close()
        await chosen.close()


# --- Unavailable servers, URLs ----------------------------------------------------------------


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel does) and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


async def close_quietly(store: SagaStore) -> None:
    """Close a store that never reached its server.

    PyMongo can leave a socket unclosed when close() cancels a monitor in the middle of
    connecting (PYTHON-3923). Collect it here, its ResourceWarning silenced, rather than have
    the warning blamed on whichever test runs when the garbage collector next does.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        await store.close()
        await asyncio.sleep(0)
        gc.collect()


def postgres_store(url: str) -> SagaStore:
    return PostgresStore(url, connect_timeout=1.0)


def mongo_store(url: str) -> SagaStore:
    return MongoStore.from_url(url, connect_timeout=1.0)


UNREACHABLE = [
    pytest.param(postgres_store, "postgresql://saga:s3cret@127.0.0.1:{port}/saga", id="postgres"),
    pytest.param(mongo_store, "mongodb://saga:s3cret@127.0.0.1:{port}/saga", id="mongo"),
]


@pytest.mark.parametrize(("make", "url"), UNREACHABLE)
async def test_a_closed_port_fails_fast_naming_the_url_without_its_password(
    make: Callable[[str], SagaStore], url: str
) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    target = url.format(port=port)
    store = make(target)
    try:
        started_at = time.monotonic()
        with pytest.raises(StoreUnavailable) as raised:
            await store.setup()
        assert time.monotonic() - started_at < 5
        with pytest.raises(StoreUnavailable):
            await store.load("any")
    finally:
        await close_quietly(store)
    message = str(raised.value)
    assert f"saga:***@127.0.0.1:{port}/saga" in message
    assert "s3cret" not in message
    assert "\n" not in message


@pytest.mark.parametrize(("make", "url"), UNREACHABLE)
async def test_a_server_that_never_answers_fails_within_the_connect_timeout(
    make: Callable[[str], SagaStore], url: str
) -> None:
    with silent_port() as port:
        store = make(url.format(port=port))
        try:
            started_at = time.monotonic()
            with pytest.raises(StoreUnavailable, match=r"saga:\*\*\*@127\.0\.0\.1"):
                await store.setup()
            assert time.monotonic() - started_at < 4
        finally:
            await close_quietly(store)


async def test_open_store_picks_the_store_from_the_url() -> None:
    assert isinstance(open_store("memory://"), MemoryStore)
    postgres = open_store("postgres://saga:pw@db.example/saga")
    assert isinstance(postgres, PostgresStore)
    assert postgres.table == "saga_instances"
    mongo = open_store("mongodb://saga:pw@db.example/orders?replicaSet=rs0")
    assert isinstance(mongo, MongoStore)
    assert (mongo.database.name, mongo.collection.name) == ("orders", "sagas")
    await mongo.close()
    default = open_store("mongodb+srv://saga:pw@cluster.example.net", retention=timedelta(days=2))
    assert isinstance(default, MongoStore)
    assert (default.database.name, default.retention) == ("saga", timedelta(days=2))
    await default.close()


def test_an_unknown_scheme_is_a_config_error_naming_the_url_and_the_choices() -> None:
    with pytest.raises(ConfigError) as raised:
        open_store("redis://saga:s3cret@cache:6379/0")
    message = str(raised.value)
    assert "redis://saga:***@cache:6379/0" in message
    assert "s3cret" not in message
    for scheme in ("memory://", "postgresql://", "mongodb://", "mongodb+srv://"):
        assert scheme in message


@pytest.mark.parametrize(
    "table", ["Sagas", "sagas; DROP TABLE x", "1sagas", "public.sagas", "s" * 41, ""]
)
def test_a_table_name_must_be_a_plain_identifier(table: str) -> None:
    with pytest.raises(ConfigError, match="table name"):
        PostgresStore("postgresql://db/saga", table=table)


@pytest.mark.parametrize(
    "url",
    [
        "mongodb+srv://saga:s3cret@cluster.example.net:27017/saga",
        "mongodb://saga:s3cret@db.example:port/saga",
        "mongodb://saga:s3cret@h1,h2/saga?directConnection=true",
    ],
)
def test_a_malformed_mongo_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match=r"saga:\*\*\*@") as raised:
        open_store(url)
    assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://saga:s3cret@db:5432/saga", "postgresql://saga:***@db:5432/saga"),
        ("postgresql://saga:p@ss@db/saga", "postgresql://saga:***@db/saga"),
        (
            "mongodb://saga:s3cret@h1:27017,h2:27017/saga?replicaSet=rs0",
            "mongodb://saga:***@h1:27017,h2:27017/saga?replicaSet=rs0",
        ),
        (
            "mongodb+srv://saga:p%40ss@cluster.example.net/?retryWrites=true",
            "mongodb+srv://saga:***@cluster.example.net/?retryWrites=true",
        ),
        (
            "postgresql://db/saga?user=saga&password=s3cret&sslmode=require",
            "postgresql://db/saga?user=saga&password=***&sslmode=require",
        ),
        ("postgresql://saga@db/saga", "postgresql://saga@db/saga"),
        ("memory://", "memory://"),
        ("postgresql://[::1/saga", "<malformed URL>"),
    ],
)
def test_redact_url_hides_passwords(url: str, shown: str) -> None:
    assert redact_url(url) == shown


# --- Holds and definition versions -------------------------------------------------------------


async def test_a_held_saga_is_not_due_and_is_found_by_the_definition_it_waits_for(
    store: SagaStore,
) -> None:
    waiting = started("hold-def")
    assert waiting.state.next_due_at is not None
    await create_all(store, waiting, started("hold-free"))
    key = f"order_fulfillment:1:{waiting.state.definition_fingerprint}"
    hold = Hold("no definition order_fulfillment v1", T0, waiting_for=key)
    assert await store.save(replace(waiting, version=2, hold=hold), 1)

    later = T0 + timedelta(days=1)
    assert await store.due(later, 10) == ["hold-free"]
    assert await store.held([key], 10) == ["hold-def"]
    assert await store.held(["order_fulfillment:2:other"], 10) == []
    loaded = await store.load("hold-def")
    assert loaded is not None
    assert loaded.hold == hold
    assert await store.count_held() == {("order_fulfillment", key): 1}
    held = await store.find(SagaFilter(held=True))
    assert [listed.state.saga_id for listed in held] == ["hold-def"]
    assert held[0].hold == hold
    free = await store.find(SagaFilter(held=False))
    assert [listed.state.saga_id for listed in free] == ["hold-free"]

    assert await store.save(replace(loaded, version=3, hold=None), 2)  # resumed
    assert set(await store.due(later, 10)) == {"hold-def", "hold-free"}
    assert await store.count_held() == {}


async def test_holding_an_unreadable_saga_does_not_read_it_and_the_relay_passes_it_by(
    store: SagaStore,
) -> None:
    record = started("hold-op")
    await store.create(record)
    assert await unpublished_records(store, T0, 10) == [record]
    await store.hold("hold-op", Hold("the sweep failed on it: boom", T0))

    assert await store.unpublished(T0, 10) == []
    assert await store.due(T0 + timedelta(days=1), 10) == []
    assert await store.count_held() == {("order_fulfillment", ""): 1}
    loaded = await store.load("hold-op")
    assert loaded is not None
    # Nothing but the hold changed, and the version, so that an older copy cannot overwrite it:
    assert loaded.version == record.version + 1
    assert not await store.save(replace(record, version=record.version + 1), record.version)
    assert loaded.state == record.state
    assert loaded.hold == Hold("the sweep failed on it: boom", T0)


async def test_sagas_are_counted_and_listed_by_definition_version(store: SagaStore) -> None:
    v2 = Saga("order_fulfillment", steps=list(order_fulfillment.steps)[:3], version=2)
    await create_all(
        store,
        started("def-1"),
        started("def-2"),
        started("def-3", saga=v2),
        completed("def-4"),
    )
    assert await store.count_by_definition() == {
        ("order_fulfillment", 1, order_fulfillment.fingerprint): 2,
        ("order_fulfillment", 2, v2.fingerprint): 1,
    }
    listed = await store.find(SagaFilter(version=2))
    assert [item.state.saga_id for item in listed] == ["def-3"]
    assert {item.state.saga_id for item in await store.find(SagaFilter(version=1))} == {
        "def-1",
        "def-2",
        "def-4",
    }


@pytest.mark.postgres
async def test_a_table_of_the_first_schema_is_migrated_with_its_sagas(
    postgres_url: str, unique: str
) -> None:
    from orchestrator.stores.postgres import _MIGRATIONS

    table = f"saga_migrate_{unique}"
    old = PostgresStore(postgres_url, table=table)
    await old.pool.migrate(table, _MIGRATIONS[:1], active=_active_condition())
    record = started("mig-1")
    async with old.pool.connection() as connection:
        await connection.execute(
            f"""INSERT INTO "{table}" (saga_id, saga_type, status, version, state, outbox,
                    next_due_at, created_at, updated_at)
                VALUES ($1, $2, 'started', 1, $3, '[]', $4, $5, $5)""",
            "mig-1",
            "order_fulfillment",
            record.state.to_document(),
            record.state.next_due_at,
            T0,
        )
    await old.close()
    store = PostgresStore(postgres_url, table=table)
    try:
        await store.setup()  # applies migration 2 to the table and its row
        loaded = await store.load("mig-1")
        assert loaded is not None
        assert (loaded.state, loaded.hold) == (record.state, None)
        assert await store.due(T0 + timedelta(days=1), 10) == ["mig-1"]
        assert await store.find(SagaFilter(version=1)) == [Listed(record.state)]
    finally:
        await store.drop()
        await store.close()


def _active_condition() -> str:
    from orchestrator.stores.postgres import _ACTIVE

    return _ACTIVE


# --- Folding and batching the marks ------------------------------------------------------------


async def test_a_save_can_drop_published_entries_as_it_appends(store: SagaStore) -> None:
    first = started("drop-1")
    later = T0 + timedelta(seconds=30)
    second = apply(first, answer(first, OK, later), later)
    await store.create(first)
    done, waiting = first.outbox[0], first.outbox[1:]

    assert await store.save(second, 1, drop=[done.message_id, "never-there"])

    stored = await store.load("drop-1")
    assert stored == SagaRecord(second.state, 2, waiting + second.outbox)
    assert stored.outbox_since == (T0 if waiting else later)
    assert not await store.save(SagaRecord(second.state, 2), 1, drop=["x"])  # lost the race
    assert await store.load("drop-1") == stored


async def test_a_save_that_drops_everything_old_keeps_only_the_new_time(store: SagaStore) -> None:
    first = started("drop-2")
    later = T0 + timedelta(seconds=30)
    second = apply(first, answer(first, OK, later), later)
    await store.create(first)
    assert await store.save(second, 1, drop=[entry.message_id for entry in first.outbox])
    stored = await store.load("drop-2")
    assert stored is not None
    assert stored.outbox == second.outbox
    assert stored.outbox_since == later
    assert await unpublished_records(store, T0 + timedelta(seconds=29), 10) == []


async def test_marks_for_many_sagas_go_at_once(store: SagaStore) -> None:
    one, two, three = started("many-1"), started("many-2"), started("many-3")
    await create_all(store, one, two, three)
    await store.mark_published_many(
        {
            "many-1": [entry.message_id for entry in one.outbox],
            "many-2": [two.outbox[0].message_id],
            "many-4": ["nothing"],
        }
    )
    loaded = {saga_id: await store.load(saga_id) for saga_id in ("many-1", "many-2", "many-3")}
    assert loaded["many-1"] is not None
    assert loaded["many-1"].outbox == ()
    assert loaded["many-1"].outbox_since is None
    assert loaded["many-2"] is not None
    assert loaded["many-2"].outbox == two.outbox[1:]
    assert loaded["many-3"] == three


async def test_batches_of_marks_in_opposite_orders_do_not_deadlock(store: SagaStore) -> None:
    # Two replicas' relays confirm overlapping sagas and mark them in whatever order their
    # publishes were confirmed. Seen in the chaos soak on PostgreSQL: one batch locked saga A
    # then B, the other B then A, and the server's deadlock error crashed a daemon.
    for round_ in range(5):
        records = [started(f"order-{round_}-{n:02d}") for n in range(40)]
        await create_all(store, *records)
        forward = {r.saga_id: [r.outbox[0].message_id] for r in records}
        backward = {r.saga_id: [r.outbox[-1].message_id] for r in reversed(records)}
        async with asyncio.timeout(60):
            await asyncio.gather(
                store.mark_published_many(forward), store.mark_published_many(backward)
            )
        for record in records:
            loaded = await store.load(record.saga_id)
            assert loaded is not None
            assert loaded.outbox == record.outbox[1:-1]
