"""The PostgreSQL saga store (asyncpg): one row per saga, every transition one compare-and-set.

The table (``saga_instances`` unless another name is given)::

    saga_id       text PRIMARY KEY
    saga_type     text NOT NULL
    status        text NOT NULL         SagaStatus value
    version       bigint NOT NULL       the compare-and-set token
    state         jsonb NOT NULL        the SagaState, in pydantic's JSON mode
    outbox        jsonb NOT NULL        unpublished Outgoing messages, in publish order
    next_due_at   timestamptz           the sweep: set only while active and something is due
    outbox_since  timestamptz           the relay: write time of the oldest unpublished message
    created_at, updated_at, finished_at timestamptz
    purge_at      timestamptz           finished_at + retention, on terminal sagas only

Indexes: the due sweep ``(next_due_at, saga_id)`` partial on active statuses; the relay
``(outbox_since, saga_id)`` partial on rows holding an outbox; operator listings
``(status, saga_type, updated_at DESC, saga_id DESC)``; retention ``(purge_at)`` partial on
terminal rows.

The state and outbox columns are the truth; the other columns are derived from them on every
write, for the indexes. ``purge_at`` is stamped when a saga finishes, with the retention in
force then. Schema changes are numbered migrations applied by :meth:`PostgresStore.setup`
under an advisory lock, and recorded per table in ``saga_schema_versions``, so replicas that
start together migrate once.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from orchestrator.store import (
    CURRENT_STEP_STATUSES,
    DEFAULT_RETENTION,
    Hold,
    Listed,
    SagaFilter,
    SagaRecord,
    outbox_json,
    read_record,
    read_state,
)
from plumbing.batches import BatchCut, Batcher
from plumbing.errors import StoreUnavailable
from plumbing.postgres import PostgresPool, table_name

DEFAULT_TABLE: Final = "saga_instances"
"""The table sagas are kept in unless the store is given another name."""

ACTIVE_STATUSES: Final = ("started", "pending", "compensating")
"""The statuses the due index covers: ``SagaStatus.is_active``, frozen in migration 1.

Changing which statuses are active needs a migration that rebuilds the index; a test checks
that this matches the state model.
"""

_ACTIVE: Final = "status IN ({})".format(", ".join(f"'{status}'" for status in ACTIVE_STATUSES))

_MIGRATIONS: Final = (
    """
    CREATE TABLE "{table}" (
        saga_id      text PRIMARY KEY,
        saga_type    text NOT NULL,
        status       text NOT NULL,
        version      bigint NOT NULL,
        state        jsonb NOT NULL,
        outbox       jsonb NOT NULL DEFAULT '[]'::jsonb,
        next_due_at  timestamptz,
        outbox_since timestamptz,
        created_at   timestamptz NOT NULL,
        updated_at   timestamptz NOT NULL,
        finished_at  timestamptz,
        purge_at     timestamptz
    );
    CREATE INDEX "{table}_due" ON "{table}" (next_due_at, saga_id) WHERE {active};
    CREATE INDEX "{table}_outbox" ON "{table}" (outbox_since, saga_id)
        WHERE outbox_since IS NOT NULL;
    CREATE INDEX "{table}_listing" ON "{table}" (status, saga_type, updated_at DESC, saga_id DESC);
    CREATE INDEX "{table}_purge" ON "{table}" (purge_at) WHERE purge_at IS NOT NULL;
    """,
    # Definition versions and holds (issue: definitions that change while sagas are in flight).
    """
    ALTER TABLE "{table}"
        ADD COLUMN definition_version integer NOT NULL DEFAULT 1,
        ADD COLUMN held_reason text,
        ADD COLUMN held_since  timestamptz,
        ADD COLUMN held_for    text;
    CREATE INDEX "{table}_held" ON "{table}" (held_for, held_since) WHERE held_for IS NOT NULL;
    """,
)


_Column = Callable[[SagaRecord, timedelta], object]

# Every column after saga_id, and how it is derived from a record (and the retention). The
# insert and save statements are built from this one mapping, in its order, so a column and
# its parameter cannot drift apart.
_COLUMNS: Final[dict[str, _Column]] = {
    "saga_type": lambda record, _: record.state.saga_type,
    "status": lambda record, _: record.state.status.value,
    "version": lambda record, _: record.version,
    "definition_version": lambda record, _: record.state.definition_version,
    "state": lambda record, _: record.state.to_json().decode(),
    "outbox": lambda record, _: outbox_json(record.outbox),
    "next_due_at": lambda record, _: record.next_due_at,
    "outbox_since": lambda record, _: record.outbox_since,
    "created_at": lambda record, _: record.state.created_at,
    "updated_at": lambda record, _: record.state.updated_at,
    "finished_at": lambda record, _: record.state.finished_at,
    "purge_at": lambda record, retention: record.purge_at(retention),
    "held_reason": lambda record, _: None if record.hold is None else record.hold.reason,
    "held_since": lambda record, _: None if record.hold is None else record.hold.since,
    "held_for": lambda record, _: None if record.hold is None else record.hold.waiting_for,
}


# The JSON columns travel as JSON text that pydantic wrote and reads back itself: no dicts in
# between, and no second encoder (the PostgreSQL parameter is text, cast to jsonb).
_AS_JSON: Final = frozenset({"state", "outbox"})


def _parameter(column: str, position: int) -> str:
    return f"${position}::text::jsonb" if column in _AS_JSON else f"${position}"


def _insert_statement() -> str:
    columns = ", ".join(["saga_id", *_COLUMNS])
    parameters = ", ".join(
        ["$1", *(_parameter(column, n) for n, column in enumerate(_COLUMNS, start=2))]
    )
    # Only our own column names are spliced in; every value is a parameter.
    return f"""
        INSERT INTO "{{table}}" ({columns}) VALUES ({parameters})
        ON CONFLICT (saga_id) DO NOTHING
        RETURNING saga_id
    """  # noqa: S608


# The stored outbox without the entries named by the array parameter ${drop}, in order.
_KEPT = """COALESCE(
    (SELECT jsonb_agg(e.entry ORDER BY e.position)
       FROM jsonb_array_elements(outbox) WITH ORDINALITY AS e(entry, position)
      WHERE NOT (e.entry ->> 'message_id' = ANY(${drop}::text[]))),
    '[]'::jsonb)"""
_KEPT_SINCE = """(SELECT min((e.entry ->> 'created_at')::timestamptz)
       FROM jsonb_array_elements(outbox) AS e(entry)
      WHERE NOT (e.entry ->> 'message_id' = ANY(${drop}::text[])))"""


def _save_statement(*, dropping: bool) -> str:
    # $1 is the saga id and $2 the expected version; the columns follow from $3, and the
    # ids to drop come last.
    drop = len(_COLUMNS) + 3
    assignments = []
    for position, column in enumerate(_COLUMNS, start=3):
        if column == "outbox":
            # The new entries join the stored outbox rather than replace it: a handler may
            # have published and marked an older entry since this writer loaded the row, and
            # writing that entry back would send it twice.
            kept = _KEPT.replace("${drop}", f"${drop}") if dropping else "outbox"
            assignments.append(f"outbox = {kept} || {_parameter(column, position)}")
        elif column == "outbox_since":
            # LEAST ignores NULLs: no stored or no new entries.
            since = _KEPT_SINCE.replace("${drop}", f"${drop}") if dropping else "outbox_since"
            assignments.append(f"outbox_since = LEAST({since}, ${position})")
        else:
            assignments.append(f"{column} = {_parameter(column, position)}")
    return f"""
        UPDATE "{{table}}" SET {", ".join(assignments)}
        WHERE saga_id = $1 AND version = $2
        RETURNING saga_id
    """  # noqa: S608 - only our own column names are spliced in


_SQL: Final = {
    "insert": _insert_statement(),
    "save": _save_statement(dropping=False),
    "save_dropping": _save_statement(dropping=True),
    "load": """
        SELECT version, state::text AS state, outbox::text AS outbox,
               held_reason, held_since, held_for
        FROM "{table}" WHERE saga_id = $1
    """,
    "hold": """
        UPDATE "{table}" SET held_reason = $2, held_since = $3, held_for = $4, next_due_at = NULL,
            version = version + 1
        WHERE saga_id = $1
    """,
    "held": """
        SELECT saga_id FROM "{table}" WHERE held_for = ANY($1::text[])
        ORDER BY held_since, saga_id
        LIMIT $2
    """,
    "count_held": """
        SELECT saga_type, coalesce(held_for, '') AS waiting_for, count(*) AS sagas
        FROM "{table}" WHERE held_reason IS NOT NULL GROUP BY 1, 2
    """,
    "count_by_definition": """
        SELECT saga_type, definition_version,
               coalesce(state ->> 'definition_fingerprint', '') AS fingerprint,
               count(*) AS sagas
        FROM "{table}" WHERE {active} GROUP BY 1, 2, 3
    """,
    # SET expressions read the row being updated, so a save that commits first is seen (the
    # update re-reads the new row version) and its outbox entries are kept, not overwritten.
    "mark_published": """
        UPDATE "{table}" SET
            outbox = COALESCE(
                (SELECT jsonb_agg(e.entry ORDER BY e.position)
                   FROM jsonb_array_elements(outbox) WITH ORDINALITY AS e(entry, position)
                  WHERE NOT (e.entry ->> 'message_id' = ANY($2::text[]))),
                '[]'::jsonb),
            outbox_since = (
                SELECT min((e.entry ->> 'created_at')::timestamptz)
                  FROM jsonb_array_elements(outbox) AS e(entry)
                 WHERE NOT (e.entry ->> 'message_id' = ANY($2::text[])))
        WHERE saga_id = $1
          AND EXISTS (SELECT 1 FROM jsonb_array_elements(outbox) AS e(entry)
                       WHERE e.entry ->> 'message_id' = ANY($2::text[]))
    """,
    "due": """
        SELECT saga_id FROM "{table}"
        WHERE {active} AND next_due_at <= $1
        ORDER BY next_due_at, saga_id
        LIMIT $2
    """,
    # A saga held for an operator may have an unreadable record: the relay leaves it alone.
    "unpublished": """
        SELECT saga_id FROM "{table}"
        WHERE outbox_since <= $1 AND (held_reason IS NULL OR held_for IS NOT NULL)
        ORDER BY outbox_since, saga_id
        LIMIT $2
    """,
    "find": """
        SELECT saga_id, state::text AS state, held_reason, held_since, held_for
        FROM "{table}" {where}
        ORDER BY updated_at DESC, saga_id DESC
        LIMIT $1
    """,
    "count_by_status": """
        SELECT saga_type, status, count(*) AS sagas FROM "{table}" GROUP BY saga_type, status
    """,
    "outbox_backlog": """
        SELECT coalesce(sum(jsonb_array_length(outbox)), 0) AS messages,
               min(outbox_since) AS oldest
        FROM "{table}" WHERE outbox_since IS NOT NULL
    """,
    "purge": """
        DELETE FROM "{table}" WHERE saga_id IN (
            SELECT saga_id FROM "{table}" WHERE purge_at <= $1 LIMIT $2)
    """,
}


@dataclass(frozen=True)
class _Write:
    """One create or compare-and-set waiting to be written: its statement and arguments."""

    statement: str
    arguments: tuple[object, ...]

    @property
    def saga_id(self) -> str:
        return str(self.arguments[0])

    def key(self) -> str:
        """Writes of one saga never share a batch (see :class:`~plumbing.batches.Batcher`)."""
        return self.saga_id


class PostgresStore:
    """Saga records in PostgreSQL; see the module docstring for the schema.

    Args:
        url: a ``postgresql://`` URL (libpq syntax, as asyncpg reads it).
        table: the table name (a plain identifier), so that tests and tenants can be isolated.
        retention: how long a finished saga is kept before :meth:`purge` deletes it.
        connect_timeout: seconds to wait for the server before raising ``StoreUnavailable``.
        command_timeout: seconds one statement may take.
        max_connections: the pool's size.
    """

    def __init__(
        self,
        url: str,
        *,
        table: str = DEFAULT_TABLE,
        retention: timedelta = DEFAULT_RETENTION,
        connect_timeout: float = 5.0,
        command_timeout: float = 30.0,
        max_connections: int = 10,
    ) -> None:
        self.table = table_name(table)
        self.retention = retention
        self.pool = PostgresPool(
            url,
            connect_timeout=connect_timeout,
            command_timeout=command_timeout,
            max_size=max_connections,
        )
        self._sql = {
            name: template.format(table=self.table, active=_ACTIVE, where="{where}")
            for name, template in _SQL.items()
        }
        self._creates: Batcher[_Write, bool] = Batcher(self._write, key=_Write.key)
        self._saves: Batcher[_Write, bool] = Batcher(self._write, key=_Write.key)

    async def setup(self) -> None:
        """Connect, and create or migrate the table and its indexes; idempotent."""
        await self.pool.migrate(self.table, _MIGRATIONS, active=_ACTIVE)

    async def create(self, record: SagaRecord) -> bool:
        """Insert a new saga; ``False`` (and nothing written) if the id exists.

        Creates that arrive while another is written go together in the next round trip, as
        saves do (see :meth:`_write`).
        """
        try:
            return await self._creates.submit(
                _Write("insert", (record.saga_id, *self._values(record)))
            )
        except BatchCut as e:
            raise StoreUnavailable(
                f"the creation of saga {record.saga_id} was cut short; it may have been written"
            ) from e

    async def load(self, saga_id: str) -> SagaRecord | None:
        """The saga's record, or ``None``."""
        async with self.pool.connection() as connection:
            row = await connection.fetchrow(self._sql["load"], saga_id)
        return None if row is None else _record(saga_id, row)

    async def save(
        self, record: SagaRecord, expected_version: int, *, drop: Collection[str] = ()
    ) -> bool:
        """Replace the state, drop ``drop`` from the outbox and append ``record.outbox``, if
        the version is ``expected_version``.

        One compare-and-set statement; saves made while another is being written go together
        in the next round trip and transaction (see :meth:`_write`).
        """
        if record.version != expected_version + 1:
            raise ValueError("record.version must be expected_version + 1")
        arguments = (record.saga_id, expected_version, *self._values(record))
        save = _Write("save", arguments)
        if drop:
            save = _Write("save_dropping", (*arguments, list(drop)))
        try:
            return await self._saves.submit(save)
        except BatchCut as e:
            raise StoreUnavailable(
                f"the save of saga {record.saga_id} was cut short; it may have been written"
            ) from e

    async def _write(self, writes: list[_Write]) -> list[bool]:
        """Write a batch of creates or saves: one statement, or one pipelined round trip.

        Several writes of one statement run in one transaction (saves with and without
        entries to drop are two), which locks each row it writes until it commits: rows are
        taken in saga-id order, so that two replicas' batches over the same sagas queue behind
        each other instead of deadlocking. A write refused (the id is taken, or the version
        moved on) writes nothing and returns no row; the others still commit.
        """
        async with self.pool.connection() as connection:
            if len(writes) == 1:
                (write,) = writes
                done = await connection.fetchval(self._sql[write.statement], *write.arguments)
                return [done is not None]
            written: set[str] = set()
            for statement in sorted({write.statement for write in writes}):
                batch = sorted(
                    (write.arguments for write in writes if write.statement == statement),
                    key=lambda arguments: str(arguments[0]),
                )
                rows = await connection.fetchmany(self._sql[statement], batch)
                written.update(row["saga_id"] for row in rows)
        return [write.saga_id in written for write in writes]

    async def mark_published(self, saga_id: str, message_ids: Collection[str]) -> None:
        """Drop these messages from the saga's outbox; the version does not change."""
        if not message_ids:
            return
        async with self.pool.connection() as connection:
            await connection.execute(self._sql["mark_published"], saga_id, list(message_ids))

    async def mark_published_many(self, published: Mapping[str, Collection[str]]) -> None:
        """Drop the entries of several sagas in one pipelined round trip.

        The batch is one transaction, which locks each row it updates until it commits: rows
        are taken in saga-id order, so that two replicas' batches over the same sagas queue
        behind each other instead of deadlocking (each holding a row the other wants).
        """
        batch = sorted((saga_id, list(ids)) for saga_id, ids in published.items() if ids)
        if not batch:
            return
        async with self.pool.connection() as connection:
            await connection.executemany(self._sql["mark_published"], batch)

    async def due(self, now: datetime, limit: int) -> list[str]:
        """Ids of active sagas whose ``next_due_at`` is at or before ``now``, oldest first."""
        async with self.pool.connection() as connection:
            rows = await connection.fetch(self._sql["due"], now, limit)
        return [row["saga_id"] for row in rows]

    async def unpublished(self, older_than: datetime, limit: int) -> list[str]:
        """Ids of sagas holding an outbox message written at or before ``older_than``."""
        async with self.pool.connection() as connection:
            rows = await connection.fetch(self._sql["unpublished"], older_than, limit)
        return [row["saga_id"] for row in rows]

    async def find(self, query: SagaFilter) -> Sequence[Listed]:
        """Sagas matching ``query``, most recently updated first."""
        conditions: list[str] = []
        arguments: list[object] = [query.limit]
        for column, value in (
            ("status", None if query.status is None else query.status.value),
            ("saga_type", query.saga_type),
            ("definition_version", query.version),
        ):
            if value is not None:
                arguments.append(value)
                conditions.append(f"{column} = ${len(arguments)}")
        if query.held is not None:
            conditions.append(f"held_reason IS {'NOT ' if query.held else ''}NULL")
        conditions += _narrowing(query, arguments)
        where = "WHERE " + " AND ".join(conditions) if conditions else ""
        async with self.pool.connection() as connection:
            rows = await connection.fetch(self._sql["find"].format(where=where), *arguments)
        return [Listed(read_state(row["saga_id"], row["state"]), _hold(row)) for row in rows]

    async def hold(self, saga_id: str, hold: Hold) -> None:
        """Set the hold without reading the record; the state stays, the version goes up."""
        async with self.pool.connection() as connection:
            await connection.execute(
                self._sql["hold"], saga_id, hold.reason, hold.since, hold.waiting_for
            )

    async def held(self, waiting_for: Collection[str], limit: int) -> list[str]:
        """Ids of sagas held for one of these definitions, oldest hold first."""
        async with self.pool.connection() as connection:
            rows = await connection.fetch(self._sql["held"], list(waiting_for), limit)
        return [row["saga_id"] for row in rows]

    async def count_held(self) -> dict[tuple[str, str], int]:
        """Held sagas per ``(saga_type, waiting_for)``."""
        async with self.pool.connection() as connection:
            rows = await connection.fetch(self._sql["count_held"])
        return {(row["saga_type"], row["waiting_for"]): int(row["sagas"]) for row in rows}

    async def count_by_definition(self) -> dict[tuple[str, int, str], int]:
        """Active sagas per ``(saga_type, definition version, fingerprint)``."""
        async with self.pool.connection() as connection:
            rows = await connection.fetch(self._sql["count_by_definition"])
        return {
            (row["saga_type"], int(row["definition_version"]), row["fingerprint"]): int(
                row["sagas"]
            )
            for row in rows
        }

    async def count_by_status(self) -> dict[tuple[str, str], int]:
        """Number of sagas per ``(saga_type, status)``."""
        async with self.pool.connection() as connection:
            rows = await connection.fetch(self._sql["count_by_status"])
        return {(row["saga_type"], row["status"]): int(row["sagas"]) for row in rows}

    async def outbox_backlog(self) -> tuple[int, datetime | None]:
        """Number of unpublished messages and the write time of the oldest."""
        async with self.pool.connection() as connection:
            row = await connection.fetchrow(self._sql["outbox_backlog"])
        oldest: datetime | None = row["oldest"]
        return int(row["messages"]), oldest

    async def purge(self, now: datetime) -> int:
        """Delete finished sagas whose retention has passed, in small batches."""
        return await self.pool.delete_in_batches(self._sql["purge"], now)

    async def drop(self) -> None:
        """Delete the table and its schema record (for tests and uninstalling)."""
        await self.pool.drop(self.table)

    async def close(self) -> None:
        """Close the connection pool."""
        await self.pool.close()

    def _values(self, record: SagaRecord) -> tuple[object, ...]:
        """The values of the columns after ``saga_id``, in :data:`_COLUMNS` order."""
        return tuple(column(record, self.retention) for column in _COLUMNS.values())


def _record(saga_id: str, row: Any) -> SagaRecord:
    return read_record(
        saga_id,
        state=row["state"],
        outbox=row["outbox"],
        version=int(row["version"]),
        hold=_hold(row),
    )


def _hold(row: Any) -> Hold | None:
    if row["held_reason"] is None:
        return None
    return Hold(reason=row["held_reason"], since=row["held_since"], waiting_for=row["held_for"])


def _narrowing(query: SagaFilter, arguments: list[object]) -> list[str]:
    """The conditions of the filters no index serves (step, id prefix, time range, page),
    appending their values to ``arguments``."""

    def argument(value: object) -> str:
        arguments.append(value)
        return f"${len(arguments)}"

    conditions = []
    if query.step is not None:
        name, statuses = argument(query.step), argument(list(CURRENT_STEP_STATUSES))
        # Only placeholders are formatted in: the values travel as arguments.
        conditions.append(
            "EXISTS (SELECT 1 FROM jsonb_array_elements(state -> 'steps') AS s(step) "  # noqa: S608
            f"WHERE s.step ->> 'name' = {name} AND s.step ->> 'status' = ANY({statuses}::text[]))"
        )
    if query.id_prefix is not None:
        conditions.append(f"starts_with(saga_id, {argument(query.id_prefix)})")
    if query.created_from is not None:
        conditions.append(f"created_at >= {argument(query.created_from)}")
    if query.created_to is not None:
        conditions.append(f"created_at < {argument(query.created_to)}")
    if query.after is not None:
        conditions.append(
            f"(updated_at, saga_id) < ({argument(query.after.updated_at)}, "
            f"{argument(query.after.saga_id)})"
        )
    return conditions
