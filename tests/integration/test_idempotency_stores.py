"""The durable participant idempotency stores: PostgreSQL for real, MongoDB over mongomock and
on the server ``SAGA_TEST_MONGO_URL`` names (SecantusDB under ``.ci/run``), against the in-memory
reference."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from contracts.messages import ErrorDetail
from participants.idempotency import (
    DEFAULT_IDEMPOTENCY_RETENTION,
    Busy,
    Claimed,
    ClaimResult,
    IdempotencyStore,
    MemoryIdempotency,
    OutcomeKind,
    Stored,
    StoredOutcome,
    TransactionalIdempotency,
    open_idempotency,
)
from participants.idempotency_stores import (
    MongoIdempotency,
    PostgresIdempotency,
)
from plumbing.errors import ConfigError
from tests.conftest import with_database
from tests.support.mongomock_async import AsyncMongoMockClient
from tests.support.stores import RoundTrips

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


@contextlib.asynccontextmanager
async def _backend(
    kind: str, request: pytest.FixtureRequest, unique: str
) -> AsyncIterator[PostgresIdempotency | MongoIdempotency | MemoryIdempotency]:
    """One backend, empty, torn down afterwards."""
    if kind == "memory":
        yield MemoryIdempotency()
    elif kind == "postgres":
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
    elif kind == "mongomock":
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


@pytest.fixture(
    params=[
        "memory",
        pytest.param("postgres", marks=pytest.mark.postgres),
        "mongomock",
        "mongo",
    ]
)
async def store(
    request: pytest.FixtureRequest, unique: str
) -> AsyncIterator[PostgresIdempotency | MongoIdempotency | MemoryIdempotency]:
    """Each backend, empty, torn down after the test."""
    async with _backend(request.param, request, unique) as backend:
        yield backend


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres), "mongo"])
async def transactional_store(
    request: pytest.FixtureRequest, unique: str
) -> AsyncIterator[PostgresIdempotency | MongoIdempotency]:
    """Each backend with database transactions on a real server (the in-memory store and
    mongomock have none to roll an effect back with)."""
    async with _backend(request.param, request, unique) as backend:
        assert isinstance(backend, PostgresIdempotency | MongoIdempotency)
        yield backend


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


async def test_purge_deletes_entries_older_than_the_retention(store: IdempotencyStore) -> None:
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


# --- claims ------------------------------------------------------------------------------------

LEASE = timedelta(seconds=30)
KEY = "fwd:s-1:pay"


async def test_the_first_claim_is_taken_and_a_live_one_refuses_the_next(
    store: IdempotencyStore,
) -> None:
    assert await store.claim(KEY, "a", NOW, LEASE) == Claimed(first=True)

    busy = await store.claim(KEY, "b", NOW + timedelta(seconds=1), LEASE)

    assert isinstance(busy, Busy)
    assert abs(busy.until - (NOW + LEASE)) < timedelta(milliseconds=1)
    assert await store.get(KEY) is None  # a claim is not an outcome


async def test_a_stored_outcome_answers_every_claim(store: IdempotencyStore) -> None:
    await store.claim(KEY, "a", NOW, LEASE)
    assert await store.put(KEY, COMPLETED) == COMPLETED  # completes the claim

    assert await store.claim(KEY, "b", NOW, LEASE) == Stored(COMPLETED)
    assert await store.claim(KEY, "a", NOW + 2 * LEASE, LEASE) == Stored(COMPLETED)
    assert await store.get(KEY) == COMPLETED


async def test_an_expired_claim_is_taken_over_and_says_it_was_claimed_before(
    store: IdempotencyStore,
) -> None:
    await store.claim(KEY, "crashed", NOW, LEASE)

    assert await store.claim(KEY, "b", NOW + LEASE, LEASE) == Claimed(first=False)

    assert not await store.renew(KEY, "crashed", NOW + 3 * LEASE)
    assert await store.renew(KEY, "b", NOW + 3 * LEASE)
    assert isinstance(await store.claim(KEY, "c", NOW + 2 * LEASE, LEASE), Busy)


async def test_a_released_claim_frees_the_key(store: IdempotencyStore) -> None:
    await store.claim(KEY, "a", NOW, LEASE)
    await store.release(KEY, "someone-else")  # not theirs: nothing happens
    assert isinstance(await store.claim(KEY, "b", NOW, LEASE), Busy)

    await store.release(KEY, "a")

    assert await store.claim(KEY, "b", NOW, LEASE) == Claimed(first=True)


async def test_a_tombstone_respects_outcomes_and_live_claims(store: IdempotencyStore) -> None:
    assert await store.tombstone("fwd:absent:pay", NOW) == Stored(TOMBSTONE)
    assert await store.claim("fwd:absent:pay", "late", NOW, LEASE) == Stored(TOMBSTONE)

    await store.put("fwd:done:pay", COMPLETED)
    assert await store.tombstone("fwd:done:pay", NOW) == Stored(COMPLETED)

    await store.claim("fwd:running:pay", "a", NOW, LEASE)
    assert isinstance(await store.tombstone("fwd:running:pay", NOW), Busy)
    # Its claimant died: the tombstone wins once the lease has run out, and the claimant's
    # own outcome, should it come after all, loses to it.
    assert await store.tombstone("fwd:running:pay", NOW + LEASE) == Stored(
        StoredOutcome(OutcomeKind.TOMBSTONE, stored_at=NOW + LEASE)
    )
    assert (await store.put("fwd:running:pay", COMPLETED)).kind is OutcomeKind.TOMBSTONE


async def test_concurrent_claimants_get_one_claim(store: IdempotencyStore) -> None:
    found = await asyncio.gather(
        *(store.claim("fwd:race:pay", f"replica-{n}", NOW, LEASE) for n in range(20))
    )

    assert found.count(Claimed(first=True)) == 1
    assert all(isinstance(f, Busy) for f in found if not isinstance(f, Claimed))


async def test_a_claim_round_trips_through_purge(store: IdempotencyStore) -> None:
    # An hour short of the retention by the wall clock, so that no TTL monitor gets there first.
    await store.claim(KEY, "a", NOW - DEFAULT_IDEMPOTENCY_RETENTION + timedelta(hours=1), LEASE)

    assert await store.purge(NOW + timedelta(hours=1, seconds=1)) == 1
    assert await store.claim(KEY, "b", NOW, LEASE) == Claimed(first=True)


async def test_claims_and_outcomes_of_many_commands_at_once_each_get_their_own_answer(
    store: IdempotencyStore,
) -> None:
    """What a busy service does: many claims at once, then many outcomes at once (the
    PostgreSQL store writes those that arrive together in one round trip)."""
    keys = [f"fwd:many-{n:02}:pay" for n in range(30)]
    await store.put(keys[0], COMPLETED)  # answered before
    await store.claim(keys[1], "other-replica", NOW, LEASE)  # running elsewhere
    await store.claim(keys[2], "crashed", NOW - 2 * LEASE, LEASE)  # its lease ran out

    claims = await asyncio.gather(*(store.claim(key, "me", NOW, LEASE) for key in keys))

    assert claims[0] == Stored(COMPLETED)
    assert isinstance(claims[1], Busy)
    assert claims[2] == Claimed(first=False)
    assert claims[3:] == [Claimed(first=True)] * (len(keys) - 3)
    outcomes = [
        StoredOutcome(OutcomeKind.COMPLETED, result={"n": n}, stored_at=NOW)
        for n in range(len(keys))
    ]

    stored = await asyncio.gather(*(store.put(k, o) for k, o in zip(keys, outcomes, strict=True)))

    assert stored[0] == COMPLETED  # the first writer wins
    assert stored[1:] == outcomes[1:]
    for key, outcome in zip(keys[1:], outcomes[1:], strict=True):
        assert await store.get(key) == outcome


@pytest.mark.postgres
async def test_postgres_writes_claims_and_outcomes_that_arrive_together_in_one_round_trip(
    request: pytest.FixtureRequest, unique: str
) -> None:
    async with _backend("postgres", request, unique) as store:
        assert isinstance(store, PostgresIdempotency)
        trips = RoundTrips(store.pool)
        keys = [f"fwd:gc-{n:02}:pay" for n in range(40)]
        claims = await asyncio.gather(*(store.claim(key, "me", NOW, LEASE) for key in keys))
        assert claims == [Claimed(first=True)] * len(keys)
        # The first claim goes alone; the others arrive while it is written and go together.
        assert trips.count < len(keys) // 4, f"{trips.count} round trips for 40 claims"
        trips.count = 0
        stored = await asyncio.gather(*(store.put(key, COMPLETED) for key in keys))
        assert stored == [COMPLETED] * len(keys)
        assert trips.count < len(keys) // 4, f"{trips.count} round trips for 40 outcomes"


@pytest.mark.postgres
async def test_postgres_writes_claims_and_outcomes_that_arrive_together_in_one_batch(
    request: pytest.FixtureRequest, unique: str
) -> None:
    """A busy service claims new commands while it stores the outcomes of finished ones: they
    share round trips, and a refused outcome is answered with the one that won."""
    async with _backend("postgres", request, unique) as store:
        assert isinstance(store, PostgresIdempotency)
        finished = [f"fwd:done-{n:02}:pay" for n in range(20)]
        await asyncio.gather(*(store.claim(key, "me", NOW, LEASE) for key in finished))
        await store.put(finished[0], FAILED)  # a duplicate delivery's outcome won already
        trips = RoundTrips(store.pool)
        new = [f"fwd:new-{n:02}:pay" for n in range(20)]

        claims, stored = await asyncio.gather(
            asyncio.gather(*(store.claim(key, "me", NOW, LEASE) for key in new)),
            asyncio.gather(*(store.put(key, COMPLETED) for key in finished)),
        )

        assert claims == [Claimed(first=True)] * len(new)
        assert stored == [FAILED] + [COMPLETED] * (len(finished) - 1)
        # The first write goes alone; the other 39 arrive while it is written and go together.
        assert trips.count <= 2, f"{trips.count} round trips for 20 claims and 20 outcomes"
        assert await store.get(finished[0]) == FAILED
        assert await store.claim(new[0], "other", NOW, LEASE) == Busy(NOW + LEASE)


# --- the outcome in the effect's transaction ----------------------------------------------------


class Effects:
    """A side table the handler writes its effect to, in the store's transaction."""

    def __init__(self, store: PostgresIdempotency | MongoIdempotency, unique: str) -> None:
        self.store = store
        self.table = f"effects_{unique}"

    async def setup(self) -> None:
        if isinstance(self.store, PostgresIdempotency):
            async with self.store.pool.connection() as connection:
                await connection.execute(f'CREATE TABLE "{self.table}" (key text NOT NULL)')

    async def write(self, session: Any, key: str) -> None:
        if isinstance(self.store, PostgresIdempotency):
            await session.execute(f'INSERT INTO "{self.table}" (key) VALUES ($1)', key)
        else:
            await self.store.database[self.table].insert_one({"key": key}, session=session)

    async def count(self, key: str) -> int:
        if isinstance(self.store, PostgresIdempotency):
            async with self.store.pool.connection() as connection:
                found: int = await connection.fetchval(
                    f'SELECT count(*) FROM "{self.table}" WHERE key = $1', key
                )
                return found
        return await self.store.database[self.table].count_documents({"key": key})

    async def drop(self) -> None:
        if isinstance(self.store, PostgresIdempotency):
            async with self.store.pool.connection() as connection:
                await connection.execute(f'DROP TABLE IF EXISTS "{self.table}"')


@pytest.fixture
async def effects(
    transactional_store: PostgresIdempotency | MongoIdempotency, unique: str
) -> AsyncIterator[Effects]:
    """Effects beside each store that has transactions on a real server."""
    made = Effects(transactional_store, unique)
    await made.setup()
    try:
        yield made
    finally:
        await made.drop()


async def test_the_effect_and_its_outcome_commit_together(
    transactional_store: IdempotencyStore, effects: Effects
) -> None:
    store = transactional_store
    assert isinstance(store, TransactionalIdempotency)
    async with store.transaction(KEY, "a", NOW, LEASE) as tx:
        assert tx.claim == Claimed(first=True)
        await effects.write(tx.session, KEY)
        assert await tx.complete(COMPLETED) == COMPLETED

    assert await effects.count(KEY) == 1
    assert await store.get(KEY) == COMPLETED
    async with store.transaction(KEY, "b", NOW, LEASE) as again:
        assert again.claim == Stored(COMPLETED)
    assert await effects.count(KEY) == 1


@pytest.mark.parametrize("how", ["abandon", "raise"])
async def test_an_abandoned_transaction_keeps_neither_effect_nor_claim(
    transactional_store: IdempotencyStore, effects: Effects, how: str
) -> None:
    store = transactional_store
    assert isinstance(store, TransactionalIdempotency)
    with contextlib.suppress(RuntimeError):
        async with store.transaction(KEY, "a", NOW, LEASE) as tx:
            await effects.write(tx.session, KEY)
            if how == "raise":
                raise RuntimeError("the handler failed")
            tx.abandon()

    assert await effects.count(KEY) == 0
    assert await store.get(KEY) is None
    assert await store.claim(KEY, "b", NOW, LEASE) == Claimed(first=True)


async def test_two_transactions_on_one_key_make_one_effect(
    transactional_store: IdempotencyStore, effects: Effects
) -> None:
    store = transactional_store
    assert isinstance(store, TransactionalIdempotency)
    first_in = asyncio.Event()
    let_go = asyncio.Event()

    async def holder() -> None:
        async with store.transaction(KEY, "a", NOW, LEASE) as tx:
            assert tx.claim == Claimed(first=True)
            await effects.write(tx.session, KEY)
            first_in.set()
            await let_go.wait()
            await tx.complete(COMPLETED)

    async def second() -> ClaimResult:
        await first_in.wait()
        async with store.transaction(KEY, "b", NOW, LEASE) as tx:
            # PostgreSQL waits on the uncommitted claim and then reads the outcome; MongoDB
            # sees the committed claim and says who holds it.
            if isinstance(tx.claim, Claimed):
                await effects.write(tx.session, KEY)
            return tx.claim

    async with asyncio.timeout(60):
        holding = asyncio.create_task(holder())
        asking = asyncio.create_task(second())
        await first_in.wait()
        await asyncio.sleep(0.2)  # let the second transaction reach the claim (either way is fine)
        let_go.set()
        await holding
        seen = await asking

    assert seen == Stored(COMPLETED) or isinstance(seen, Busy)
    assert await effects.count(KEY) == 1
    assert await store.get(KEY) == COMPLETED
