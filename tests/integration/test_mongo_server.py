"""What the Mongo stores rely on, and avoid, on the server ``SAGA_TEST_MONGO_URL`` names.

Under ``.ci/run`` that server is SecantusDB, a MongoDB-compatible server on WiredTiger; the
hosted workflow runs a real MongoDB replica set. SecantusDB speaks the wire protocol but is not
MongoDB: each test here names one way the two differ, or agree where the stores depend on it,
with the exact behaviour of each, so that a new SecantusDB pin that changes one shows up here
first and the store's query forms stay correct on both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from orchestrator.store import SagaRecord
from orchestrator.stores.mongo import _OUTBOX_SUMMARY, MongoStore
from plumbing.mongo import Document
from plumbing.transport import Outgoing
from tests.conftest import with_database
from tests.integration.test_store_contract import started

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LATER = T0 + timedelta(seconds=30)


@pytest.fixture
async def database(mongo_url: str, unique: str) -> AsyncIterator[AsyncDatabase[Document]]:
    """A database of its own on the server, dropped afterwards."""
    client: AsyncMongoClient[Document] = AsyncMongoClient(
        with_database(mongo_url, f"server_test_{unique}"), tz_aware=True
    )
    try:
        yield client.get_default_database()
    finally:
        await client.drop_database(f"server_test_{unique}")
        await client.close()


async def is_secantus(database: AsyncDatabase[Document]) -> bool:
    """Whether the server is SecantusDB (its buildInfo adds ``secantusVersion``)."""
    info = await database.client.admin.command("buildInfo")
    return "secantusVersion" in info


async def outbox_document(database: AsyncDatabase[Document]) -> AsyncCollection[Document]:
    """A collection holding one saga-like document with two outbox entries, newest first."""
    collection = database["sagas"]
    await collection.insert_one(
        {
            "_id": "s-1",
            "outbox": [
                {"message_id": "m-new", "written_at": LATER},
                {"message_id": "m-old", "written_at": T0},
            ],
        }
    )
    return collection


async def project(collection: AsyncCollection[Document], expression: Any) -> Document:
    """The one document of ``collection`` projected to ``{value: expression}``."""
    cursor = await collection.aggregate([{"$project": {"_id": 0, "value": expression}}])
    documents = await cursor.to_list()
    assert len(documents) == 1
    return documents[0]


async def test_array_paths_inside_expressions_resolve_only_on_mongodb(
    database: AsyncDatabase[Document],
) -> None:
    """Difference: SecantusDB does not resolve an array path inside an aggregation expression.

    On MongoDB ``"$outbox.written_at"`` is the array of every entry's ``written_at``, so
    ``{$min: "$outbox.written_at"}`` is the oldest; on SecantusDB the path is missing, and
    ``$min``, ``$first``, ``$arrayElemAt`` and a ``$let`` variable's path all give null. The
    Mongo store derives ``outbox_since`` with ``$map`` instead (next test).
    """
    collection = await outbox_document(database)
    path = "$outbox.written_at"

    forms = {
        "path": await project(collection, path),
        "min": await project(collection, {"$min": path}),
        "first": await project(collection, {"$first": path}),
        "element": await project(collection, {"$arrayElemAt": [path, 0]}),
        "let": await project(
            collection, {"$let": {"vars": {"o": "$outbox"}, "in": {"$min": "$$o.written_at"}}}
        ),
    }

    if await is_secantus(database):
        assert forms == {
            "path": {},
            "min": {"value": None},
            "first": {"value": None},
            "element": {"value": None},
            "let": {"value": None},
        }
    else:
        assert forms == {
            "path": {"value": [LATER, T0]},
            "min": {"value": T0},
            "first": {"value": LATER},
            "element": {"value": LATER},
            "let": {"value": T0},
        }


async def test_the_stores_outbox_summary_is_right_on_either_server(
    database: AsyncDatabase[Document],
) -> None:
    """Agreement: ``$map`` with a per-entry variable, then ``$min`` of a ``$let`` variable.

    The pipeline stage the Mongo store runs after every outbox change gives the oldest write
    time on MongoDB and SecantusDB alike, and null once the outbox is empty.
    """
    collection = await outbox_document(database)
    await collection.insert_one({"_id": "s-2", "outbox": []})

    await collection.update_many({}, [_OUTBOX_SUMMARY])

    found = collection.find({}, {"has_outbox": 1, "outbox_since": 1}, sort=[("_id", 1)])
    assert await found.to_list() == [
        {"_id": "s-1", "has_outbox": True, "outbox_since": T0},
        {"_id": "s-2", "has_outbox": False, "outbox_since": None},
    ]


async def test_array_paths_in_queries_match_on_either_server(
    database: AsyncDatabase[Document],
) -> None:
    """Agreement: in a query (not an expression) an array path matches any entry's value.

    ``mark_published`` filters on ``{"outbox.message_id": {"$in": ids}}``, so that a
    redelivered mark for messages already gone writes nothing.
    """
    collection = await outbox_document(database)

    assert await collection.count_documents({"outbox.message_id": {"$in": ["m-old"]}}) == 1
    assert await collection.count_documents({"outbox.message_id": {"$in": ["m-gone"]}}) == 0
    assert await collection.count_documents({"outbox.written_at": {"$lte": T0}}) == 1


def with_retryable_writes(url: str) -> str:
    """``url`` with ``retryWrites=true``, whatever it said before."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k.lower() != "retrywrites"]
    return urlunsplit(parts._replace(query=urlencode([*query, ("retryWrites", "true")])))


def entry(message_id: str, at: datetime) -> Outgoing:
    return Outgoing(
        message_id=message_id,
        kind="event",
        exchange="saga.events",
        routing_key="test",
        body="{}",
        created_at=at,
    )


async def test_the_store_works_with_retryable_writes(mongo_url: str, unique: str) -> None:
    """Difference: SecantusDB's retryable writes get slower the more of them it has seen.

    It keeps the reply of every retryable write for 30 minutes (at most 10,000) and scans them
    all, and sorts them once it holds 10,000, on every write, so a whole test suite's writes
    took 30-130 ms each instead of 2-7 ms. ``.ci/run`` therefore turns them off for the
    suite (``retryWrites=false`` in ``SAGA_TEST_MONGO_URL``); production keeps the default,
    and this test runs the store with them on, as production does.
    """
    url = with_database(with_retryable_writes(mongo_url), f"retry_test_{unique}")
    store = MongoStore.from_url(url)
    try:
        assert store.database.client.options.retry_writes is True
        await store.setup()
        first = started("retry-1", T0)
        assert await store.create(first)
        added = entry("retry-added", LATER)
        assert await store.save(SagaRecord(first.state, 2, (added,)), 1)
        await store.mark_published("retry-1", [e.message_id for e in first.outbox])

        assert await store.load("retry-1") == SagaRecord(first.state, 2, (added,))
        assert await store.outbox_backlog() == (1, LATER)
    finally:
        await store.database.client.drop_database(store.database.name)
        await store.close()
