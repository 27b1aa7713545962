"""Frames written in batches (:mod:`plumbing.amqp_writes`), over a transport that records sends.

The socket side is exercised by every RabbitMQ test: the transport connects through
:class:`CoalescingTransportFactory`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pamqp.frame
import pytest
from pamqp import commands, heartbeat

from plumbing.amqp_writes import CoalescingWriter, is_ack


class RecordingTransport(asyncio.Transport):
    """A transport that keeps each write as one send."""

    def __init__(self) -> None:
        super().__init__()
        self.sends: list[bytes] = []
        self.sent = asyncio.Event()
        self.closing = False

    def write(self, data: Any) -> None:
        self.sends.append(bytes(data))
        self.sent.set()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def frame(method: Any, channel: int = 1) -> bytes:
    return pamqp.frame.marshal(method, channel)


ACK = frame(commands.Basic.Ack(delivery_tag=7))
PUBLISH = frame(commands.Basic.Publish(exchange="saga.commands", routing_key="payment"))


@pytest.fixture
async def writers() -> AsyncIterator[list[CoalescingWriter]]:
    """Writers made by a test, closed after it."""
    made: list[CoalescingWriter] = []
    yield made
    for out in made:
        out.close()


def writer(
    made: list[CoalescingWriter], ack_hold: float = 60.0
) -> tuple[CoalescingWriter, RecordingTransport]:
    loop = asyncio.get_running_loop()
    transport = RecordingTransport()
    reader = asyncio.StreamReader(loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    out = CoalescingWriter(transport, protocol, reader, loop, ack_hold=ack_hold)
    made.append(out)
    return out, transport


async def turns(count: int = 3) -> None:
    """Let the event loop run ``count`` turns (no time passes on purpose)."""
    for _ in range(count):
        await asyncio.sleep(0)


def test_an_ack_frame_is_recognised_whatever_its_channel_and_tag() -> None:
    assert is_ack(ACK)
    assert is_ack(frame(commands.Basic.Ack(delivery_tag=2**63 - 1, multiple=True), channel=65535))
    assert not is_ack(frame(commands.Basic.Nack(delivery_tag=7)))
    assert not is_ack(frame(commands.Basic.Reject(delivery_tag=7)))
    assert not is_ack(PUBLISH)
    assert not is_ack(pamqp.frame.marshal(heartbeat.Heartbeat(), 0))


async def test_frames_written_in_one_turn_leave_in_one_send_in_order(
    writers: list[CoalescingWriter],
) -> None:
    out, transport = writer(writers)
    out.write(PUBLISH)
    out.write(b"header")
    out.write(b"body")
    assert transport.sends == []  # not before the end of the turn
    await turns()
    assert transport.sends == [PUBLISH + b"headerbody"]
    out.write(b"next")
    await turns()
    assert transport.sends == [PUBLISH + b"headerbody", b"next"]


async def test_an_ack_waits_for_the_next_frame_and_leaves_first(
    writers: list[CoalescingWriter],
) -> None:
    out, transport = writer(writers)
    out.write(ACK)
    await turns()
    assert transport.sends == []
    out.write(PUBLISH)
    await turns()
    assert transport.sends == [ACK + PUBLISH]


async def test_an_ack_alone_leaves_after_the_hold(writers: list[CoalescingWriter]) -> None:
    out, transport = writer(writers, ack_hold=0.01)
    out.write(ACK)
    out.write(ACK)
    await turns()
    assert transport.sends == []
    async with asyncio.timeout(10):
        await transport.sent.wait()
    assert transport.sends == [ACK + ACK]


async def test_closing_sends_what_is_held(writers: list[CoalescingWriter]) -> None:
    out, transport = writer(writers)
    out.write(ACK)
    out.close()
    assert transport.sends == [ACK]
    assert transport.closing


async def test_nothing_is_sent_on_a_transport_already_closing(
    writers: list[CoalescingWriter],
) -> None:
    out, transport = writer(writers)
    out.write(PUBLISH)
    transport.closing = True
    await turns()
    assert transport.sends == []


async def test_drain_does_not_wait_for_the_held_bytes(writers: list[CoalescingWriter]) -> None:
    out, transport = writer(writers)
    out.write(ACK)
    async with asyncio.timeout(10):
        await out.drain()
    assert transport.sends == []
