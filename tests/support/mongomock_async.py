"""An async facade over mongomock, shaped like PyMongo's async API, for the Mongo adapters.

mongomock is synchronous; PyMongo's ``AsyncMongoClient`` is not. This module wraps mongomock
in classes with the same names, methods and signatures as the subset of
``AsyncMongoClient`` / ``AsyncDatabase`` / ``AsyncCollection`` / ``AsyncCursor`` that
``orchestrator.stores.mongo.MongoStore`` and ``participants.idempotency_stores.MongoIdempotency``
call, so the same store code runs on it unchanged. Anything else raises ``AttributeError``,
which keeps the subset honest: a store that starts calling something new fails here first.

Every coroutine yields to the event loop once before running its operation, as a network
round trip would, so concurrent writers really interleave between a read and a
compare-and-set. Each operation itself runs without a yield, so it is atomic, like a
single-document operation on a server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import mongomock
from pymongo import IndexModel, ReturnDocument, UpdateOne
from pymongo.results import DeleteResult, InsertOneResult, UpdateResult

Document = dict[str, Any]


class AsyncMongoMockCursor:
    """The results of ``find`` or ``aggregate``, like ``AsyncCursor``/``AsyncCommandCursor``."""

    def __init__(self, documents: Iterable[Document]) -> None:
        self._documents = documents

    async def to_list(self, length: int | None = None) -> list[Document]:
        """Every remaining document (at most ``length``)."""
        await asyncio.sleep(0)
        documents = list(self._documents)
        return documents if length is None else documents[:length]

    async def __aiter__(self) -> AsyncIterator[Document]:
        for document in await self.to_list():
            yield document


class AsyncMongoMockCollection:
    """An ``AsyncCollection`` over a mongomock collection."""

    def __init__(self, collection: mongomock.Collection) -> None:
        self._collection = collection

    @property
    def name(self) -> str:
        """The collection's name."""
        return str(self._collection.name)

    async def insert_one(self, document: Document) -> InsertOneResult:
        """Insert; raises ``pymongo.errors.DuplicateKeyError`` on a taken ``_id``."""
        await asyncio.sleep(0)
        return self._collection.insert_one(document)

    async def find_one(
        self, filter: Mapping[str, Any] | None = None, projection: Any = None
    ) -> Document | None:
        """The first matching document."""
        await asyncio.sleep(0)
        return self._collection.find_one(filter, projection)

    def find(
        self,
        filter: Mapping[str, Any] | None = None,
        projection: Any = None,
        *,
        sort: Sequence[tuple[str, int]] | None = None,
        limit: int = 0,
    ) -> AsyncMongoMockCursor:
        """A cursor over matching documents (not awaited, as in PyMongo)."""
        return AsyncMongoMockCursor(
            self._collection.find(filter, projection, sort=sort, limit=limit)
        )

    async def find_one_and_update(
        self,
        filter: Mapping[str, Any],
        update: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        projection: Any = None,
        *,
        return_document: bool = ReturnDocument.BEFORE,
        upsert: bool = False,
    ) -> Document | None:
        """Update the first match atomically; the document before (or after) the update."""
        await asyncio.sleep(0)
        return self._collection.find_one_and_update(
            filter, update, projection, return_document=return_document, upsert=upsert
        )

    async def update_one(
        self,
        filter: Mapping[str, Any],
        update: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        upsert: bool = False,
        *,
        session: Any = None,
    ) -> UpdateResult:
        """Update the first match (an update document or a pipeline); mongomock has no
        transactions, so a ``session`` is accepted and has no effect."""
        await asyncio.sleep(0)
        return self._collection.update_one(filter, update, upsert=upsert)

    async def delete_one(self, filter: Mapping[str, Any]) -> DeleteResult:
        """Delete the first match."""
        await asyncio.sleep(0)
        return self._collection.delete_one(filter)

    async def bulk_write(self, requests: Sequence[UpdateOne], ordered: bool = True) -> None:
        """Apply ``UpdateOne`` requests one by one (mongomock has no pipeline bulk writes)."""
        await asyncio.sleep(0)
        for request in requests:
            self._collection.update_one(request._filter, request._doc)

    async def delete_many(self, filter: Mapping[str, Any]) -> DeleteResult:
        """Delete every match."""
        await asyncio.sleep(0)
        return self._collection.delete_many(filter)

    async def aggregate(self, pipeline: Sequence[Mapping[str, Any]]) -> AsyncMongoMockCursor:
        """Run a pipeline; awaited for its cursor, as in PyMongo's async API."""
        await asyncio.sleep(0)
        return AsyncMongoMockCursor(self._collection.aggregate(list(pipeline)))

    async def create_indexes(self, indexes: Sequence[IndexModel]) -> list[str]:
        """Create indexes with all their options (mongomock enforces only unique ones).

        mongomock's own ``create_indexes`` drops options such as ``partialFilterExpression``,
        so each index goes through ``create_index``, which keeps them.
        """
        await asyncio.sleep(0)
        names = []
        for index in indexes:
            options = dict(index.document)
            keys = list(options.pop("key").items())
            names.append(self._collection.create_index(keys, **options))
        return names

    async def index_information(self) -> Document:
        """The indexes, keyed by name."""
        await asyncio.sleep(0)
        return dict(self._collection.index_information())

    async def drop(self) -> None:
        """Delete the collection."""
        await asyncio.sleep(0)
        self._collection.drop()


class AsyncMongoMockDatabase:
    """An ``AsyncDatabase`` over a mongomock database."""

    def __init__(self, client: AsyncMongoMockClient, database: mongomock.Database) -> None:
        self.client = client
        self._database = database

    @property
    def name(self) -> str:
        """The database's name."""
        return str(self._database.name)

    def __getitem__(self, name: str) -> AsyncMongoMockCollection:
        return self.get_collection(name)

    def get_collection(self, name: str) -> AsyncMongoMockCollection:
        """The collection called ``name``."""
        return AsyncMongoMockCollection(self._database.get_collection(name))

    async def command(self, command: str | Mapping[str, Any]) -> Document:
        """Run a database command (mongomock knows ``ping`` and a few others)."""
        await asyncio.sleep(0)
        return dict(self._database.command(command))


class AsyncMongoMockClient:
    """An ``AsyncMongoClient`` over a fresh, private mongomock server."""

    def __init__(self) -> None:
        self._client = mongomock.MongoClient(tz_aware=True)

    def __getitem__(self, name: str) -> AsyncMongoMockDatabase:
        return self.get_database(name)

    def get_database(self, name: str) -> AsyncMongoMockDatabase:
        """The database called ``name``."""
        return AsyncMongoMockDatabase(self, self._client.get_database(name))

    async def drop_database(self, name_or_database: str) -> None:
        """Delete a database (by name)."""
        await asyncio.sleep(0)
        self._client.drop_database(name_or_database)

    async def close(self) -> None:
        """Nothing to release."""
