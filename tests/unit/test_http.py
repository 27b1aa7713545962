"""The probe endpoints over a real socket."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter

from plumbing.http import ProbeServer


async def get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_metrics_health_and_readiness() -> None:
    registry = CollectorRegistry()
    Counter("saga_demo_total", "A counter.", registry=registry).inc(3)
    ready = asyncio.Event()
    server = ProbeServer(registry, ready.is_set, "127.0.0.1", 0)
    await server.start()
    try:
        assert await get(server.port, "/healthz") == (200, "ok\n")
        assert (await get(server.port, "/readyz"))[0] == 503
        ready.set()
        assert await get(server.port, "/readyz") == (200, "ready\n")
        status, body = await get(server.port, "/metrics")
        assert status == 200
        assert "saga_demo_total 3.0" in body
        assert (await get(server.port, "/nope"))[0] == 404
    finally:
        await server.close()
