"""Run the Celery peer (:mod:`bench.peers.celery_app`): four workers and a driver."""

from __future__ import annotations

import sys
from typing import Any

from bench.context import Context
from bench.infra import fresh_vhost
from bench.peers.celery_app import SERVICES
from bench.peers.metered import metered_driver_run


async def run_celery(ctx: Context) -> dict[str, Any]:
    """One Celery run in a fresh vhost."""
    async with fresh_vhost(ctx.servers) as url:
        env = {**ctx.base_env(), "BENCH_CELERY_BROKER": url}
        workers = {
            service: [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "bench.peers.celery_app",
                "worker",
                "-Q",
                service,
                "--pool",
                "solo",
                "-n",
                f"{service}@bench",
            ]
            for service in SERVICES
        }
        driver = [sys.executable, "-m", "bench.peers.celery_app"]
        return await metered_driver_run(ctx, "celery", workers, driver, env=env)
