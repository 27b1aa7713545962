"""Run the DBOS peer (:mod:`bench.peers.dbos_app`), synchronous and asynchronous."""

from __future__ import annotations

import sys
from typing import Any

from bench.context import Context
from bench.infra import PgStats, fresh_database
from bench.peers.metered import metered_driver_run


async def run_dbos(ctx: Context, mode: str) -> dict[str, Any]:
    """One DBOS run (``mode`` sync or async) on a fresh system database."""
    async with fresh_database(ctx.servers) as (url, name):
        env = {**ctx.base_env(), "BENCH_DBOS_URL": url}
        driver = [sys.executable, "-m", "bench.peers.dbos_app", "--mode", mode]
        pg = await PgStats.connect(ctx.servers, name)
        try:
            return await metered_driver_run(ctx, f"dbos-{mode}", {}, driver, env=env, pg=pg)
        finally:
            await pg.close()
