"""Durable idempotency stores for participant services: PostgreSQL and MongoDB.

Both keep one row or document per idempotency key holding either a claim (claimant, lease
expiry, how many claims so far) or an outcome, and implement the protocol of
:mod:`participants.idempotency` with single-statement atomic writes:

* ``claim``: PostgreSQL ``INSERT ... ON CONFLICT DO UPDATE ... WHERE <no outcome and the lease
  expired> RETURNING``; MongoDB ``find_one_and_update`` with ``upsert`` on the same filter (a
  duplicate key error means somebody else's entry is there). One round trip on the fast path;
  a second one reads the entry when the claim was refused.
* ``put`` (complete): the same upsert guarded by "no outcome yet": first writer wins.
* ``tombstone``: ``put`` that also respects a live claim.

In PostgreSQL, claims and outcomes made while a batch of them is being written go together in
the next round trip, one statement over arrays and one transaction for all (group commit,
:mod:`plumbing.batches`): a busy service's claims of new commands share a commit with the
outcomes of finished ones; the keys a batch refused are read back right after it, on the same
connection.
MongoDB writes each alone: ``find_one_and_update`` has no batch form that answers per document.

Both also run a handler's effect in the transaction that records its outcome
(:class:`~participants.idempotency.TransactionalIdempotency`):

* **PostgreSQL** claims *inside* the transaction. The uncommitted row is the claim: another
  replica's claim of the same key waits on it and then reads the committed outcome, and a
  claimant that dies has its transaction rolled back by the server, so no lease has to run
  out. Fast path: ``BEGIN``, the claim, the handler's statements, the outcome, ``COMMIT``.
* **MongoDB** transactions do not wait for each other (a conflicting write aborts with a
  write conflict), so the claim is committed first with a lease, and the transaction holds
  the handler's writes and the outcome, guarded by "the claim is still ours". A claimant that
  dies leaves its lease to run out; its transaction never commits. Needs a replica set.

Retention (default :data:`~participants.idempotency.DEFAULT_IDEMPOTENCY_RETENTION`, 7 days)
must outlast any redelivery or manual retry. MongoDB expires entries with a TTL index on
``stored_at``; PostgreSQL has no TTL, so a service calls :meth:`PostgresIdempotency.purge`
now and then (both stores have it).

Defaults: the table ``saga_idempotency`` in the database of a ``postgresql://`` URL; the
collection ``idempotency`` in the database of a ``mongodb://`` URL (default ``saga``). Keys
name the saga and step, so services may share one table or collection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from pymongo import ASCENDING, IndexModel, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from contracts.messages import ErrorDetail
from participants.idempotency import (
    DEFAULT_IDEMPOTENCY_RETENTION,
    Busy,
    Claimed,
    ClaimLost,
    ClaimResult,
    OutcomeKind,
    OutcomeTransaction,
    Stored,
    StoredOutcome,
)
from plumbing.batches import BatchCut, Batcher
from plumbing.clock import Clock, SystemClock, utc
from plumbing.errors import StoreUnavailable
from plumbing.mongo import Document, MongoCollection
from plumbing.postgres import PostgresPool, row_count, table_name

DEFAULT_TABLE: Final = "saga_idempotency"
"""The PostgreSQL table outcomes are kept in unless another name is given."""

DEFAULT_COLLECTION: Final = "idempotency"
"""The MongoDB collection outcomes are kept in unless another name is given."""

_CLAIM_WAIT: Final = 600.0  # seconds a claim may wait on another replica's open transaction
_ATTEMPTS: Final = 5  # an entry can change between a refused write and the read-back

_MIGRATIONS: Final = (
    """
    CREATE TABLE "{table}" (
        key       text PRIMARY KEY,
        kind      text NOT NULL,
        result    jsonb,
        error     jsonb,
        stored_at timestamptz NOT NULL
    );
    CREATE INDEX "{table}_stored_at" ON "{table}" (stored_at);
    """,
    # Claims: a row without an outcome (kind NULL) is a claim until lease_until.
    """
    ALTER TABLE "{table}" ALTER COLUMN kind DROP NOT NULL;
    ALTER TABLE "{table}"
        ADD COLUMN claimant    text,
        ADD COLUMN lease_until timestamptz,
        ADD COLUMN claims      integer NOT NULL DEFAULT 0;
    """,
)

_FOUND: Final = "kind, result, error, stored_at, lease_until"

_SQL: Final = {
    # A batch of claims and outcomes in one statement (one row per key, in key order). An
    # outcome replaces a claim; a claim replaces only one whose lease ran out; neither replaces
    # an outcome. The keys it did not write are read back with "found_many" (a read-back in
    # the same statement, a CTE, cost PostgreSQL twice the CPU to plan on every call).
    "write": """
        INSERT INTO "{table}" AS t
            (key, kind, result, error, stored_at, claimant, lease_until, claims)
        SELECT key, kind, result, error, stored_at, claimant, lease_until,
               CASE WHEN kind IS NULL THEN 1 ELSE 0 END
        FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::jsonb[],
                    $5::timestamptz[], $6::text[], $7::timestamptz[])
            AS i(key, kind, result, error, stored_at, claimant, lease_until)
        ORDER BY key
        ON CONFLICT (key) DO UPDATE
            SET kind = EXCLUDED.kind, result = EXCLUDED.result, error = EXCLUDED.error,
                stored_at = CASE WHEN EXCLUDED.kind IS NULL THEN t.stored_at
                                 ELSE EXCLUDED.stored_at END,
                claimant = EXCLUDED.claimant, lease_until = EXCLUDED.lease_until,
                claims = t.claims + EXCLUDED.claims
            WHERE t.kind IS NULL AND (EXCLUDED.kind IS NOT NULL OR t.lease_until IS NULL
                                      OR t.lease_until <= EXCLUDED.stored_at)
        RETURNING key, true, claims
    """,
    "found_many": 'SELECT key, false, claims, {found} FROM "{table}" WHERE key = ANY($1)',
    "claim": """
        WITH claimed AS (
            INSERT INTO "{table}" AS t (key, stored_at, claimant, lease_until, claims)
            VALUES ($1, $3, $2, $4, 1)
            ON CONFLICT (key) DO UPDATE
                SET claimant = EXCLUDED.claimant,
                    lease_until = EXCLUDED.lease_until,
                    claims = t.claims + 1
                WHERE t.kind IS NULL AND (t.lease_until IS NULL OR t.lease_until <= $3)
            RETURNING claims
        )
        SELECT $1::text, true, claims, NULL::text, NULL::jsonb, NULL::jsonb,
               NULL::timestamptz, NULL::timestamptz
        FROM claimed
        UNION ALL
        SELECT key, false, claims, {found} FROM "{table}"
        WHERE key = $1 AND NOT EXISTS (SELECT 1 FROM claimed)
    """,
    "put": """
        INSERT INTO "{table}" AS t (key, kind, result, error, stored_at)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (key) DO UPDATE
            SET kind = EXCLUDED.kind, result = EXCLUDED.result, error = EXCLUDED.error,
                stored_at = EXCLUDED.stored_at, claimant = NULL, lease_until = NULL
            WHERE t.kind IS NULL
        RETURNING key
    """,
    "tombstone": """
        INSERT INTO "{table}" AS t (key, kind, stored_at) VALUES ($1, 'tombstone', $2)
        ON CONFLICT (key) DO UPDATE
            SET kind = EXCLUDED.kind, stored_at = EXCLUDED.stored_at, claimant = NULL,
                lease_until = NULL
            WHERE t.kind IS NULL AND (t.lease_until IS NULL OR t.lease_until <= $2)
        RETURNING stored_at
    """,
    "complete": """
        UPDATE "{table}" SET kind = $3, result = $4, error = $5, stored_at = $6,
            claimant = NULL, lease_until = NULL
        WHERE key = $1 AND claimant = $2 AND kind IS NULL
    """,
    "renew": """
        UPDATE "{table}" SET lease_until = $3 WHERE key = $1 AND claimant = $2 AND kind IS NULL
    """,
    "release": 'DELETE FROM "{table}" WHERE key = $1 AND claimant = $2 AND kind IS NULL',
    "found": 'SELECT {found} FROM "{table}" WHERE key = $1',
    "get": """
        SELECT kind, result, error, stored_at FROM "{table}" WHERE key = $1 AND kind IS NOT NULL
    """,
    "purge": """
        DELETE FROM "{table}" WHERE key IN (
            SELECT key FROM "{table}" WHERE stored_at < $1 LIMIT $2)
    """,
}


def _outcome(kind: str, result: Any, error: Any, stored_at: Any) -> StoredOutcome:
    return StoredOutcome(
        kind=OutcomeKind(kind),
        result=result,
        error=None if error is None else ErrorDetail.model_validate(error),
        stored_at=None if stored_at is None else utc(stored_at),
    )


def _found(kind: Any, result: Any, error: Any, stored_at: Any, lease_until: Any) -> Stored | Busy:
    """An entry read back after a refused write: its outcome, or the live claim on it."""
    if kind is not None:
        return Stored(_outcome(kind, result, error, stored_at))
    return Busy(utc(lease_until))


def _settled(found: list[Any], now: datetime) -> bool:
    """Whether a row read back has an outcome or a live claim (not one that just lapsed)."""
    kind, lease_until = found[0], found[4]
    return kind is not None or (lease_until is not None and utc(lease_until) > now)


def _error_json(outcome: StoredOutcome) -> Document | None:
    return None if outcome.error is None else outcome.error.model_dump(mode="json")


def _vanished(key: str) -> StoreUnavailable:
    return StoreUnavailable(f"idempotency key {key!r} kept changing before it could be read")


def _cut(what: str, key: str, cut: BatchCut) -> StoreUnavailable:
    return StoreUnavailable(f"the {what} of idempotency key {key!r} was cut short: {cut}")


@dataclass(frozen=True)
class _Write:
    """A claim or an outcome waiting for its batch: a claim has a claimant and no kind, an
    outcome a kind and no claimant. ``stored_at`` is a claim's "now"."""

    key: str
    stored_at: datetime
    kind: str | None = None
    result: Any = None
    error: Document | None = None
    claimant: str | None = None
    lease_until: datetime | None = None


def _claim_found(row: Sequence[Any] | None, now: datetime) -> ClaimResult | None:
    """What one ``claim`` row says; None when it must be asked again (no row, or a claim that
    lapsed between the refused write and the read)."""
    if row is None:
        # The conflicting entry was committed after this statement's snapshot (it waited for
        # that transaction), or went before it was read back; the next statement sees it.
        return None
    _, mine, claims, *found = row
    if mine:
        return Claimed(first=claims == 1)
    return _found(*found) if _settled(found, now) else None


class PostgresIdempotency:
    """Claims and outcomes in a PostgreSQL table, one row per key.

    Args:
        url: a ``postgresql://`` URL.
        table: the table name (a plain identifier).
        retention: how old an entry must be for :meth:`purge` to delete it.
        pool_size: connections at most. A transactional handler holds one while it runs;
            at most ``pool_size - 2`` of them run at once (the others wait their turn in the
            process), so that claims and outcomes of other commands still get a connection.
            Every replica of every service has a pool: keep the sum under the server's
            ``max_connections``.
        clock: stamps ``stored_at`` when an outcome comes without one.
    """

    def __init__(
        self,
        url: str,
        *,
        table: str = DEFAULT_TABLE,
        retention: timedelta = DEFAULT_IDEMPOTENCY_RETENTION,
        connect_timeout: float = 5.0,
        pool_size: int = 10,
        clock: Clock | None = None,
    ) -> None:
        self.table = table_name(table)
        self.retention = retention
        self.clock: Clock = clock or SystemClock()
        self.pool = PostgresPool(url, connect_timeout=connect_timeout, max_size=pool_size)
        # Waiting here has no deadline, unlike waiting for a pooled connection (which fails
        # after connect_timeout): a busy service queues its transactional commands.
        self._open_transactions = asyncio.Semaphore(max(1, pool_size - 2))
        self._sql = {name: sql.format(table=self.table, found=_FOUND) for name, sql in _SQL.items()}
        # Claims and outcomes made while one batch of them is written go together in the next
        # (group commit; see plumbing.batches): one statement, one round trip and one commit
        # for all of them. A busy service's claims of new commands ride with the outcomes of
        # finished ones.
        self._writes: Batcher[_Write, Sequence[Any] | None] = Batcher(
            self._write, key=lambda write: write.key
        )

    async def setup(self) -> None:
        """Connect, and create or migrate the table; idempotent."""
        await self.pool.migrate(self.table, _MIGRATIONS)

    async def get(self, key: str) -> StoredOutcome | None:
        """The stored outcome for ``key``, if any."""
        async with self.pool.connection() as connection:
            row = await connection.fetchrow(self._sql["get"], key)
        return None if row is None else _outcome(*row)

    async def claim(self, key: str, claimant: str, now: datetime, lease: timedelta) -> ClaimResult:
        """The stored outcome, else the claim, else who holds it; one statement.

        Claims and outcomes submitted while another batch is being written go together in the
        next round trip (one statement, one transaction).
        """
        write = _Write(key, now, claimant=claimant, lease_until=now + lease)
        if (found := _claim_found(await self._submit("claim", write), now)) is not None:
            return found
        async with self.pool.connection() as connection:  # ask again, alone
            return await self._claim(connection, key, claimant, now, lease)

    async def _submit(self, what: str, write: _Write) -> Sequence[Any] | None:
        try:
            return await self._writes.submit(write)
        except BatchCut as e:
            raise _cut(what, write.key, e) from e

    async def _write(self, writes: list[_Write]) -> list[Sequence[Any] | None]:
        """Write a batch of claims and outcomes in one statement; each key's row: the one
        written, or the entry that refused the write, read back (None when it vanished).

        The statement is one transaction, which locks each row it writes until it commits:
        rows are taken in key order, so two replicas' batches over the same keys queue behind
        each other instead of deadlocking. Only claims of handlers that are not transactional
        come here: none of their keys is held by a long transaction (a transactional claim
        takes its own connection, see :meth:`transaction`), so one claim does not hold up the
        batch; the wait is not held to the pool's statement timeout all the same.
        """
        rows_in = [
            (w.key, w.kind, w.result, w.error, w.stored_at, w.claimant, w.lease_until)
            for w in writes
        ]
        columns = [list(column) for column in zip(*rows_in, strict=True)]
        async with self.pool.connection() as connection:
            rows = await connection.fetch(self._sql["write"], *columns, timeout=_CLAIM_WAIT)
            by_key: dict[str, Sequence[Any]] = {row[0]: row for row in rows}
            if refused := [write.key for write in writes if write.key not in by_key]:
                # Duplicates and busy keys: rare, so their read-back is a second round trip.
                for row in await connection.fetch(self._sql["found_many"], refused):
                    by_key[row[0]] = row
        return [by_key.get(write.key) for write in writes]

    async def _claim(
        self, connection: Any, key: str, claimant: str, now: datetime, lease: timedelta
    ) -> ClaimResult:
        for _ in range(_ATTEMPTS):
            # The wait lasts as long as the other claimant's handler, so it is not held to
            # the pool's statement timeout.
            row = await connection.fetchrow(
                self._sql["claim"], key, claimant, now, now + lease, timeout=_CLAIM_WAIT
            )
            if (found := _claim_found(row, now)) is not None:
                return found
        raise _vanished(key)

    async def renew(self, key: str, claimant: str, until: datetime) -> bool:
        """Extend ``claimant``'s claim to ``until``."""
        async with self.pool.connection() as connection:
            status = await connection.execute(self._sql["renew"], key, claimant, until)
        return row_count(status) == 1

    async def put(self, key: str, outcome: StoredOutcome) -> StoredOutcome:
        """Store ``outcome`` unless an outcome is stored already; returns what is stored now.

        Written in the next batch of claims and outcomes, like :meth:`claim`.
        """
        stored_at = outcome.stored_at or self.clock.now()
        kind, error = outcome.kind.value, _error_json(outcome)
        written = StoredOutcome(outcome.kind, outcome.result, outcome.error, stored_at)
        write = _Write(key, stored_at, kind=kind, result=outcome.result, error=error)
        row = await self._submit("outcome", write)
        if row is not None:
            _, mine, _, *found = row
            if mine:
                return written
            if found[0] is not None:
                return _outcome(*found[:4])  # another writer won
        async with self.pool.connection() as connection:
            for _ in range(_ATTEMPTS):
                # Another writer won after the statement's snapshot; a fresh one sees its row.
                found_row = await connection.fetchrow(self._sql["get"], key)
                if found_row is not None:
                    return _outcome(*found_row)
                arguments = (key, kind, outcome.result, error, stored_at)
                if await connection.fetchval(self._sql["put"], *arguments) is not None:
                    return written
        raise _vanished(key)

    async def release(self, key: str, claimant: str) -> None:
        """Drop ``claimant``'s claim without an outcome."""
        async with self.pool.connection() as connection:
            await connection.execute(self._sql["release"], key, claimant)

    async def tombstone(self, key: str, now: datetime) -> Stored | Busy:
        """A tombstone unless an outcome is stored or a live claim holds the key."""
        async with self.pool.connection() as connection:
            for _ in range(_ATTEMPTS):
                stored_at = await connection.fetchval(self._sql["tombstone"], key, now)
                if stored_at is not None:
                    return Stored(StoredOutcome(OutcomeKind.TOMBSTONE, stored_at=utc(stored_at)))
                row = await connection.fetchrow(self._sql["found"], key)
                if row is not None and _settled(list(row), now):
                    return _found(*row)
        raise _vanished(key)

    @contextlib.asynccontextmanager
    async def transaction(
        self, key: str, claimant: str, now: datetime, lease: timedelta
    ) -> AsyncIterator[OutcomeTransaction]:
        """A transaction that holds the claim on ``key`` as an uncommitted row.

        ``session`` is the ``asyncpg.Connection``; write the effect with it. Commits when the
        block exits after ``complete``; rolls back otherwise.
        """
        async with self._open_transactions, self.pool.connection() as connection:
            transaction = connection.transaction()
            await transaction.start()
            try:
                handle = _PostgresTransaction(self, connection, key, claimant)
                handle.claim = await self._claim(connection, key, claimant, now, lease)
                yield handle
            except BaseException:
                with contextlib.suppress(Exception):  # the connection may be what failed
                    await transaction.rollback()
                raise
            if handle.completed and not handle.abandoned:
                await transaction.commit()
            else:
                await transaction.rollback()

    async def purge(self, now: datetime | None = None) -> int:
        """Delete entries stored more than the retention before ``now``; returns how many."""
        cutoff = (now or self.clock.now()) - self.retention
        return await self.pool.delete_in_batches(self._sql["purge"], cutoff)

    async def drop(self) -> None:
        """Delete the table and its schema record (for tests and uninstalling)."""
        await self.pool.drop(self.table)

    async def close(self) -> None:
        """Close the connection pool."""
        await self.pool.close()


class _PostgresTransaction:
    """The handle a transactional handler's run gets from :class:`PostgresIdempotency`."""

    def __init__(
        self, store: PostgresIdempotency, connection: Any, key: str, claimant: str
    ) -> None:
        self.store = store
        self.session: Any = connection
        self.key = key
        self.claimant = claimant
        self.claim: ClaimResult = Claimed(first=False)
        self.completed = False
        self.abandoned = False

    async def complete(self, outcome: StoredOutcome) -> StoredOutcome:
        stored_at = outcome.stored_at or self.store.clock.now()
        status = await self.session.execute(
            self.store._sql["complete"],
            self.key,
            self.claimant,
            outcome.kind.value,
            outcome.result,
            _error_json(outcome),
            stored_at,
        )
        if row_count(status) != 1:
            raise ClaimLost(f"the claim on {self.key!r} is no longer ours")
        self.completed = True
        return StoredOutcome(outcome.kind, outcome.result, outcome.error, stored_at)

    def abandon(self) -> None:
        self.abandoned = True


class MongoIdempotency(MongoCollection):
    """Claims and outcomes in a MongoDB collection, ``_id`` = key, expired by a TTL index on
    ``stored_at``.

    Build it with :meth:`from_url`, or over a database you already have.

    Args:
        database: an ``AsyncDatabase``.
        collection: the collection name.
        retention: the TTL: entries are deleted this long after ``stored_at``.
        clock: stamps ``stored_at`` when an outcome comes without one.
    """

    def __init__(
        self,
        database: AsyncDatabase[Document],
        *,
        collection: str = DEFAULT_COLLECTION,
        retention: timedelta = DEFAULT_IDEMPOTENCY_RETENTION,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(database, collection)
        self.retention = retention
        self.clock: Clock = clock or SystemClock()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        collection: str = DEFAULT_COLLECTION,
        retention: timedelta = DEFAULT_IDEMPOTENCY_RETENTION,
        connect_timeout: float = 5.0,
    ) -> MongoIdempotency:
        """A store over the database named by the URL's path (default ``saga``)."""
        return cls._connected(url, connect_timeout, collection=collection, retention=retention)

    async def setup(self) -> None:
        """Check the server answers and create the TTL index; idempotent.

        Changing the retention later needs the index dropped first (or ``collMod``): MongoDB
        refuses an index whose options differ from the existing one of the same name.
        """
        ttl = IndexModel(
            [("stored_at", ASCENDING)],
            name="expire_v1",
            expireAfterSeconds=int(self.retention.total_seconds()),
        )
        with self._errors():
            await self.database.command("ping")
            await self.collection.create_indexes([ttl])

    async def get(self, key: str) -> StoredOutcome | None:
        """The stored outcome for ``key``, if any."""
        with self._errors():
            document = await self.collection.find_one({"_id": key, "kind": {"$ne": None}})
        return None if document is None else _from_document(document)

    async def claim(self, key: str, claimant: str, now: datetime, lease: timedelta) -> ClaimResult:
        """The stored outcome, else the claim, else who holds it."""
        update = {
            "$set": {"claimant": claimant, "lease_until": now + lease},
            "$inc": {"claims": 1},
            "$setOnInsert": {"stored_at": now},
        }
        with self._errors():
            for _ in range(_ATTEMPTS):
                won = await self._upsert(_claimable(key, now), update)
                if won is not None:
                    return Claimed(first=won.get("claims") == 1)
                found = await self._found(key, now)
                if found is not None:
                    return found
        raise _vanished(key)

    async def renew(self, key: str, claimant: str, until: datetime) -> bool:
        """Extend ``claimant``'s claim to ``until``."""
        with self._errors():
            result = await self.collection.update_one(
                {"_id": key, "claimant": claimant, "kind": None},
                {"$set": {"lease_until": until}},
            )
        return int(result.matched_count) == 1

    async def put(self, key: str, outcome: StoredOutcome) -> StoredOutcome:
        """Store ``outcome`` unless an outcome is stored already; returns what is stored now."""
        stored_at = outcome.stored_at or self.clock.now()
        with self._errors():
            for _ in range(_ATTEMPTS):
                won = await self._upsert({"_id": key, "kind": None}, _decided(outcome, stored_at))
                if won is not None:
                    return StoredOutcome(outcome.kind, outcome.result, outcome.error, stored_at)
                found = await self.collection.find_one({"_id": key, "kind": {"$ne": None}})
                if found is not None:
                    return _from_document(found)
        raise _vanished(key)

    async def release(self, key: str, claimant: str) -> None:
        """Drop ``claimant``'s claim without an outcome."""
        with self._errors():
            await self.collection.delete_one({"_id": key, "claimant": claimant, "kind": None})

    async def tombstone(self, key: str, now: datetime) -> Stored | Busy:
        """A tombstone unless an outcome is stored or a live claim holds the key."""
        tombstone = StoredOutcome(OutcomeKind.TOMBSTONE, stored_at=now)
        with self._errors():
            for _ in range(_ATTEMPTS):
                if await self._upsert(_claimable(key, now), _decided(tombstone, now)) is not None:
                    return Stored(tombstone)
                found = await self._found(key, now)
                if found is not None:
                    return found
        raise _vanished(key)

    @contextlib.asynccontextmanager
    async def transaction(
        self, key: str, claimant: str, now: datetime, lease: timedelta
    ) -> AsyncIterator[OutcomeTransaction]:
        """A committed claim with a lease, and a transaction for the effect and the outcome.

        ``session`` is the ``AsyncClientSession`` (pass ``session=ctx.transaction`` to every
        write of the effect). Commits when the block exits after ``complete``; aborts
        otherwise, and the claim is released.
        """
        handle = _MongoTransaction(self, key, claimant, await self.claim(key, claimant, now, lease))
        if not isinstance(handle.claim, Claimed):
            yield handle
            return
        try:
            with self._errors():
                session = self.database.client.start_session()
            async with session:
                with self._errors():
                    await session.start_transaction()
                handle.session = session
                try:
                    yield handle
                except BaseException:
                    with contextlib.suppress(Exception):
                        await session.abort_transaction()
                    raise
                with self._errors():
                    if handle.completed and not handle.abandoned:
                        await session.commit_transaction()
                    else:
                        await session.abort_transaction()
        finally:
            if not (handle.completed and not handle.abandoned):
                with contextlib.suppress(Exception):  # the lease runs out if this fails
                    await self.release(key, claimant)

    async def purge(self, now: datetime | None = None) -> int:
        """Delete entries older than the retention now, ahead of the TTL monitor."""
        cutoff = (now or self.clock.now()) - self.retention
        with self._errors():
            result = await self.collection.delete_many({"stored_at": {"$lt": cutoff}})
        return int(result.deleted_count)

    async def _upsert(self, query: Document, update: Document) -> Document | None:
        """The document after ``update`` if ``query`` matched or nothing had the key; None
        when an entry with the key is there but does not match."""
        try:
            return await self.collection.find_one_and_update(
                query, update, upsert=True, return_document=ReturnDocument.AFTER
            )
        except DuplicateKeyError:
            return None

    async def _found(self, key: str, now: datetime) -> Stored | Busy | None:
        """The entry read back after a refused write; None if it changed meanwhile."""
        document = await self.collection.find_one({"_id": key})
        if document is None:
            return None
        if document.get("kind") is not None:
            return Stored(_from_document(document))
        lease_until = document.get("lease_until")
        if lease_until is None or utc(lease_until) <= now:
            return None  # expired meanwhile: try again
        return Busy(utc(lease_until))


class _MongoTransaction:
    """The handle a transactional handler's run gets from :class:`MongoIdempotency`."""

    def __init__(self, store: MongoIdempotency, key: str, claimant: str, claim: ClaimResult):
        self.store = store
        self.key = key
        self.claimant = claimant
        self.claim = claim
        self.session: Any = None
        self.completed = False
        self.abandoned = False

    async def complete(self, outcome: StoredOutcome) -> StoredOutcome:
        stored_at = outcome.stored_at or self.store.clock.now()
        with self.store._errors():
            result = await self.store.collection.update_one(
                {"_id": self.key, "claimant": self.claimant, "kind": None},
                _decided(outcome, stored_at),
                session=self.session,
            )
        if int(result.matched_count) != 1:
            raise ClaimLost(f"the claim on {self.key!r} is no longer ours")
        self.completed = True
        return StoredOutcome(outcome.kind, outcome.result, outcome.error, stored_at)

    def abandon(self) -> None:
        self.abandoned = True


def _claimable(key: str, now: datetime) -> Document:
    """The entry for ``key`` if it has no outcome and no live claim."""
    return {
        "_id": key,
        "kind": None,
        "$or": [{"lease_until": None}, {"lease_until": {"$lte": now}}],
    }


def _decided(outcome: StoredOutcome, stored_at: datetime) -> Document:
    """The update that turns an entry into ``outcome``."""
    return {
        "$set": {
            "kind": outcome.kind.value,
            "result": outcome.result,
            "error": _error_json(outcome),
            "stored_at": stored_at,
        },
        "$unset": {"claimant": "", "lease_until": ""},
    }


def _from_document(document: Document) -> StoredOutcome:
    return _outcome(
        document["kind"], document.get("result"), document.get("error"), document["stored_at"]
    )
