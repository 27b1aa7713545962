"""Saga stores for tests that need one of their own, and a count of their round trips."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from orchestrator.stores.postgres import PostgresStore
from plumbing.postgres import PostgresPool

S = TypeVar("S", bound=PostgresStore)


@contextlib.asynccontextmanager
async def own_table(store: S) -> AsyncIterator[S]:
    """``store`` with its table created, then dropped and the store closed afterwards."""
    await store.setup()
    try:
        yield store
    finally:
        await store.drop()
        await store.close()


class RoundTrips:
    """Counts the connections ``pool`` lends from now on: each write of a store (one statement,
    or one pipelined batch) borrows one, so this is the number of its round trips."""

    def __init__(self, pool: PostgresPool) -> None:
        self.count = 0
        lend = pool.connection

        @contextlib.asynccontextmanager
        async def counted() -> AsyncIterator[Any]:
            self.count += 1
            async with lend() as connection:
                yield connection

        pool.connection = counted  # type: ignore[method-assign]
