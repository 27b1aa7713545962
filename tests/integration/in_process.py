"""The orchestrator and services in this process over real RabbitMQ, for integration tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from orchestrator.definition import App
from orchestrator.runtime import Orchestrator
from orchestrator.store import SagaStore
from plumbing.rabbitmq import RabbitTransport
from plumbing.transport import Transport


class Service(Protocol):
    """A participant service or an observer: something that consumes until cancelled."""

    async def run(self, transport: Transport, *, ready: asyncio.Event | None = None) -> None:
        """Consume; set ``ready`` once consuming."""


@contextlib.asynccontextmanager
async def running(
    url: str, app: App, store: SagaStore, services: Sequence[Service]
) -> AsyncIterator[Orchestrator]:
    """The orchestrator and ``services``, each on a connection of its own, all consuming
    before this yields; stopped and closed afterwards."""
    transports = [RabbitTransport(url) for _ in range(1 + len(services))]
    orchestrator = Orchestrator(app, store, transports[0])
    async with asyncio.TaskGroup() as group:
        daemon = group.create_task(orchestrator.run())
        tasks = []
        try:
            async with asyncio.timeout(60):
                await orchestrator.ready.wait()
            for service, transport in zip(services, transports[1:], strict=True):
                ready = asyncio.Event()
                tasks.append(group.create_task(service.run(transport, ready=ready)))
                async with asyncio.timeout(60):
                    await ready.wait()
            yield orchestrator
        finally:
            orchestrator.stop()
            await daemon
            for task in tasks:
                task.cancel()
            for transport in transports:
                await transport.close()
