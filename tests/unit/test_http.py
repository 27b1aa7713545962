"""The probe endpoints over a real socket."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter
from structlog.testing import capture_logs

from plumbing.http import ProbeServer
from plumbing.settings import SagaSettings


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


# --- untrusted clients ---------------------------------------------------------------------------

VALID_STATUSES = {b"200", b"400", b"404", b"405", b"414", b"431", b"503"}


@contextlib.asynccontextmanager
async def serving(**limits: Any) -> AsyncIterator[ProbeServer]:
    server = ProbeServer(CollectorRegistry(), lambda: True, "127.0.0.1", 0, **limits)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def exchange(port: int, raw: bytes) -> bytes:
    """Send ``raw``, half-close, and read whatever comes back until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(30):
            return await reader.read()
    except ConnectionError:
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def status_of(response: bytes) -> bytes:
    return response.split(b" ", 2)[1] if response.startswith(b"HTTP/1.1 ") else b""


async def test_a_request_line_over_64_kib_is_a_414_not_a_traceback() -> None:
    async with serving() as server:
        with capture_logs() as logs:
            response = await exchange(server.port, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n")
        assert status_of(response) == b"414"
        assert await get(server.port, "/healthz") == (200, "ok\n")
    assert not [entry for entry in logs if entry.get("exc_info") or entry["log_level"] == "error"]


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET /healthz\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/2.0\r\n\r\n", b"400"),
        (b"get /healthz HTTP/1.1\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
        (b"GET /hea\x00lthz HTTP/1.1\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\n" + b"X-A: b\r\n" * 65 + b"\r\n", b"431"),
        (b"GET /healthz HTTP/1.1\r\n" + b"X-A: " + b"b" * 9000 + b"\r\n\r\n", b"431"),
        (b"GET /healthz HTTP/1.1\r\nHost: x", b"400"),  # ends inside the headers
        (b"POST /healthz HTTP/1.1\r\n\r\n", b"405"),
        (b"HEAD /healthz HTTP/1.1\r\n\r\n", b"200"),
    ],
)
async def test_malformed_and_oversized_requests_get_a_status(raw: bytes, status: bytes) -> None:
    async with serving() as server:
        assert status_of(await exchange(server.port, raw)) == status


async def test_one_deadline_bounds_a_client_that_drips_headers() -> None:
    async with serving(request_timeout=0.5) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        async with asyncio.timeout(30):
            while not reader.at_eof():  # a header every 100 ms never gets past the deadline
                writer.write(b"X-Drip: 1\r\n")
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                if await _closed_within(reader, 0.1):
                    break
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        assert await get(server.port, "/healthz") == (200, "ok\n")


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        async with asyncio.timeout(seconds):
            return await reader.read(1) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def test_close_does_not_wait_for_a_client_that_never_finishes() -> None:
    server = ProbeServer(CollectorRegistry(), lambda: True, "127.0.0.1", 0, request_timeout=3600)
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nX-Drip: 1\r\n")
    await writer.drain()
    await _closed_within(reader, 0.05)  # the server has the connection
    async with asyncio.timeout(10):
        await server.close()
    async with asyncio.timeout(10):
        assert await reader.read() == b""
    writer.close()


async def test_connections_over_the_cap_are_answered_503() -> None:
    async with serving(max_connections=2, request_timeout=30) as server:
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        for reader, _ in idle:
            await _closed_within(reader, 0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        async with asyncio.timeout(30):
            assert status_of(await reader.read()) == b"503"  # answered before it asks
        writer.close()
        for _, writer in idle:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        async with asyncio.timeout(30):
            while (await get(server.port, "/healthz"))[0] != 200:  # noqa: ASYNC110 - a socket
                await asyncio.sleep(0.05)


def test_probes_listen_on_localhost_unless_configured() -> None:
    assert SagaSettings().http_host == "127.0.0.1"


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.one_of(
        st.binary(max_size=3000),
        st.lists(
            st.sampled_from(
                [
                    b"GET",
                    b"HEAD",
                    b" ",
                    b"/",
                    b"/metrics",
                    b"/readyz",
                    b"HTTP/1.1",
                    b"\r\n",
                    b"\n",
                    b":",
                    b"Host",
                    b"\x00",
                    b"\xff",
                    b"a" * 9000,
                    b"\t",
                    b"?x=1",
                ]
            ),
            max_size=40,
        ).map(b"".join),
    )
)
async def test_no_input_crashes_the_probe_server(raw: bytes) -> None:
    async with serving(request_timeout=2) as server:
        with capture_logs() as logs:
            response = await exchange(server.port, raw)
        assert response == b"" or status_of(response) in VALID_STATUSES, response[:80]
        assert not [e for e in logs if e.get("exc_info") or e["log_level"] == "error"]
        assert await get(server.port, "/healthz") == (200, "ok\n")
