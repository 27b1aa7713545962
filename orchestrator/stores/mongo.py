"""The MongoDB saga store (PyMongo's async API): one document per saga, one write per transition.

A saga's document (collection ``sagas`` unless another name is given)::

    _id           the saga id
    version       the compare-and-set token
    state         the SagaState, in pydantic's JSON mode (exact: datetimes as ISO strings)
    outbox        [Outgoing in JSON mode + written_at], unpublished messages in publish order
    saga_type, status, active                           for listings, gauges and the sweep
    next_due_at   BSON date, set only while active and something is due
    has_outbox, outbox_since                            for the relay
    created_at, updated_at, finished_at                 BSON dates
    purge_at      BSON date, finished_at + retention, on terminal sagas only (the TTL index)

``state`` and ``outbox`` are the truth; the top-level fields are derived from them on every
write, for the indexes. BSON dates keep milliseconds, so a due time is found up to 1 ms early
at most (harmless: the engine re-checks due times against the clock).

Every transition is one ``find_one_and_update`` guarded by ``{_id, version}`` that replaces
the state and appends its messages to the outbox. The outbox rides in the same document, so
state and the messages it implies commit together without multi-document transactions.
Creating is an insert (a duplicate key means "exists"); publishing removes entries with one
pipeline update that leaves the version alone.

Indexes (created by :meth:`MongoStore.setup`): ``due_v1`` ``{next_due_at: 1, _id: 1}`` partial
on ``active: true``; ``outbox_v1`` ``{outbox_since: 1, _id: 1}`` partial on
``has_outbox: true``; ``listing_v1`` ``{status: 1, saga_type: 1, updated_at: -1, _id: -1}``;
``purge_v1`` TTL on ``purge_at`` with ``expireAfterSeconds=0``. The ``_id`` suffixes make
the tie-breaking sorts index-only. The TTL monitor runs about once a minute, so
:meth:`MongoStore.purge` also deletes explicitly.

Built from a URL, the client uses ``w="majority"`` and retryable writes unless the URL says
otherwise (run MongoDB as a replica set, even a single node: standalone servers have no
retryable writes), returns timezone-aware datetimes, and gives up on an unreachable server
after ``connect_timeout`` seconds.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Final

from pymongo import ASCENDING, DESCENDING, IndexModel, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from orchestrator.store import (
    CURRENT_STEP_STATUSES,
    DEFAULT_RETENTION,
    Hold,
    Listed,
    SagaFilter,
    SagaRecord,
    read_record,
    read_state,
)
from plumbing.clock import utc
from plumbing.mongo import Document, MongoCollection
from plumbing.transport import Outgoing

DEFAULT_COLLECTION: Final = "sagas"
"""The collection sagas are kept in unless the store is given another name."""

_WRITTEN_AT: Final = "written_at"  # a BSON date per outbox entry, for outbox_since

# The relay's fields, derived from the outbox as it is after a pipeline stage changed it, in
# the same single-document update: whichever order a save and a mark_published commit in, each
# recomputes them from the outbox it leaves behind. The write times are gathered with $map, not
# with the array path "$outbox.written_at", which SecantusDB does not resolve in expressions (it
# gives null; tests/integration/test_mongo_server.py shows it); $min then takes the array from a
# $let variable, the one form mongomock also evaluates. On MongoDB every form means the same:
# $min of an array ignores nulls and is null for an empty one, so an emptied outbox has none.
_OUTBOX_SUMMARY: Final = {
    "$set": {
        "has_outbox": {"$gt": [{"$size": "$outbox"}, 0]},
        "outbox_since": {
            "$let": {
                "vars": {
                    "written": {
                        "$map": {"input": "$outbox", "as": "entry", "in": f"$$entry.{_WRITTEN_AT}"}
                    }
                },
                "in": {"$min": "$$written"},
            }
        },
    }
}

INDEXES: Final = (
    IndexModel(
        [("next_due_at", ASCENDING), ("_id", ASCENDING)],
        name="due_v1",
        partialFilterExpression={"active": True},
    ),
    IndexModel(
        [("outbox_since", ASCENDING), ("_id", ASCENDING)],
        name="outbox_v1",
        partialFilterExpression={"has_outbox": True},
    ),
    IndexModel(
        [
            ("status", ASCENDING),
            ("saga_type", ASCENDING),
            ("updated_at", DESCENDING),
            ("_id", DESCENDING),
        ],
        name="listing_v1",
    ),
    IndexModel([("purge_at", ASCENDING)], name="purge_v1", expireAfterSeconds=0),
    IndexModel([("held_for", ASCENDING), ("held_since", ASCENDING)], name="held_v1"),
)
"""The saga collection's indexes; versioned names leave room to change one later."""


class MongoStore(MongoCollection):
    """Saga records in MongoDB; see the module docstring for the document and its indexes.

    Build it with :meth:`from_url`, or over a database you already have (tests hand it an
    async facade over mongomock); a store built over a database leaves its client open.

    Args:
        database: an ``AsyncDatabase`` (its write concern is used as it is).
        collection: the collection name.
        retention: how long a finished saga is kept (``purge_at = finished_at + retention``).
    """

    def __init__(
        self,
        database: AsyncDatabase[Document],
        *,
        collection: str = DEFAULT_COLLECTION,
        retention: timedelta = DEFAULT_RETENTION,
    ) -> None:
        super().__init__(database, collection)
        self.retention = retention

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        collection: str = DEFAULT_COLLECTION,
        retention: timedelta = DEFAULT_RETENTION,
        connect_timeout: float = 5.0,
    ) -> MongoStore:
        """A store over the database named by the URL's path (default ``saga``).

        Raises:
            ConfigError: PyMongo refuses the URL.
        """
        return cls._connected(url, connect_timeout, collection=collection, retention=retention)

    async def setup(self) -> None:
        """Check the server answers and create the indexes; idempotent."""
        with self._errors():
            await self.database.command("ping")
            await self.collection.create_indexes(list(INDEXES))

    async def create(self, record: SagaRecord) -> bool:
        """Insert a new saga; ``False`` (and nothing written) if the id exists."""
        with self._errors():
            try:
                await self.collection.insert_one({"_id": record.saga_id, **self._fields(record)})
            except DuplicateKeyError:
                return False
        return True

    async def load(self, saga_id: str) -> SagaRecord | None:
        """The saga's record, or ``None``."""
        with self._errors():
            document = await self.collection.find_one({"_id": saga_id}, _RECORD)
        return None if document is None else _record(document)

    async def save(
        self, record: SagaRecord, expected_version: int, *, drop: Collection[str] = ()
    ) -> bool:
        """Replace the state, drop ``drop`` from the outbox and append ``record.outbox``, if
        the version is ``expected_version``; one write either way."""
        if record.version != expected_version + 1:
            raise ValueError("record.version must be expected_version + 1")
        # A pipeline update, so that outbox_since can be derived from the stored outbox: an
        # update document's $min would keep a stored null (null sorts below dates). In a
        # pipeline a "$..." string is a field path and a document is an expression, so every
        # value is a $literal: saga data is never read as either.
        fields = {name: {"$literal": value} for name, value in self._state_fields(record).items()}
        update: list[Document] = [{"$set": fields}]
        if record.outbox or drop:
            # Appended, never rewritten from what this writer loaded: another handler may have
            # published and marked an older entry since, and writing it back would resend it.
            kept: object = _without(drop) if drop else "$outbox"
            added = {"$literal": _entries(record.outbox)}
            update.append({"$set": {"outbox": {"$concatArrays": [kept, added]}}})
            update.append(_OUTBOX_SUMMARY)
        with self._errors():
            before = await self.collection.find_one_and_update(
                {"_id": record.saga_id, "version": expected_version},
                update,
                projection={"_id": 1},
            )
        return before is not None

    async def mark_published(self, saga_id: str, message_ids: Collection[str]) -> None:
        """Drop these messages from the saga's outbox; the version does not change."""
        await self.mark_published_many({saga_id: message_ids})

    async def mark_published_many(self, published: Mapping[str, Collection[str]]) -> None:
        """Drop the entries of several sagas in one bulk write."""
        updates = [
            UpdateOne(
                {"_id": saga_id, "outbox.message_id": {"$in": list(ids)}},
                [{"$set": {"outbox": _without(ids)}}, _OUTBOX_SUMMARY],
            )
            for saga_id, ids in published.items()
            if ids
        ]
        if not updates:
            return
        with self._errors():
            await self.collection.bulk_write(updates, ordered=False)

    async def due(self, now: datetime, limit: int) -> list[str]:
        """Ids of active sagas whose ``next_due_at`` is at or before ``now``, oldest first."""
        documents = await self._find(
            {"active": True, "next_due_at": {"$lte": now}},
            {"_id": 1},
            [("next_due_at", ASCENDING), ("_id", ASCENDING)],
            limit,
        )
        return [str(document["_id"]) for document in documents]

    async def unpublished(self, older_than: datetime, limit: int) -> list[str]:
        """Ids of sagas holding an outbox message written at or before ``older_than``."""
        documents = await self._find(
            {
                "has_outbox": True,
                "outbox_since": {"$lte": older_than},
                # A saga held for an operator may have an unreadable record: leave it alone.
                "$or": [{"held_reason": None}, {"held_for": {"$ne": None}}],
            },
            {"_id": 1},
            [("outbox_since", ASCENDING), ("_id", ASCENDING)],
            limit,
        )
        return [str(document["_id"]) for document in documents]

    async def find(self, query: SagaFilter) -> Sequence[Listed]:
        """Sagas matching ``query``, most recently updated first."""
        match: Document = {}
        if query.status is not None:
            match["status"] = query.status.value
        if query.saga_type is not None:
            match["saga_type"] = query.saga_type
        if query.version is not None:
            match["definition_version"] = query.version
        if query.held is not None:
            match["held_reason"] = {"$ne": None} if query.held else None
        match |= _narrowing(query)
        documents = await self._find(
            match,
            {"state": 1, **_HOLD},
            [("updated_at", DESCENDING), ("_id", DESCENDING)],
            query.limit,
        )
        return [
            Listed(read_state(str(document["_id"]), document["state"]), _hold(document))
            for document in documents
        ]

    async def hold(self, saga_id: str, hold: Hold) -> None:
        """Set the hold without reading the record; the state stays, the version goes up."""
        with self._errors():
            await self.collection.update_one(
                {"_id": saga_id},
                {
                    "$set": {
                        "held_reason": hold.reason,
                        "held_since": hold.since,
                        "held_for": hold.waiting_for,
                        "next_due_at": None,
                    },
                    "$inc": {"version": 1},
                },
            )

    async def held(self, waiting_for: Collection[str], limit: int) -> list[str]:
        """Ids of sagas held for one of these definitions, oldest hold first."""
        documents = await self._find(
            {"held_for": {"$in": list(waiting_for)}},
            {"_id": 1},
            [("held_since", ASCENDING), ("_id", ASCENDING)],
            limit,
        )
        return [str(document["_id"]) for document in documents]

    async def count_held(self) -> dict[tuple[str, str], int]:
        """Held sagas per ``(saga_type, waiting_for)``."""
        groups = await self._aggregate(
            [
                {"$match": {"held_reason": {"$ne": None}}},
                {
                    "$group": {
                        "_id": {"saga_type": "$saga_type", "waiting_for": "$held_for"},
                        "sagas": {"$sum": 1},
                    }
                },
            ]
        )
        return {
            (group["_id"]["saga_type"], group["_id"].get("waiting_for") or ""): int(group["sagas"])
            for group in groups
        }

    async def count_by_definition(self) -> dict[tuple[str, int, str], int]:
        """Active sagas per ``(saga_type, definition version, fingerprint)``."""
        groups = await self._aggregate(
            [
                {"$match": {"active": True}},
                {
                    "$group": {
                        "_id": {
                            "saga_type": "$saga_type",
                            "version": "$definition_version",
                            "fingerprint": "$state.definition_fingerprint",
                        },
                        "sagas": {"$sum": 1},
                    }
                },
            ]
        )
        return {
            (
                group["_id"]["saga_type"],
                int(group["_id"].get("version") or 1),
                group["_id"].get("fingerprint") or "",
            ): int(group["sagas"])
            for group in groups
        }

    async def count_by_status(self) -> dict[tuple[str, str], int]:
        """Number of sagas per ``(saga_type, status)``."""
        groups = await self._aggregate(
            [
                {
                    "$group": {
                        "_id": {"saga_type": "$saga_type", "status": "$status"},
                        "sagas": {"$sum": 1},
                    }
                }
            ]
        )
        return {
            (group["_id"]["saga_type"], group["_id"]["status"]): int(group["sagas"])
            for group in groups
        }

    async def outbox_backlog(self) -> tuple[int, datetime | None]:
        """Number of unpublished messages and the write time of the oldest (to the ms)."""
        groups = await self._aggregate(
            [
                {"$match": {"has_outbox": True}},
                {
                    "$group": {
                        "_id": None,
                        "messages": {"$sum": {"$size": "$outbox"}},
                        "oldest": {"$min": "$outbox_since"},
                    }
                },
            ]
        )
        if not groups:
            return 0, None
        oldest = groups[0]["oldest"]
        return int(groups[0]["messages"]), None if oldest is None else utc(oldest)

    async def purge(self, now: datetime) -> int:
        """Delete finished sagas whose retention has passed (the TTL monitor lags)."""
        with self._errors():
            result = await self.collection.delete_many({"purge_at": {"$lte": now}})
        return int(result.deleted_count)

    async def _find(
        self,
        match: Document,
        projection: Document,
        sort: list[tuple[str, int]],
        limit: int,
    ) -> list[Document]:
        if limit <= 0:  # MongoDB reads a limit of 0 as "no limit"
            return []
        with self._errors():
            cursor = self.collection.find(match, projection, sort=sort, limit=limit)
            return await cursor.to_list()

    async def _aggregate(self, pipeline: list[Document]) -> list[Document]:
        with self._errors():
            cursor = await self.collection.aggregate(pipeline)
            return await cursor.to_list()

    def _fields(self, record: SagaRecord) -> Document:
        """Everything stored for a new saga except ``_id``."""
        return {
            **self._state_fields(record),
            "has_outbox": bool(record.outbox),
            "outbox_since": record.outbox_since,
            "outbox": _entries(record.outbox),
        }

    def _state_fields(self, record: SagaRecord) -> Document:
        """What every transition replaces: the version, the state and the fields derived from it."""
        state = record.state
        hold = record.hold
        return {
            "version": record.version,
            "saga_type": state.saga_type,
            "definition_version": state.definition_version,
            "status": state.status.value,
            "active": state.status.is_active,
            "next_due_at": record.next_due_at,
            "created_at": state.created_at,
            "updated_at": state.updated_at,
            "finished_at": state.finished_at,
            "purge_at": record.purge_at(self.retention),
            "state": state.to_document(),
            "held_reason": None if hold is None else hold.reason,
            "held_since": None if hold is None else hold.since,
            "held_for": None if hold is None else hold.waiting_for,
        }


_HOLD: Final = {"held_reason": 1, "held_since": 1, "held_for": 1}
_RECORD: Final = {"version": 1, "state": 1, "outbox": 1, **_HOLD}


def _without(message_ids: Collection[str]) -> Document:
    """The stored outbox without these entries, as a pipeline expression."""
    keep = {"$not": {"$in": ["$$entry.message_id", list(message_ids)]}}
    return {"$filter": {"input": "$outbox", "as": "entry", "cond": keep}}


def _entries(outbox: Sequence[Outgoing]) -> list[Document]:
    """Outbox entries as stored: JSON mode, plus their write time as a BSON date."""
    return [{**entry.model_dump(mode="json"), _WRITTEN_AT: entry.created_at} for entry in outbox]


def _record(document: Document) -> SagaRecord:
    return read_record(
        str(document["_id"]),
        state=document["state"],
        outbox=(
            {k: v for k, v in entry.items() if k != _WRITTEN_AT} for entry in document["outbox"]
        ),
        version=int(document["version"]),
        hold=_hold(document),
    )


def _hold(document: Document) -> Hold | None:
    if document.get("held_reason") is None:
        return None
    return Hold(
        reason=document["held_reason"],
        since=utc(document["held_since"]),
        waiting_for=document.get("held_for"),
    )


def _narrowing(query: SagaFilter) -> Document:
    """The match of the filters no index serves: step, id prefix, time range, page."""
    match: Document = {}
    if query.step is not None:
        match["state.steps"] = {
            "$elemMatch": {"name": query.step, "status": {"$in": list(CURRENT_STEP_STATUSES)}}
        }
    if query.id_prefix is not None:
        match["_id"] = {"$regex": "^" + re.escape(query.id_prefix)}
    created: Document = {}
    if query.created_from is not None:
        created["$gte"] = query.created_from
    if query.created_to is not None:
        created["$lt"] = query.created_to
    if created:
        match["created_at"] = created
    if query.after is not None:
        # BSON dates keep milliseconds: the cursor is compared as it was stored.
        at = query.after.updated_at.replace(
            microsecond=query.after.updated_at.microsecond // 1000 * 1000
        )
        match["$or"] = [
            {"updated_at": {"$lt": at}},
            {"updated_at": at, "_id": {"$lt": query.after.saga_id}},
        ]
    return match
