"""Several broker addresses in ``SAGA_AMQP_URL``: parsing, redaction, and the transport trying
them in order and going round them after a lost connection.

The rotation runs against :class:`FakeBroker`, just enough of AMQP 0-9-1 to open a connection
and then hold or drop it, so these tests need no RabbitMQ; the failover against real nodes is
in ``tests/integration/test_rabbit_failover.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import pamqp.commands
import pamqp.frame
import pytest

from orchestrator.processes import free_port
from plumbing.errors import BrokerUnavailable, ConfigError
from plumbing.rabbitmq import RabbitTransport
from plumbing.settings import SagaSettings, load_settings
from plumbing.urls import amqp_addresses, redact_url, split_urls


class FakeBroker:
    """A TCP server that opens AMQP connections (no channels) and can drop them all."""

    def __init__(self) -> None:
        self.accepted = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"amqp://guest:s3cret-pw@127.0.0.1:{self.port}/"

    @property
    def shown(self) -> str:
        return f"amqp://guest:***@127.0.0.1:{self.port}/"

    async def __aenter__(self) -> FakeBroker:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.drop()
        await self._server.wait_closed()

    def drop(self) -> None:
        """Close every open connection, as a node that dies does."""
        for writer in self._writers:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readexactly(8)  # the protocol header
            writer.write(pamqp.frame.marshal(pamqp.commands.Connection.Start(), 0))
            await _frame(reader)  # StartOk
            tune = pamqp.commands.Connection.Tune(channel_max=16, frame_max=131072, heartbeat=60)
            writer.write(pamqp.frame.marshal(tune, 0))
            await _frame(reader)  # TuneOk
            await _frame(reader)  # Open
            writer.write(pamqp.frame.marshal(pamqp.commands.Connection.OpenOk(), 0))
            await writer.drain()
            # Hold the connection (heartbeats come and go) until the client closes it or drop().
            while not isinstance(await _frame(reader), pamqp.commands.Connection.Close):
                pass
            writer.write(pamqp.frame.marshal(pamqp.commands.Connection.CloseOk(), 0))
            await writer.drain()
        self._writers.discard(writer)
        writer.close()


async def _frame(reader: asyncio.StreamReader) -> object:
    head = await reader.readexactly(7)
    rest = await reader.readexactly(int.from_bytes(head[3:7], "big") + 1)
    return pamqp.frame.unmarshal(head + rest)[2]


@pytest.fixture
async def brokers() -> AsyncIterator[tuple[FakeBroker, FakeBroker]]:
    async with FakeBroker() as first, FakeBroker() as second:
        yield first, second


def closed_url() -> str:
    return f"amqp://guest:s3cret-pw@127.0.0.1:{free_port()}/"


async def eventually(condition: Callable[[], bool], within: float = 30) -> None:
    """Poll until ``condition()`` holds."""
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.02)


async def wait_for_address(transport: RabbitTransport, address: str) -> None:
    """Wait until the transport is connected to ``address``."""
    await eventually(lambda: transport.connected and transport.address == address)


# --- parsing and redaction --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "urls"),
    [
        ("amqp://h1/", ("amqp://h1/",)),
        ("amqp://h1:5672/,amqp://h2:5673/", ("amqp://h1:5672/", "amqp://h2:5673/")),
        (" amqp://h1/ ,  amqps://h2/v ", ("amqp://h1/", "amqps://h2/v")),
        ("amqp://u:pa,ss@h1/,amqp://u:pa,ss@h2/", ("amqp://u:pa,ss@h1/", "amqp://u:pa,ss@h2/")),
        ("mongodb://u:p@h1:27017,h2:27017/saga", ("mongodb://u:p@h1:27017,h2:27017/saga",)),
        ("amqp://h1/, ", ("amqp://h1/",)),
        ("", ()),
    ],
)
def test_a_comma_separates_urls_only_where_a_scheme_follows(
    value: str, urls: tuple[str, ...]
) -> None:
    assert split_urls(value) == urls


def test_every_password_in_a_list_is_hidden() -> None:
    shown = redact_url("amqp://app:pw1@h1:5672/prod,amqp://app:pw2@h2:5673/prod")
    assert shown == "amqp://app:***@h1:5672/prod,amqp://app:***@h2:5673/prod"


def test_addresses_of_one_virtual_host_are_accepted() -> None:
    value = "amqp://g:p@h1:5672,amqp://g:p@h2:5673/,amqp://g:p@h3/%2F"
    assert len(amqp_addresses(value)) == 3  # no path, "/" and "%2F" all mean vhost "/"


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("", "no RabbitMQ URL is given"),
        ("amqp://g:s3cret-pw@h1/,http://g:s3cret-pw@h2/", "'http://g:***@h2/' is not valid"),
        ("amqp://g:s3cret-pw@h1/a,amqp://g:s3cret-pw@h2/b", "name different virtual hosts"),
        ("amqp://g:s3cret-pw@h1:70000/", "is malformed"),
        ("amqp://g:s3cret-pw@:5672/", "is not valid: use amqp://"),
    ],
)
def test_bad_address_lists_are_one_sentence_without_the_password(value: str, says: str) -> None:
    with pytest.raises(ConfigError) as raised:
        amqp_addresses(value)
    assert says in str(raised.value)
    assert "s3cret-pw" not in str(raised.value)


def test_the_settings_take_a_list_and_name_the_variable_when_it_is_wrong() -> None:
    value = "amqp://g:s3cret-pw@h1:5672/,amqp://g:s3cret-pw@h2:5673/"
    assert load_settings(SagaSettings, amqp_url=value).amqp_url == value
    with pytest.raises(ConfigError) as raised:
        load_settings(SagaSettings, amqp_url="amqp://g:s3cret-pw@h1/,ftp://g:s3cret-pw@h2/")
    text = str(raised.value)
    assert text.startswith("SAGA_AMQP_URL is invalid: the RabbitMQ URL 'ftp://g:***@h2/'")
    assert "s3cret-pw" not in text
    assert "s3cret-pw" not in str(raised.value.__cause__)  # nor in the chained pydantic error


# --- start-up ---------------------------------------------------------------------------------


async def test_start_up_connects_to_the_first_address_that_answers(
    brokers: tuple[FakeBroker, FakeBroker],
) -> None:
    first, second = brokers
    transport = RabbitTransport(f"{closed_url()},{first.url},{second.url}", connect_timeout=5)
    try:
        await transport.connect()
        assert transport.address == first.shown
        assert (first.accepted, second.accepted) == (1, 0)
    finally:
        await transport.close()


async def test_start_up_with_no_address_answering_names_them_all_in_one_sentence() -> None:
    urls = [closed_url(), closed_url()]
    transport = RabbitTransport(",".join(urls), connect_timeout=3)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as raised:
        await transport.connect()
    text = str(raised.value)
    assert text.startswith("none of the 2 RabbitMQ addresses answered: ")
    for url in urls:
        assert redact_url(url) in text
    assert "s3cret-pw" not in text
    assert "\n" not in text
    assert time.monotonic() - started < 30  # refused at once, not waited for
    await transport.close()


# --- reconnection -----------------------------------------------------------------------------


async def test_a_lost_connection_moves_on_to_the_next_address_that_answers(
    brokers: tuple[FakeBroker, FakeBroker],
) -> None:
    first, second = brokers
    # The middle address refuses: the transport must go past it, round robin.
    transport = RabbitTransport(
        f"{first.url},{closed_url()},{second.url}", reconnect_interval=0.05, connect_timeout=5
    )
    try:
        await transport.connect()
        assert transport.address == first.shown

        first.drop()
        await wait_for_address(transport, second.shown)
        assert (first.accepted, second.accepted) == (1, 1)

        second.drop()  # and round again, to the first
        await wait_for_address(transport, first.shown)
        assert (first.accepted, second.accepted) == (2, 1)
    finally:
        await transport.close()


async def test_one_address_reconnects_to_itself(brokers: tuple[FakeBroker, FakeBroker]) -> None:
    first, _ = brokers
    transport = RabbitTransport(first.url, reconnect_interval=0.05, connect_timeout=5)
    try:
        await transport.connect()
        first.drop()
        await eventually(lambda: first.accepted == 2 and transport.connected)
        assert transport.address == first.shown
    finally:
        await transport.close()
