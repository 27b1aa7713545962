"""The daemons' HTTP endpoints: ``/metrics``, ``/healthz`` and ``/readyz``.

``/healthz`` answers 200 while the process runs; ``/readyz`` answers 200 only while every
consumer is registered with the broker, so a load balancer or Kubernetes stops sending work to
a process that is starting, reconnecting or shutting down. A few lines on asyncio streams are
enough: the endpoints take no input and serve a handful of requests a minute.

Anything may connect to the port, so a request is bounded before it is read: one deadline for
the whole exchange, a request line of at most 8 KiB, at most 64 header lines in 16 KiB, and at
most 16 connections at once (more are answered 503 and closed). What is not a well-formed
HTTP/1.x request gets a 400 (414 or 431 for the size limits), never a traceback in the log.
:meth:`ProbeServer.close` closes the clients too: one that drips a header a minute must not
hold the shutdown. The server listens on ``127.0.0.1`` unless ``SAGA_HTTP_HOST`` says
otherwise (containers set ``0.0.0.0`` to serve their probes to the pod).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from typing import Final

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = structlog.get_logger("http")

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_CLOSE_TIMEOUT: Final = 5.0
_REQUEST_LINE = re.compile(rb"([A-Z]{1,16}) (/[\x21-\x7e]*|\*) HTTP/1\.[01]\r?\n")
_HEADER_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00\r\n]*\r?\n")


class _Refused(Exception):
    """The request breaks a rule; answer ``status`` and close."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class ProbeServer:
    """Serves metrics from ``registry`` and readiness from ``is_ready``.

    Args:
        request_timeout: seconds for a whole request, from connecting to the last byte out.
        max_connections: clients served at once; more are answered 503.
        max_line: bytes in the request line.
        max_headers: header lines in a request.
        max_header_bytes: bytes of all header lines together.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        is_ready: Callable[[], bool],
        host: str,
        port: int,
        *,
        request_timeout: float = 5.0,
        max_connections: int = 16,
        max_line: int = 8192,
        max_headers: int = 64,
        max_header_bytes: int = 16384,
    ) -> None:
        self.registry = registry
        self.is_ready = is_ready
        self.host = host
        self.port = port
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.max_line = max_line
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes
        self._server: asyncio.Server | None = None
        # The server's connection tasks are its own: close() ends every one of them.
        self._clients: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def start(self) -> None:
        """Listen; ``port`` 0 picks a free port (read it back from :attr:`port`)."""
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=max(self.max_line, 1024)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("http_listening", host=self.host, port=self.port)

    async def close(self) -> None:
        """Stop listening and close every client connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        clients = dict(self._clients)
        for writer in clients.values():
            writer.transport.abort()  # its reads and writes fail now, and its task ends
        if clients:
            _, stuck = await asyncio.wait(clients, timeout=_CLOSE_TIMEOUT)
            for task in stuck:  # not expected: every wait in _serve ends with the transport
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
        await server.wait_closed()

    def respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        """Status, content type and body for one request."""
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        route = path.split("?", 1)[0]
        if route == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if route == "/healthz":
            return 200, "text/plain", b"ok\n"
        if route == "/readyz":
            if self.is_ready():
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", b"not consuming\n"
        return 404, "text/plain", b"not found\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        busy = len(self._clients) >= self.max_connections
        self._clients[task] = writer
        try:
            async with asyncio.timeout(self.request_timeout):
                if busy:
                    await self._write(writer, "GET", 503, b"too many connections\n")
                    return
                await self._exchange(reader, writer)
        except (TimeoutError, ConnectionError, OSError):
            pass  # a client that hangs or drops gets nothing; the probe simply fails
        except Exception:  # a bug in answering: log it, close the connection, keep serving
            log.exception("http_request_failed")
        finally:
            del self._clients[task]
            writer.close()  # flushes what is buffered; close() aborts the stragglers

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, path = await self._read_request(reader)
        except _Refused as refused:
            await self._write(writer, "GET", refused.status, b"bad request\n")
            return
        try:
            status, content_type, body = self.respond(method, path)
        except Exception:
            log.exception("http_request_failed", path=path[:200])
            status, content_type, body = 500, "text/plain", b"internal error\n"
        await self._write(writer, method, status, body, content_type)

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, str]:
        """The method and target of a well-formed request whose headers fit the limits.

        Raises:
            _Refused: with the status that says what is wrong.
        """
        line = await self._line(reader, self.max_line, too_long=414)
        if not line:
            raise ConnectionResetError("closed before a request")
        found = _REQUEST_LINE.fullmatch(line)
        if found is None:
            raise _Refused(400)
        total = 0
        for _ in range(self.max_headers + 1):
            header = await self._line(reader, self.max_header_bytes, too_long=431)
            if header in (b"\r\n", b"\n"):
                return found.group(1).decode("ascii"), found.group(2).decode("ascii")
            total += len(header)
            if total > self.max_header_bytes:
                raise _Refused(431)
            if not _HEADER_LINE.fullmatch(header):
                raise _Refused(400)
        raise _Refused(431)

    @staticmethod
    async def _line(reader: asyncio.StreamReader, limit: int, *, too_long: int) -> bytes:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                return b""
            raise _Refused(400) from e
        except asyncio.LimitOverrunError as e:
            raise _Refused(too_long) from e
        if len(line) > limit:
            raise _Refused(too_long)
        return line

    @staticmethod
    async def _write(
        writer: asyncio.StreamWriter,
        method: str,
        status: int,
        body: bytes,
        content_type: str = "text/plain",
    ) -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + (b"" if method == "HEAD" else body))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
