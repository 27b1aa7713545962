"""Durable idempotency stores for participant services: PostgreSQL and MongoDB.

Both keep one entry per idempotency key and let the first writer win: ``put`` inserts only if
the key is absent and returns whatever is stored afterwards, so two deliveries of one command
racing on two replicas agree on one outcome, and a tombstone written by an early compensation
keeps a late forward command from acting.

Retention (default :data:`~participants.idempotency.DEFAULT_IDEMPOTENCY_RETENTION`, 7 days)
must outlast any redelivery or manual retry. MongoDB expires entries with a TTL index on
``stored_at``; PostgreSQL has no TTL, so a service calls :meth:`PostgresIdempotency.purge`
now and then (both stores have it).

Defaults: the table ``saga_idempotency`` in the database of a ``postgresql://`` URL; the
collection ``idempotency`` in the database of a ``mongodb://`` URL (default ``saga``). Keys
name the saga and step, so services may share one table or collection.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Final

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from contracts.messages import ErrorDetail
from participants.idempotency import (
    DEFAULT_IDEMPOTENCY_RETENTION,
    OutcomeKind,
    StoredOutcome,
)
from plumbing.clock import Clock, SystemClock, utc
from plumbing.errors import StoreUnavailable
from plumbing.mongo import Document, MongoCollection
from plumbing.postgres import PostgresPool, table_name

DEFAULT_TABLE: Final = "saga_idempotency"
"""The PostgreSQL table outcomes are kept in unless another name is given."""

DEFAULT_COLLECTION: Final = "idempotency"
"""The MongoDB collection outcomes are kept in unless another name is given."""

_PUT_ATTEMPTS: Final = 3  # an entry can expire between a refused insert and the read-back

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
)

_SQL: Final = {
    "insert": """
        INSERT INTO "{table}" (key, kind, result, error, stored_at)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (key) DO NOTHING
        RETURNING stored_at
    """,
    "get": 'SELECT kind, result, error, stored_at FROM "{table}" WHERE key = $1',
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


def _error_json(outcome: StoredOutcome) -> Document | None:
    return None if outcome.error is None else outcome.error.model_dump(mode="json")


class PostgresIdempotency:
    """Outcomes in a PostgreSQL table, one row per key.

    Args:
        url: a ``postgresql://`` URL.
        table: the table name (a plain identifier).
        retention: how old an entry must be for :meth:`purge` to delete it.
        clock: stamps ``stored_at`` when an outcome comes without one.
    """

    def __init__(
        self,
        url: str,
        *,
        table: str = DEFAULT_TABLE,
        retention: timedelta = DEFAULT_IDEMPOTENCY_RETENTION,
        connect_timeout: float = 5.0,
        clock: Clock | None = None,
    ) -> None:
        self.table = table_name(table)
        self.retention = retention
        self.clock: Clock = clock or SystemClock()
        self.pool = PostgresPool(url, connect_timeout=connect_timeout, max_size=5)
        self._sql = {name: sql.format(table=self.table) for name, sql in _SQL.items()}

    async def setup(self) -> None:
        """Connect, and create or migrate the table; idempotent."""
        await self.pool.migrate(self.table, _MIGRATIONS)

    async def get(self, key: str) -> StoredOutcome | None:
        """The stored outcome for ``key``, if any."""
        async with self.pool.connection() as connection:
            row = await connection.fetchrow(self._sql["get"], key)
        return None if row is None else _outcome(*row)

    async def put(self, key: str, outcome: StoredOutcome) -> StoredOutcome:
        """Store ``outcome`` unless something is stored already; returns what is stored now."""
        stored_at = outcome.stored_at or self.clock.now()
        arguments = (key, outcome.kind.value, outcome.result, _error_json(outcome), stored_at)
        async with self.pool.connection() as connection:
            for _ in range(_PUT_ATTEMPTS):
                if await connection.fetchval(self._sql["insert"], *arguments) is not None:
                    return StoredOutcome(outcome.kind, outcome.result, outcome.error, stored_at)
                # Another writer won; a fresh statement sees its committed row.
                row = await connection.fetchrow(self._sql["get"], key)
                if row is not None:
                    return _outcome(*row)
        raise StoreUnavailable(f"idempotency key {key!r} kept vanishing before it could be read")

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


class MongoIdempotency(MongoCollection):
    """Outcomes in a MongoDB collection, ``_id`` = key, expired by a TTL index on ``stored_at``.

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
            document = await self.collection.find_one({"_id": key})
        return None if document is None else _from_document(document)

    async def put(self, key: str, outcome: StoredOutcome) -> StoredOutcome:
        """Store ``outcome`` unless something is stored already; returns what is stored now."""
        stored_at = outcome.stored_at or self.clock.now()
        document: Document = {
            "_id": key,
            "kind": outcome.kind.value,
            "result": outcome.result,
            "error": _error_json(outcome),
            "stored_at": stored_at,
        }
        with self._errors():
            for _ in range(_PUT_ATTEMPTS):
                try:
                    await self.collection.insert_one(dict(document))
                except DuplicateKeyError:
                    found = await self.collection.find_one({"_id": key})
                    if found is not None:
                        return _from_document(found)
                else:
                    return StoredOutcome(outcome.kind, outcome.result, outcome.error, stored_at)
        raise StoreUnavailable(f"idempotency key {key!r} kept vanishing before it could be read")

    async def purge(self, now: datetime | None = None) -> int:
        """Delete entries older than the retention now, ahead of the TTL monitor."""
        cutoff = (now or self.clock.now()) - self.retention
        with self._errors():
            result = await self.collection.delete_many({"stored_at": {"$lt": cutoff}})
        return int(result.deleted_count)


def _from_document(document: Document) -> StoredOutcome:
    return _outcome(
        document["kind"], document.get("result"), document.get("error"), document["stored_at"]
    )
