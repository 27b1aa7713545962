"""AMQP frames written to the socket in batches: one send per turn of the event loop.

aiormq's writer task writes every queued frame (a publish, an ack, a heartbeat) with its own
``StreamWriter.write``, and each is a ``send`` system call that also wakes the broker. With
one send per frame, a responder spent 14% more CPU per message and the broker 23% more
(``python -m bench.writes``). :class:`CoalescingWriter` gathers what aiormq writes during one
turn of the event loop and sends it at the end of the turn, in the order it was written.

An acknowledgement is also held for up to ``ack_hold`` seconds, so that it leaves with the
next frame written (a participant's next reply, the orchestrator's next publish) instead of on
its own. Nothing waits for an ack but the broker's prefetch window, and a held ack is only
late, never reordered or dropped: any other frame, and closing the connection, sends it first.
An ack lost with the connection is what any unsent ack already was: the broker redelivers the
message, and every receiver drops duplicates.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import aiormq
from aiormq.exceptions import AMQPConnectionError
from yarl import URL

FRAME_QUEUE_BOUND: Final = 65_536
"""Frames aiormq may hold for its writer task per connection (aiormq's default is 10)."""

ACK_HOLD: Final = 0.02
"""How long an ack may wait for company, in seconds: far below any timeout or heartbeat, and
about the gap between two commands to one service at 50 a second."""

_READ_LIMIT: Final = 2**16  # asyncio.open_connection's default buffer limit

# A basic.ack frame (AMQP 0-9-1, 4.2.3): type 1 (method), channel (2 octets), size 13
# (4 octets), class 60 and method 80 (2 octets each), delivery tag (8), multiple (1), 0xCE.
_ACK_SIZE: Final = 21
_ACK_HEAD: Final = b"\x00\x00\x00\x0d\x00\x3c\x00\x50"  # size, class, method: octets 3-10
_METHOD_FRAME: Final = 1


def raise_frame_queue_bound() -> None:
    """Let aiormq queue up to :data:`FRAME_QUEUE_BOUND` frames for its writer, not 10.

    A publish holds its channel's lock while it puts its frame in that queue, and waits there
    while the queue is full. Under load the queue filled, and each publish then took the lock
    on a later turn of the loop, one at a time: a busy orchestrator wrote one frame per send
    (3.4 sends per saga step, against 0.4 once the queue was large enough), and its publishes
    waited on each other. The bound held nothing back anyway: the writer moves frames on to
    the socket's buffer, which has no bound, as fast as they come; what is in flight is bounded
    by the prefetch of the queues being handled. aiormq reads the bound from its class, so this
    applies to every aiormq connection in the process.
    """
    aiormq.Connection.FRAME_BUFFER_SIZE = max(
        aiormq.Connection.FRAME_BUFFER_SIZE, FRAME_QUEUE_BOUND
    )


def is_ack(frame: bytes) -> bool:
    """Whether ``frame`` is exactly one ``basic.ack`` method frame."""
    return len(frame) == _ACK_SIZE and frame[0] == _METHOD_FRAME and frame[3:11] == _ACK_HEAD


class CoalescingWriter(asyncio.StreamWriter):
    """A stream writer that sends what was written during one turn of the loop at once.

    ``drain`` keeps its meaning (wait while the transport's buffer is over its high-water
    mark): the bytes held here are sent by the end of the turn, or ``ack_hold`` later if they
    are only acks.
    """

    def __init__(
        self,
        transport: asyncio.Transport,
        protocol: asyncio.StreamReaderProtocol,
        reader: asyncio.StreamReader | None,
        loop: asyncio.AbstractEventLoop,
        *,
        ack_hold: float = ACK_HOLD,
    ) -> None:
        super().__init__(transport, protocol, reader, loop)
        self.ack_hold = ack_hold
        self._event_loop = loop
        self._pending: list[bytes] = []
        self._flush_soon: asyncio.Handle | None = None
        self._flush_later: asyncio.TimerHandle | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Hold ``data`` until the end of this turn (an ack: up to ``ack_hold``)."""
        frame = bytes(data)
        self._pending.append(frame)
        if self._flush_soon is not None:
            return
        if is_ack(frame):
            if self._flush_later is None:
                self._flush_later = self._event_loop.call_later(self.ack_hold, self.flush)
            return
        self._flush_soon = self._event_loop.call_soon(self.flush)

    def writelines(self, data: Any) -> None:
        """Hold each chunk of ``data``, as :meth:`write` does."""
        for chunk in data:
            self.write(chunk)

    def flush(self) -> None:
        """Send everything held, in order, in one write to the transport."""
        for handle in (self._flush_soon, self._flush_later):
            if handle is not None:
                handle.cancel()
        self._flush_soon = self._flush_later = None
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        if not self.transport.is_closing():  # the connection is gone: so is what it held
            super().write(data)

    def write_eof(self) -> None:
        """Send what is held, then half-close the connection."""
        self.flush()
        super().write_eof()

    def close(self) -> None:
        """Send what is held, then close the transport."""
        self.flush()
        super().close()


class CoalescingTransportFactory(aiormq.TransportFactory):
    """aiormq's TCP and TLS connections, with a :class:`CoalescingWriter`."""

    def __init__(self, *, ack_hold: float = ACK_HOLD) -> None:
        self.ack_hold = ack_hold

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to ``url`` (TLS for ``amqps``), as ``asyncio.open_connection`` does."""
        provider = kwargs.pop("ssl_context_provider", None)
        ssl = await provider.get_context() if url.scheme == "amqps" and provider else None
        if url.host is None or url.port is None:  # aiormq fills in the port of the scheme
            raise AMQPConnectionError(
                f"no host and port to connect to in {url.with_password(None)}"
            )
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_READ_LIMIT, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.create_connection(
                lambda: protocol, host=url.host, port=url.port, ssl=ssl, **kwargs
            )
        except OSError as e:
            raise AMQPConnectionError(*e.args) from e
        writer = CoalescingWriter(transport, protocol, reader, loop, ack_hold=self.ack_hold)
        return reader, writer
