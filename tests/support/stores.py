"""Saga stores for tests that need one of their own."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

from orchestrator.stores.postgres import PostgresStore

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
