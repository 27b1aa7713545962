"""A server that comes up late: a TCP port that refuses connections until opened, then forwards.

A daemon started while its broker or store is down must wait for it. Stopping the shared
RabbitMQ or PostgreSQL is not an option (other tests and people use them), so the test points
the daemon at a port of its own: while closed, nothing listens there and every connection is
refused, exactly as for a server that is down; once opened, every connection is piped, byte for
byte, to the real server.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Self

from orchestrator.processes import free_port

_CHUNK = 65536


class LateServer:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port`` once :meth:`open` is called."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        # The server's connection tasks are its own; close() ends every one of them.
        self._pipes: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        """Start accepting (and forwarding) connections."""
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)

    async def close(self) -> None:
        """Stop accepting and cut every forwarded connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._pipes):
            writer.transport.abort()
        await server.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._pipes.update((writer, upstream_writer))
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(_pump(reader, upstream_writer))
                group.create_task(_pump(upstream_reader, writer))
        except* OSError:
            pass  # one side went away: so does the other
        finally:
            for end in (writer, upstream_writer):
                self._pipes.discard(end)
                end.transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy ``reader`` to ``writer`` until end of stream, then close ``writer``."""
    while chunk := await reader.read(_CHUNK):
        writer.write(chunk)
        await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()
