"""MongoDB plumbing shared by the saga store and the participants' idempotency store.

:func:`open_client` builds an ``AsyncMongoClient`` with the stores' defaults,
:func:`unavailable_errors` turns connection and authentication trouble into one
:class:`~plumbing.errors.StoreUnavailable` line, and :class:`MongoCollection` is the base of
both stores: built over a database or from a URL, closing what it opened.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Final, Self
from urllib.parse import parse_qsl, urlsplit

from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    ConfigurationError,
    ConnectionFailure,
    ExecutionTimeout,
    OperationFailure,
    WriteConcernError,
)

from plumbing.errors import ConfigError
from plumbing.stores import store_unavailable
from plumbing.urls import redact_url

Document = dict[str, Any]
"""A BSON document as PyMongo hands it over."""

DEFAULT_DATABASE: Final = "saga"
"""The database used when the URL names none."""

_AUTH_FAILURES: Final = frozenset({13, 18})  # Unauthorized, AuthenticationFailed


def open_client(url: str, *, connect_timeout: float = 5.0) -> AsyncMongoClient[Document]:
    """An ``AsyncMongoClient`` with the store's defaults; it connects on first use.

    Defaults, each overridden by the same option in the URL: ``w=majority`` and
    ``retryWrites=true``. Always: timezone-aware datetimes, and server selection and connect
    timeouts of ``connect_timeout`` seconds.

    Raises:
        ConfigError: PyMongo refuses the URL (malformed, or options that contradict each
            other). An unknown option is only warned about, by PyMongo.
    """
    try:
        given = {key.lower() for key, _ in parse_qsl(urlsplit(url).query)}
    except ValueError as e:
        raise ConfigError(f"MongoDB URL {redact_url(url)} is malformed: {e}") from e
    timeout_ms = max(1, round(connect_timeout * 1000))
    options: dict[str, Any] = {
        "tz_aware": True,
        "serverSelectionTimeoutMS": timeout_ms,
        "connectTimeoutMS": timeout_ms,
    }
    if "w" not in given:
        options["w"] = "majority"
    if "retrywrites" not in given:
        options["retryWrites"] = True
    try:
        return AsyncMongoClient(url, **options)
    except (ConfigurationError, ValueError) as e:  # ValueError: a port that is not a number
        raise ConfigError(f"MongoDB URL {redact_url(url)} is invalid: {e}") from e


@contextlib.contextmanager
def unavailable_errors(where: str, *, timeout: float | None = None) -> Iterator[None]:
    """Report connection and authentication trouble inside the block as ``StoreUnavailable``.

    Anything else (a bad query is a bug) propagates as itself.
    """
    try:
        yield
    except (ConnectionFailure, ExecutionTimeout, WriteConcernError) as e:
        # ConnectionFailure covers server selection timeouts, lost connections and a primary
        # stepping down; a write concern error leaves a write's durability unknown.
        raise store_unavailable("MongoDB", where, e, timeout=timeout) from e
    except OperationFailure as e:
        if e.code not in _AUTH_FAILURES:
            raise
        raise store_unavailable("MongoDB", where, e, timeout=timeout) from e


class MongoCollection:
    """One MongoDB collection, and the client behind it when this object opened it.

    The plumbing the saga store and the participants' idempotency store share: building over
    a database or from a URL, turning driver errors into ``StoreUnavailable`` that name the
    URL, and closing what was opened.
    """

    def __init__(self, database: AsyncDatabase[Document], collection: str) -> None:
        self.database = database
        self.collection: AsyncCollection[Document] = database[collection]
        self._where = f"database {database.name}"
        self._timeout: float | None = None
        self._client: AsyncMongoClient[Document] | None = None

    @classmethod
    def _connected(cls, url: str, connect_timeout: float, **options: Any) -> Self:
        """An instance over the database named by the URL's path (default ``saga``).

        Raises:
            ConfigError: PyMongo refuses the URL.
        """
        client = open_client(url, connect_timeout=connect_timeout)
        made = cls(client.get_default_database(DEFAULT_DATABASE), **options)
        made._client, made._where, made._timeout = client, redact_url(url), connect_timeout
        return made

    def _errors(self) -> contextlib.AbstractContextManager[None]:
        return unavailable_errors(self._where, timeout=self._timeout)

    async def close(self) -> None:
        """Close the client if this object opened it."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()
