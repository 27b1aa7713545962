"""Serving the console: open the store and the broker, bind, serve until stopped."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from orchestrator.client import SagaClient
from orchestrator.console.api import ConsoleApi, build_app
from orchestrator.console.auth import Access
from orchestrator.definition import App
from orchestrator.metrics import Metrics
from orchestrator.operations import Operations, OutboxOnly
from orchestrator.runtime import Orchestrator
from orchestrator.store import SagaStore
from plumbing.parked import ParkedQueue
from plumbing.rabbitmq import RabbitTransport

log = structlog.get_logger("console")


@asynccontextmanager
async def serve_console(
    app: App,
    store: SagaStore,
    access: Access,
    *,
    host: str,
    port: int,
    amqp_url: str | None = None,
    apply_here: bool = False,
    answer_timeout: float = 30.0,
) -> AsyncIterator[str]:
    """Serve the console on ``host:port`` (0: any free port) until the block ends; yields its
    base URL. ``store`` must be set up.

    With a broker (``amqp_url``), actions are sent to the orchestrator daemon, which applies
    and counts them with every other transition, and parked messages can be handled. Without
    one, or with ``apply_here``, actions are applied in this process and counted on the
    console's own ``/metrics``. ``answer_timeout``: seconds the daemon has to answer an
    action (504 after that; the request expires unapplied)."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.prepare(app)
    async with AsyncExitStack() as stack:
        parked = None
        daemon = None
        if amqp_url:
            rabbit = RabbitTransport(amqp_url)
            stack.push_async_callback(rabbit.close)
            parked = ParkedQueue(await rabbit.connect())
            engine = Orchestrator(app, store, rabbit, metrics=metrics)
            if not apply_here:
                daemon = SagaClient(
                    amqp_url, answer_timeout=answer_timeout, transport=RabbitTransport(amqp_url)
                )
                stack.push_async_callback(daemon.close)
        else:
            engine = Orchestrator(app, store, OutboxOnly(), metrics=metrics)
        api = ConsoleApi(store, Operations(engine, daemon), parked, access, registry)
        runner = web.AppRunner(build_app(api), access_log=None, handle_signals=False)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        url = f"http://{shown}:{bound[1]}"
        log.info("console_serving", url=url, tokens=len(access.tokens))
        yield url
