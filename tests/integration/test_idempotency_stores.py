"""The durable participant idempotency stores: PostgreSQL for real, MongoDB over mongomock and
on the server ``SAGA_TEST_MONGO_URL`` names (SecantusDB under ``.ci/run``), against the in-memory
reference."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from contracts.messages import ErrorDetail
from participants.idempotency import (
    DEFAULT_IDEMPOTENCY_RETENTION,
    IdempotencyStore,
    MemoryIdempotency,
    OutcomeKind,
    StoredOutcome,
    open_idempotency,
)
from participants.idempotency_stores import (
    MongoIdempotency,
    PostgresIdempotency,
)
from plumbing.errors import ConfigError
from tests.conftest import with_database
from tests.support.mongomock_async import AsyncMongoMockClient

NOW = datetime.now(UTC).replace(microsecond=0)  # TTL indexes expire entries by the wall clock

COMPLETED = StoredOutcome(
    OutcomeKind.COMPLETED, result={"payment_id": "pay-1", "amount": "25.00"}, stored_at=NOW
)
FAILED = StoredOutcome(
    OutcomeKind.FAILED,
    error=ErrorDetail(type="CardDeclined", message="insufficient funds", code="51"),
    stored_at=NOW,
)
TOMBSTONE = StoredOutcome(OutcomeKind.TOMBSTONE, stored_at=NOW)


@pytest.fixture(
    params=[
        pytest.param("postgres", marks=pytest.mark.postgres),
        "mongomock",
        "mongo",
    ]
)
async def store(
    request: pytest.FixtureRequest, unique: str
) -> AsyncIterator[PostgresIdempotency | MongoIdempotency]:
    """Each durable backend, empty, torn down after the test."""
    if request.param == "postgres":
        postgres = PostgresIdempotency(
            request.getfixturevalue("postgres_url"), table=f"idem_test_{unique}"
        )
        await postgres.setup()
        await postgres.setup()  # setup is idempotent
        try:
            yield postgres
        finally:
            await postgres.drop()
            await postgres.close()
    elif request.param == "mongomock":
        mongo = MongoIdempotency(AsyncMongoMockClient()[f"idem_test_{unique}"])  # type: ignore[arg-type]
        await mongo.setup()
        yield mongo
    else:
        url = with_database(request.getfixturevalue("mongo_url"), f"idem_test_{unique}")
        real = MongoIdempotency.from_url(url)
        await real.setup()
        try:
            yield real
        finally:
            await real.database.client.drop_database(real.database.name)
            await real.close()


async def test_an_outcome_round_trips(store: IdempotencyStore) -> None:
    assert await store.get("fwd:s-1:pay") is None

    assert await store.put("fwd:s-1:pay", COMPLETED) == COMPLETED
    assert await store.put("fwd:s-2:pay", FAILED) == FAILED

    assert await store.get("fwd:s-1:pay") == COMPLETED
    assert await store.get("fwd:s-2:pay") == FAILED


async def test_the_first_writer_wins(store: IdempotencyStore) -> None:
    await store.put("fwd:s-1:pay", COMPLETED)

    assert await store.put("fwd:s-1:pay", FAILED) == COMPLETED
    assert await store.get("fwd:s-1:pay") == COMPLETED


async def test_a_tombstone_keeps_a_late_forward_outcome_out(store: IdempotencyStore) -> None:
    # The compensation arrived first and left a tombstone under the forward key.
    await store.put("fwd:s-1:pay", TOMBSTONE)

    assert await store.put("fwd:s-1:pay", COMPLETED) == TOMBSTONE
    assert await store.get("fwd:s-1:pay") == TOMBSTONE


async def test_concurrent_writers_all_see_the_one_stored_outcome(store: IdempotencyStore) -> None:
    outcomes = [
        StoredOutcome(OutcomeKind.COMPLETED, result={"attempt": n}, stored_at=NOW)
        for n in range(20)
    ]

    seen = await asyncio.gather(*(store.put("fwd:race:pay", o) for o in outcomes))

    stored = await store.get("fwd:race:pay")
    assert stored in outcomes
    assert seen == [stored] * len(outcomes)


async def test_a_missing_stored_at_is_stamped(store: IdempotencyStore) -> None:
    stored = await store.put("fwd:s-1:ship", StoredOutcome(OutcomeKind.COMPLETED, result={}))

    assert stored.stored_at is not None
    got = await store.get("fwd:s-1:ship")
    assert got is not None
    assert got.stored_at is not None
    assert abs(got.stored_at - stored.stored_at) < timedelta(milliseconds=1)


async def test_purge_deletes_entries_older_than_the_retention(
    store: PostgresIdempotency | MongoIdempotency,
) -> None:
    # An hour short of the retention by the wall clock, so that no TTL monitor gets there first.
    stored_at = NOW - DEFAULT_IDEMPOTENCY_RETENTION + timedelta(hours=1)
    await store.put("fwd:old:pay", StoredOutcome(OutcomeKind.COMPLETED, stored_at=stored_at))
    await store.put("fwd:new:pay", COMPLETED)
    expires = NOW + timedelta(hours=1)

    assert await store.purge(expires) == 0  # exactly as old as the retention: kept
    assert await store.purge(expires + timedelta(seconds=1)) == 1

    assert await store.get("fwd:old:pay") is None
    assert await store.get("fwd:new:pay") == COMPLETED
    assert await store.put("fwd:old:pay", FAILED) == FAILED  # the key is free again


async def test_mongo_expires_entries_with_a_ttl_index(unique: str) -> None:
    database = AsyncMongoMockClient()[f"idem_{unique}"]
    store = MongoIdempotency(database, retention=timedelta(days=3))  # type: ignore[arg-type]

    await store.setup()

    indexes = await store.collection.index_information()
    assert list(indexes["expire_v1"]["key"]) == [("stored_at", 1)]
    assert indexes["expire_v1"]["expireAfterSeconds"] == 3 * 86400


async def test_urls_pick_the_backend() -> None:
    assert isinstance(open_idempotency("memory://"), MemoryIdempotency)
    postgres = open_idempotency("postgresql://svc:pw@db.example/payments")
    assert isinstance(postgres, PostgresIdempotency)
    assert postgres.table == "saga_idempotency"
    assert isinstance(open_idempotency("postgres://db.example/payments"), PostgresIdempotency)
    mongo = open_idempotency("mongodb://svc:pw@db.example/payments")
    assert isinstance(mongo, MongoIdempotency)
    assert (mongo.database.name, mongo.collection.name) == ("payments", "idempotency")
    await mongo.close()


def test_an_unknown_scheme_is_a_config_error_without_the_password() -> None:
    with pytest.raises(ConfigError) as raised:
        open_idempotency("redis://svc:s3cret@cache/0")
    assert "redis://svc:***@cache/0" in str(raised.value)
    assert "s3cret" not in str(raised.value)


def test_schemes_are_case_insensitive_as_for_the_saga_store() -> None:
    assert isinstance(open_idempotency("MEMORY://"), MemoryIdempotency)
    assert isinstance(open_idempotency("PostgreSQL://db.example/payments"), PostgresIdempotency)
