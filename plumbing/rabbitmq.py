"""The production transport: RabbitMQ through aio-pika.

What it promises, and how:

* **Connection.** One robust connection (aio-pika reconnects it and restores channels, QoS,
  queues and consumers) with a 10 s heartbeat, so a dead peer is noticed in about 30 s instead
  of three minutes. The URL may list several addresses, comma-separated (the nodes of one
  cluster): start-up connects to the first that answers, and after a failed attempt or a lost
  connection the next attempt goes to the next address, round robin. Start-up fails fast with
  one line that names the URL (password hidden): a malformed URL, refused credentials or an
  unknown virtual host raise :class:`ConfigError`; no address answering raises
  :class:`BrokerUnavailable`.
* **Writes.** Frames queued during one turn of the event loop go out in one send, an ack
  waits up to 20 ms to go out with the next frame, and aiormq's queue of frames is large
  enough that publishes never wait on each other for room in it (:mod:`plumbing.amqp_writes`).
* **Publishing.** One long-lived publisher channel with publisher confirms and
  ``on_return_raises``; a publish returns once the broker has taken responsibility for the
  message. Messages are persistent, JSON, carry the saga id as correlation id and our
  deterministic id in the ``saga-message-id`` header; the AMQP ``message_id`` is random per
  attempt, because aiormq matches returns to publishes by it and two in-flight publishes with
  one id confuse it. Every publish has a deadline. Failures raise :class:`PublishFailed` and
  are counted by reason: ``returned`` (unroutable), ``nacked`` and ``timeout`` (the channel is
  then replaced: a confirm that never comes means a wedged channel, and in RabbitMQ 3.10 a
  channel whose first publish to a quorum queue met a leader on a lost node nacks every later
  publish to it), ``connection`` and ``channel`` (the broker closed the channel, e.g. a missing
  exchange). Headers starting with ``x-`` are never sent: RabbitMQ owns that prefix, and a
  re-published ``x-death`` makes RabbitMQ 3.10-3.12 drop a message in the delay ladder as a
  dead-letter cycle.
* **Delays.** A message with ``deliver_at`` goes through the binary delay ladder
  (:mod:`plumbing.delays`) to its destination queue; it is never early.
* **Consuming.** Manual acks only, a channel per consumer with ``prefetch`` unacknowledged
  deliveries, each handled in its own task. The handler's verdict is applied after it returns:
  ack, requeue, or dead-letter: a copy of the raw body goes to ``saga.dead-letter`` with the
  reason and source queue in headers (and no ``x-`` headers), with confirms, and only then is
  the original acked; if the copy fails, the original is requeued, so nothing is lost. A
  handler that raises is a bug: it is logged with its traceback and the delivery is requeued
  (the queue's delivery limit parks it eventually). Every requeue comes after a backoff that
  doubles with the redeliveries RabbitMQ reports (0.1 s up to 2 s), so nothing spins: requeued
  at once, a delivery comes straight back, whatever made its handler give it back (a reply
  refused while a cluster fails over, a parking that failed) fails it again within
  milliseconds, and it reaches the poison threshold before the cause has gone. A delivery
  redelivered ``poison_threshold`` times, or whose body is over ``max_body`` bytes, is parked
  before its handler runs. A parked message is reported to ``on_dead_lettered`` once its copy
  is confirmed, so the metric counts messages, not attempts. After a reconnect, deliveries
  from the old channel cannot be acked any more; that is logged and tolerated, the broker
  redelivers them. aio-pika restores channels one by one in no fixed order, so a handler waits
  (up to ``publish_timeout``) for the publisher channel to be back before it runs: its reply
  would fail otherwise.
* **Shutdown.** Cancelling ``consume`` cancels the consumer at the broker, lets in-flight
  handlers finish and settles them, requeues deliveries that were not started, then re-raises
  the cancellation. ``close`` stops every consumer and closes the connection.
* **Topology.** ``declare`` declares exchanges, queues (durable) and bindings, plus the delay
  ladder when the topology has a delayed destination queue. A queue that exists with other
  arguments is a :class:`ConfigError` that names the queue, the difference and the fix:
  RabbitMQ compares every argument on re-declaration, so a successful declare verifies them.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Final, Literal, Self, cast

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    DeliveryMode,
)
from aio_pika.exceptions import (
    AMQPChannelError,
    AMQPError,
    AuthenticationError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    DeliveryError,
    ProbableAuthenticationError,
    ProtocolSyntaxError,
    PublishError,
)
from aiormq.exceptions import ChannelAccessRefused
from yarl import URL

from contracts import names
from plumbing.amqp_writes import CoalescingTransportFactory, raise_frame_queue_bound
from plumbing.clock import Clock, SystemClock
from plumbing.delays import DelayLadder
from plumbing.errors import BrokerUnavailable, ConfigError, PublishFailed, QueueNotFound
from plumbing.topology import BindingSpec, ExchangeSpec, QueueSpec, Topology
from plumbing.transport import DeadLetter, Delivery, Disposition, Handler, Outgoing
from plumbing.urls import amqp_addresses, amqp_vhost, redact_url, split_urls

log = structlog.get_logger("rabbitmq")

PublishFailureReason = Literal["returned", "nacked", "timeout", "connection", "channel"]
"""Why a publish failed; the label of the publish-failure metric."""

_BROKER_ERRORS: Final = (AMQPError, ConnectionError, OSError, ChannelInvalidStateError)
"""What a broker call raises when the connection or channel is gone."""

_CLOSE_TIMEOUT: Final = 5.0
DEFAULT_MAX_BODY: Final = 1024 * 1024
"""The largest message body handed to a handler, in bytes; larger ones are parked unread."""
_REASON_LIMIT: Final = 2000  # headers travel in one frame; a reason is a sentence, not a dump
_REQUEUE_BACKOFF_CAP: Final = 2.0  # held this long at most: shutdown waits for held deliveries
_ARGUMENT_HINTS: Final = {
    "x-queue-type": "the queue type (SAGA_QUEUE_TYPE)",
    "x-delivery-limit": "the delivery limit (SAGA_DELIVERY_LIMIT)",
}

_Inbox = asyncio.Queue[AbstractIncomingMessage | None]
"""Deliveries waiting for a handler slot; None says the transport was closed."""


class _FailoverConnection(aio_pika.RobustConnection):
    """A robust connection that moves on to the next broker address after every failed attempt
    and every lost connection, round robin.

    aio-pika's robust connection reconnects to ``self.url``, and calls
    ``_on_connection_close`` both when an established connection is lost and when an attempt
    fails (``UnderlayConnection.connect`` reports the error through it): that one hook is where
    the next address is chosen, before the next attempt starts.
    """

    def __init__(
        self, urls: Sequence[URL], shown: Sequence[str], start: int, *, reconnect_interval: float
    ) -> None:
        super().__init__(urls[start], reconnect_interval=reconnect_interval)
        # aio-pika hands its ``kwargs`` to aiormq's connection on every (re)connect, but keeps
        # only the parameters it knows from the constructor's.
        self.kwargs["transport_factory"] = CoalescingTransportFactory()
        raise_frame_queue_bound()
        self.urls = tuple(urls)
        self.shown = tuple(shown)
        """The addresses with their passwords hidden, for logs."""
        self.index = start
        """The address the connection uses, or tries next, in ``urls``."""

    @property
    def address(self) -> str:
        """The address in use (password hidden)."""
        return self.shown[self.index]

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        # Before the first connection, the transport tries the addresses itself (start-up
        # fails fast), so only reconnections rotate.
        if len(self.urls) > 1 and self.connection_attempt > 0 and not self.close_called:
            previous = self.address
            self.index = (self.index + 1) % len(self.urls)
            self.url = self.urls[self.index]
            log.info("broker_address_changed", previous=previous, next=self.address)
        await super()._on_connection_close(closing)

    async def _on_connected(self) -> None:
        reconnected = self.connection_attempt > 0
        await super()._on_connected()
        if reconnected:
            log.info("broker_reconnected", url=self.address)


@dataclass
class _Publisher:
    """The publisher channel."""

    channel: AbstractRobustChannel

    async def publish(
        self, exchange: str, routing_key: str, message: _Wire, *, mandatory: bool
    ) -> None:
        """Publish on the channel and await the broker's confirm.

        Straight to aiormq with ``wait=False``: aio-pika's ``Exchange.publish`` holds the
        channel's lock until the writer task has written the frame and drained the socket, so
        the publishes of every saga queue one behind another, each for a few turns of the event
        loop. Without the wait the lock is held only to number the message and queue its frame;
        the confirm is still awaited, and what waits to be written is bounded by the prefetch
        of the queues being handled.
        """
        if self.channel.is_closed:
            raise ChannelInvalidStateError(f"{self.channel!r} is closed")
        # aiormq's Channel: its abstract base does not declare ``wait``.
        channel = cast(aiormq.Channel, await self.channel.get_underlay_channel())
        await channel.basic_publish(
            message.body,
            exchange=exchange,
            routing_key=routing_key,
            properties=message.properties,
            mandatory=mandatory,
            wait=False,
        )


class RabbitTransport:
    """The :class:`~plumbing.transport.Transport` for RabbitMQ (aio-pika).

    Connects lazily on first use (or explicitly with :meth:`connect` or ``async with``) and
    cannot be reused after :meth:`close`.

    Args:
        url: ``amqp://user:password@host:5672/vhost`` (``amqps://`` for TLS), or several such
            addresses separated by commas, the nodes of one cluster with one virtual host.
        prefetch: unacknowledged deliveries per consumer, and handlers running at once.
        heartbeat: seconds; a peer silent for about three heartbeats is considered dead.
            A ``heartbeat`` in the URL's query wins.
        connect_timeout: seconds to wait for each address at start-up.
        publish_timeout: seconds to wait for a publisher confirm (and for declarations).
        reconnect_interval: seconds between reconnection attempts after the connection drops.
        ladder: the delay ladder for messages with ``deliver_at``.
        delayed_queues: queues that receive delayed messages; ``declare`` adds the ladder for
            those in its topology.
        max_body: park a delivery whose body is larger than this many bytes before anything
            reads it (the daemons' ``SAGA_MAX_MESSAGE_BYTES``).
        poison_threshold: park a delivery before its handler runs once RabbitMQ reports it
            redelivered this many times (``x-delivery-count``, quorum queues); keep it below
            the queues' delivery limit so the reason is ours. Every requeue counts, including
            a handler's own ``REQUEUE`` after a transient error. None turns it off.
        on_publish_failure: called with the reason of every failed publish (for a metric); it
            must not raise.
        on_dead_lettered: called with the queue and the label of every labelled
            :class:`DeadLetter` (and ``poison``, ``oversize``) once its parked copy is
            confirmed: each message parked is counted once.
        clock: tells the time ``deliver_at`` is measured against, and waits out the backoff
            before a requeue.

    Raises:
        ConfigError: a setting is out of range, or a delayed queue name cannot be routed.
    """

    def __init__(
        self,
        url: str,
        *,
        prefetch: int = 32,
        heartbeat: int = 10,
        connect_timeout: float = 10.0,
        publish_timeout: float = 10.0,
        reconnect_interval: float = 5.0,
        ladder: DelayLadder | None = None,
        delayed_queues: Iterable[str] = (names.TIMERS_QUEUE,),
        poison_threshold: int | None = 15,
        on_publish_failure: Callable[[str], None] | None = None,
        on_dead_lettered: Callable[[str, str], None] | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        clock: Clock | None = None,
    ) -> None:
        if prefetch < 1:
            raise ConfigError(f"prefetch must be at least 1, not {prefetch}")
        if poison_threshold is not None and poison_threshold < 1:
            raise ConfigError(f"the poison threshold must be at least 1, not {poison_threshold}")
        if max_body < 1024:
            raise ConfigError(
                f"the maximum message body must be at least 1024 bytes, not {max_body}"
            )
        self.url = url
        self.urls = split_urls(url)
        """The broker addresses, in the order they are tried."""
        self.safe_url = redact_url(url)
        """The URL (every address) with its password hidden, for logs and errors."""
        self.prefetch = prefetch
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.publish_timeout = publish_timeout
        self.reconnect_interval = reconnect_interval
        self.ladder = ladder or DelayLadder()
        self.delayed_queues = frozenset(delayed_queues)
        self.ladder.topology(self.delayed_queues)  # a name the ladder cannot route fails here
        self.poison_threshold = poison_threshold
        self.on_publish_failure = on_publish_failure
        self.on_dead_lettered = on_dead_lettered
        """Called with the queue and label once a labelled message is parked (a metric)."""
        self.max_body = max_body
        self.clock: Clock = clock or SystemClock()
        self._connection: _FailoverConnection | None = None
        self._closed = False
        self._connect_lock = asyncio.Lock()
        self._publisher: _Publisher | None = None
        self._publisher_lock = asyncio.Lock()
        # aio-pika tracks channels weakly: these strong references keep them (and their
        # restoration after a reconnect) alive for as long as they are consumed.
        self._consumer_channels: set[AbstractRobustChannel] = set()
        self._inboxes: set[_Inbox] = set()

    # --- connection -------------------------------------------------------------------------

    async def connect(self) -> aio_pika.RobustConnection:
        """Connect if not connected yet; idempotent.

        Raises:
            ConfigError: the URL is malformed, or the broker refused the login or vhost.
            BrokerUnavailable: no address answered within ``connect_timeout``, or the
                transport was closed.
        """
        async with self._connect_lock:
            if self._closed:
                raise BrokerUnavailable(f"the transport for {self.safe_url} has been closed")
            if self._connection is None:
                self._connection = await self._open_connection()
                log.info("broker_connected", url=self._connection.address)
            return self._connection

    async def _open_connection(self) -> _FailoverConnection:
        """Connect to the first address that answers, trying them in order."""
        addresses = amqp_addresses(self.url)
        urls = [broker_url(address, self.heartbeat) for address in addresses]
        shown = [redact_url(address) for address in addresses]
        vhost = amqp_vhost(addresses[0])
        unanswered: list[str] = []
        last: Exception | None = None
        for start in range(len(urls)):
            try:
                return await self._attempt(urls, shown, start)
            except Exception as e:
                error = self._connect_error(e, shown[start], vhost)
                if isinstance(error, ConfigError) or len(urls) == 1:
                    raise error from e
                log.info("broker_address_unanswered", url=shown[start], error=self._reason(e))
                unanswered.append(f"{shown[start]} ({self._reason(e)})")
                last = e
        raise BrokerUnavailable(
            f"none of the {len(urls)} RabbitMQ addresses answered: {', '.join(unanswered)}"
        ) from last

    async def _attempt(
        self, urls: Sequence[URL], shown: Sequence[str], start: int
    ) -> _FailoverConnection:
        """Connect to ``urls[start]``; reconnections later go round the other addresses."""
        connection = _FailoverConnection(
            urls, shown, start, reconnect_interval=self.reconnect_interval
        )
        try:
            # The outer deadline also covers what the connect timeout does not, such as
            # aio-pika retrying an error it does not consider fatal.
            async with asyncio.timeout(self.connect_timeout):
                await connection.connect(timeout=self.connect_timeout)
        except BaseException:
            await connection.close()
            raise
        return connection

    def _connect_error(
        self, error: Exception, address: str, vhost: str
    ) -> ConfigError | BrokerUnavailable:
        where = f"RabbitMQ at {address}"
        if isinstance(error, ProbableAuthenticationError | AuthenticationError):
            return ConfigError(f"{where} refused the login: check the user name and password")
        if isinstance(error, ProtocolSyntaxError):
            return ConfigError(
                f"{where} closed the connection while opening virtual host {vhost!r}: it "
                "does not exist or the user may not access it"
            )
        if isinstance(error, TimeoutError):
            return BrokerUnavailable(f"{where} did not answer within {self.connect_timeout:g} s")
        return BrokerUnavailable(f"cannot connect to {where}: {_describe(error)}")

    def _reason(self, error: Exception) -> str:
        """Why an address did not answer, in a few words."""
        if isinstance(error, TimeoutError):
            return f"no answer within {self.connect_timeout:g} s"
        return _describe(error)

    @property
    def address(self) -> str | None:
        """The broker address in use (password hidden); None before connecting."""
        connection = self._connection
        return None if connection is None else connection.address

    def _where(self) -> str:
        """The address to name in a message: the one in use, or every one."""
        return self.address or self.safe_url

    @property
    def connected(self) -> bool:
        """Whether the connection is up right now (it may be reconnecting)."""
        connection = self._connection
        return connection is not None and connection.connected.is_set()

    async def close(self) -> None:
        """Stop every consumer and close the connection; the transport cannot be reused."""
        self._closed = True
        for inbox in self._inboxes:
            inbox.put_nowait(None)
        connection, self._connection = self._connection, None
        self._publisher = None
        if connection is not None:
            await connection.close()
            log.info("broker_disconnected", url=connection.address)

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- topology ---------------------------------------------------------------------------

    def full_topology(self, topology: Topology) -> Topology:
        """``topology`` plus the delay ladder for the delayed destination queues it declares."""
        destinations = [q.name for q in topology.queues if q.name in self.delayed_queues]
        if not destinations:
            return topology
        return topology + self.ladder.topology(destinations)

    async def declare(self, topology: Topology) -> None:
        """Declare the topology and its delay ladder; idempotent.

        Raises:
            ConfigError: an exchange or queue exists with other settings, or the user may not
                declare it; the message says what differs and how to fix it.
            BrokerUnavailable: the broker cannot be reached, or went away meanwhile.
        """
        full = self.full_topology(topology)
        connection = await self.connect()
        # A declaration the broker refuses closes its channel, so declarations get their own.
        channel = aio_pika.Channel(connection, publisher_confirms=False)
        try:
            async with asyncio.timeout(self.publish_timeout):
                await channel.initialize()
            amqp = await channel.get_underlay_channel()
            for exchange in full.exchanges:
                await self._declare_exchange(amqp, exchange)
            for queue in full.queues:
                await self._declare_queue(amqp, queue)
            for binding in full.bindings:
                await self._bind(amqp, binding)
        except TimeoutError as e:
            raise BrokerUnavailable(
                f"RabbitMQ at {self._where()} did not answer a declaration within "
                f"{self.publish_timeout:g} s"
            ) from e
        except (ConnectionError, OSError, ChannelInvalidStateError) as e:
            raise BrokerUnavailable(
                f"lost RabbitMQ at {self._where()} while declaring the topology: {_describe(e)}"
            ) from e
        finally:
            await _close_quietly(channel)
        log.info(
            "topology_declared",
            exchanges=len(full.exchanges),
            queues=len(full.queues),
            bindings=len(full.bindings),
        )

    async def _declare_exchange(self, amqp: aiormq.abc.AbstractChannel, spec: ExchangeSpec) -> None:
        try:
            await amqp.exchange_declare(
                spec.name, exchange_type=spec.type, durable=True, timeout=self.publish_timeout
            )
        except ChannelPreconditionFailed as e:
            raise ConfigError(
                f"exchange {spec.name!r} already exists with other settings "
                f"({_reply_text(e)}); we declare it durable, of type {spec.type!r}. "
                "Delete it (management UI or rabbitmqadmin) so it is declared again, or "
                "rename it"
            ) from e
        except ChannelAccessRefused as e:
            raise ConfigError(f"may not declare exchange {spec.name!r}: {_reply_text(e)}") from e

    async def _declare_queue(self, amqp: aiormq.abc.AbstractChannel, spec: QueueSpec) -> None:
        try:
            await amqp.queue_declare(
                spec.name, durable=True, arguments=spec.arguments, timeout=self.publish_timeout
            )
        except ChannelPreconditionFailed as e:
            raise ConfigError(self._mismatch(spec, e)) from e
        except ChannelAccessRefused as e:
            raise ConfigError(f"may not declare queue {spec.name!r}: {_reply_text(e)}") from e

    def _mismatch(self, spec: QueueSpec, error: ChannelPreconditionFailed) -> str:
        text = _reply_text(error)
        found = re.search(r"inequivalent arg '([^']+)'", text)
        argument = found.group(1) if found else None
        hint = _ARGUMENT_HINTS.get(argument or "", "the settings")
        vhost = amqp_vhost(self.urls[0]) if self.urls else "/"
        wanted = ", ".join(f"{key}={value}" for key, value in sorted(spec.arguments.items()))
        return (
            f"queue {spec.name!r} already exists with different arguments: {text}. We declare "
            f"it durable with {wanted or 'no arguments'}. RabbitMQ cannot change a queue's "
            f"arguments: either set {hint} to match the existing queue, or drain it and delete "
            f"it (rabbitmqctl delete_queue -p {vhost} {spec.name}) so it is declared again"
        )

    async def _bind(self, amqp: aiormq.abc.AbstractChannel, spec: BindingSpec) -> None:
        try:
            if spec.to_exchange:
                await amqp.exchange_bind(
                    destination=spec.destination,
                    source=spec.source,
                    routing_key=spec.routing_key,
                    timeout=self.publish_timeout,
                )
            else:
                await amqp.queue_bind(
                    spec.destination,
                    spec.source,
                    routing_key=spec.routing_key,
                    timeout=self.publish_timeout,
                )
        except AMQPChannelError as e:
            raise ConfigError(
                f"cannot bind {spec.destination!r} to {spec.source!r} with key "
                f"{spec.routing_key!r}: {_reply_text(e)}"
            ) from e

    # --- publishing -------------------------------------------------------------------------

    async def publish(self, message: Outgoing) -> None:
        """Publish and wait for the broker's confirm; delayed messages go through the ladder.

        Raises:
            PublishFailed: returned, nacked, not confirmed in time, or the connection is down.
        """
        exchange, routing_key = self._address(message)
        headers: dict[str, Any] = {
            key: value for key, value in message.headers.items() if not key.startswith("x-")
        }
        headers.setdefault(names.HEADER_MESSAGE_ID, message.message_id)
        amqp_message = _Wire(
            message.body.encode(),
            _properties(
                headers=headers,
                content_type="application/json",
                correlation_id=message.correlation_id,
                timestamp=message.created_at,
                kind=message.kind,
            ),
        )
        await self._send(
            exchange,
            routing_key,
            amqp_message,
            mandatory=message.mandatory,
            what=message.message_id,
        )

    def _address(self, message: Outgoing) -> tuple[str, str]:
        """The exchange and routing key to publish ``message`` with."""
        if message.deliver_at is None:
            return message.exchange, message.routing_key
        delay = self.ladder.delay_for(message.deliver_at, self.clock.now())
        if delay == 0:  # already due: straight to the destination
            return message.exchange, message.routing_key
        if message.exchange != "" or message.routing_key not in self.delayed_queues:
            self._count_failure("returned")
            raise PublishFailed(
                f"message {message.message_id}: delayed messages must address one of the "
                f"delayed queues ({', '.join(sorted(self.delayed_queues))}) through the default "
                f"exchange, not {message.exchange or '(default)'}/{message.routing_key}"
            )
        route = self.ladder.route(delay, message.routing_key)
        return route.exchange, route.routing_key

    async def _send(
        self,
        exchange_name: str,
        routing_key: str,
        message: _Wire,
        *,
        mandatory: bool,
        what: str,
    ) -> None:
        """Publish on the publisher channel with a deadline; every failure is PublishFailed."""
        target = f"message {what} to {exchange_name or '(default)'}/{routing_key}"
        publisher: _Publisher | None = None
        try:
            async with asyncio.timeout(self.publish_timeout):
                publisher = await self._get_publisher()
                await publisher.publish(exchange_name, routing_key, message, mandatory=mandatory)
        except BrokerUnavailable as e:  # could not (re)connect: still a publish that failed
            raise self._failed("connection", f"{target}: {e}") from e
        except PublishError as e:
            raise self._failed("returned", f"{target} was returned: no queue is bound") from e
        except DeliveryError as e:
            if publisher is not None:
                await self._replace_publisher(publisher, "nacked")
            raise self._failed("nacked", f"{target} was nacked (a queue is full?)") from e
        except TimeoutError as e:
            if publisher is None or not self.connected:
                raise self._failed("connection", f"{target}: {self._down()}") from e
            await self._replace_publisher(publisher, "confirm_timeout")
            raise self._failed(
                "timeout", f"{target} was not confirmed within {self.publish_timeout:g} s"
            ) from e
        except AMQPChannelError as e:
            raise self._failed("channel", f"{target} was refused: {_reply_text(e)}") from e
        except _BROKER_ERRORS as e:
            raise self._failed("connection", f"{target}: {self._down()} ({_describe(e)})") from e
        except asyncio.CancelledError as e:
            # aiormq cancels a pending confirm when its channel closes; only a cancellation of
            # this task is a cancellation.
            if _being_cancelled():
                raise
            raise self._failed("connection", f"{target}: the channel closed") from e

    def _down(self) -> str:
        return f"the connection to {self._where()} is down"

    def _failed(self, reason: PublishFailureReason, text: str) -> PublishFailed:
        self._count_failure(reason)
        return PublishFailed(f"{text} [{reason}]")

    def _count_failure(self, reason: PublishFailureReason) -> None:
        if self.on_publish_failure is None:
            return
        try:
            self.on_publish_failure(reason)
        except Exception:  # counting a failure must never change its outcome
            log.exception("publish_failure_callback_failed", reason=reason)

    async def _get_publisher(self) -> _Publisher:
        # Without the lock when the channel exists: under load the lock's hand-over takes a
        # turn of the loop per publish, so a transition's publishes would reach the socket
        # one turn (and one send) apart instead of together.
        publisher = self._publisher
        if publisher is not None:
            return publisher
        async with self._publisher_lock:
            if self._publisher is None:
                connection = await self.connect()
                try:
                    channel = connection.channel(publisher_confirms=True, on_return_raises=True)
                    await channel.initialize()
                except RuntimeError as e:
                    # A lost connection surfaces as a bare RuntimeError here (both seen in
                    # broker restarts under load): aio-pika's "Connection was not opened" while
                    # it is reconnecting to a broker still down, aiormq's "<Connection ...>
                    # closed" when the connection drops just as the channel opens. Escaping as
                    # a RuntimeError, they made the outbox relay and the sweep hold sagas for
                    # an operator. Any other RuntimeError is a bug.
                    if not _connection_lost(e):
                        raise
                    raise ConnectionError(str(e)) from e
                self._publisher = _Publisher(channel)
            return self._publisher

    async def _replace_publisher(self, stale: _Publisher, reason: str) -> None:
        """Drop a channel that failed a publish; the next publish opens a fresh one."""
        async with self._publisher_lock:
            if self._publisher is not stale:
                return
            self._publisher = None
        log.warning("publisher_channel_replaced", reason=reason)
        await _close_quietly(stale.channel)

    # --- consuming --------------------------------------------------------------------------

    async def consume(
        self, queue: str, handler: Handler, *, ready: asyncio.Event | None = None
    ) -> None:
        """Deliver messages from ``queue`` to ``handler`` until cancelled or closed.

        On cancellation: stop the consumer at the broker, let in-flight handlers finish and
        settle them, requeue deliveries not yet started, then re-raise the cancellation.

        Raises:
            QueueNotFound: the queue does not exist (declare the topology first).
            BrokerUnavailable: the broker cannot be reached.
        """
        connection = await self.connect()
        channel = connection.channel(publisher_confirms=False)
        self._consumer_channels.add(channel)
        inbox: _Inbox = asyncio.Queue()
        self._inboxes.add(inbox)
        try:
            source, tag = await self._subscribe(channel, queue, inbox)
            log.info("consumer_started", queue=queue, prefetch=self.prefetch)
            if ready is not None:
                ready.set()
            await self._serve(source, tag, queue, handler, inbox)
        finally:
            self._inboxes.discard(inbox)
            self._consumer_channels.discard(channel)
            await _close_quietly(channel)

    async def _subscribe(
        self, channel: AbstractRobustChannel, queue: str, inbox: _Inbox
    ) -> tuple[AbstractQueue, str]:
        """Register a consumer that feeds ``inbox``; returns the queue and consumer tag."""
        try:
            await channel.initialize()
            await channel.set_qos(prefetch_count=self.prefetch)
            # Declared (passively) on the robust channel so that the consumer is restored on
            # the new channel after a reconnect.
            source = await channel.declare_queue(queue, passive=True)
            tag = await source.consume(inbox.put)
        except ChannelNotFoundEntity as e:
            raise QueueNotFound(
                f"cannot consume from queue {queue!r}: it does not exist at {self._where()}; "
                "declare the topology first"
            ) from e
        except _BROKER_ERRORS as e:
            raise BrokerUnavailable(
                f"cannot consume from queue {queue!r} at {self._where()}: {_describe(e)}"
            ) from e
        return source, tag

    async def _serve(
        self, source: AbstractQueue, tag: str, queue: str, handler: Handler, inbox: _Inbox
    ) -> None:
        """Hand deliveries to handler tasks until cancelled (graceful) or closed."""
        slots = asyncio.Semaphore(self.prefetch)
        cancelled: asyncio.CancelledError | None = None
        async with asyncio.TaskGroup() as handlers:
            try:
                await self._dispatch(queue, handler, inbox, slots, handlers)
            except asyncio.CancelledError as e:
                # Leaving the block normally makes the TaskGroup wait for in-flight handlers
                # instead of cancelling them: this is the graceful shutdown.
                cancelled = e
                await self._stop_consumer(source, tag, queue)
                await _requeue_waiting(inbox, queue)
        await _requeue_waiting(inbox, queue)  # deliveries that raced the basic.cancel
        log.info("consumer_stopped", queue=queue)
        if cancelled is not None:
            raise cancelled

    async def _dispatch(
        self,
        queue: str,
        handler: Handler,
        inbox: _Inbox,
        slots: asyncio.Semaphore,
        handlers: asyncio.TaskGroup,
    ) -> None:
        """Start a handler task per delivery, at most ``prefetch`` at once, until closed."""
        while True:
            await slots.acquire()
            try:
                message = await inbox.get()
            except BaseException:
                slots.release()
                raise
            if message is None:  # the transport was closed
                slots.release()
                return
            handlers.create_task(self._handle(queue, message, handler, slots))

    async def _stop_consumer(self, source: AbstractQueue, tag: str, queue: str) -> None:
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await source.cancel(tag)
        except (TimeoutError, *_BROKER_ERRORS) as e:
            # The channel is closed after the handlers finish, which cancels it anyway.
            log.warning("consumer_cancel_failed", queue=queue, error=_describe(e))

    async def _handle(
        self,
        queue: str,
        message: AbstractIncomingMessage,
        handler: Handler,
        slots: asyncio.Semaphore,
    ) -> None:
        try:
            if _stale(message):
                log.info("stale_delivery_skipped", queue=queue, delivery_tag=message.delivery_tag)
                return
            delivery = self._delivery(queue, message)
            verdict: Disposition | DeadLetter | None = self._refused(delivery) or self._poisoned(
                delivery
            )
            if verdict is None:
                await self._publisher_ready(queue)
                verdict = await self._run(handler, delivery)
            await self._settle(message, delivery, verdict)
        finally:
            slots.release()

    def _delivery(self, queue: str, message: AbstractIncomingMessage) -> Delivery:
        headers = dict(message.headers or {})
        ours = headers.get(names.HEADER_MESSAGE_ID)
        if isinstance(ours, bytes):
            ours = ours.decode(errors="replace")
        routing_key = message.routing_key or ""
        if self.ladder.destination(routing_key) == queue:
            routing_key = queue  # arrived through the delay ladder: report the plain address
        return Delivery(
            queue=queue,
            body=message.body,
            headers=headers,
            message_id=ours if isinstance(ours, str) else message.message_id,
            correlation_id=message.correlation_id,
            routing_key=routing_key,
            redelivered=bool(message.redelivered),
        )

    def _refused(self, delivery: Delivery) -> DeadLetter | None:
        """Park a body too large to read: untrusted input is bounded before it is parsed.

        Never from the parking queue itself: whoever reads parked messages gets them whole,
        and parking them again would go round in a circle.
        """
        size = len(delivery.body)
        if size <= self.max_body or delivery.queue == names.PARKED_QUEUE:
            return None
        log.warning(
            "oversize_message_parked",
            queue=delivery.queue,
            message_id=delivery.message_id,
            size=size,
        )
        return DeadLetter(
            f"the body is {size} bytes; the limit is {self.max_body} (SAGA_MAX_MESSAGE_BYTES)",
            label="oversize",
        )

    async def _publisher_ready(self, queue: str) -> None:
        """Wait until the publisher channel is open before a handler runs.

        After a reconnect aio-pika restores channels one by one, in no fixed order: a
        consumer channel restored first would hand over deliveries whose replies cannot be
        published yet, and each would be requeued at once, with no backoff.
        """
        publisher = self._publisher
        if publisher is None or not publisher.channel.is_closed:
            return
        try:
            async with asyncio.timeout(self.publish_timeout):
                await publisher.channel.ready()
        except TimeoutError:
            # Go on: the publish fails in its own way and the handler decides what to do.
            log.warning("publisher_not_ready", queue=queue, waited=self.publish_timeout)

    def _poisoned(self, delivery: Delivery) -> DeadLetter | None:
        count = delivery.headers.get("x-delivery-count")
        threshold = self.poison_threshold
        if threshold is None or not isinstance(count, int) or count < threshold:
            return None
        log.warning(
            "poison_message_parked",
            queue=delivery.queue,
            message_id=delivery.message_id,
            delivery_count=count,
        )
        return DeadLetter(
            f"poison message: redelivered {count} times without being acknowledged "
            f"(threshold {threshold})",
            label="poison",
        )

    async def _run(self, handler: Handler, delivery: Delivery) -> Disposition | DeadLetter:
        try:
            return await handler(delivery)
        except Exception:  # a handler bug must not stop the consumer: requeue the delivery
            log.exception(
                "handler_failed",
                queue=delivery.queue,
                message_id=delivery.message_id,
                redelivered=delivery.redelivered,
            )
            return Disposition.REQUEUE

    async def _settle(
        self,
        message: AbstractIncomingMessage,
        delivery: Delivery,
        verdict: Disposition | DeadLetter,
    ) -> None:
        if isinstance(verdict, DeadLetter):
            if await self._dead_letter(message, delivery, verdict.reason):
                self._count_parked(delivery.queue, verdict.label)
        elif verdict is Disposition.ACK:
            await _acknowledge(message, delivery.queue, requeue=None)
        else:
            await self._requeue(message, delivery)

    async def _requeue(self, message: AbstractIncomingMessage, delivery: Delivery) -> None:
        """Give a delivery back to its queue, after a backoff.

        Requeued at once, the delivery would come straight back (its prefetch slot is free
        again) and fail again, many times a second: every requeue counts toward the poison
        threshold, so a cause that lasts a second (a broker failover refusing replies) would
        park it as poison. Holding it also keeps its slot, so the broker sends no more meanwhile.
        """
        await self.clock.sleep(_requeue_backoff(delivery))
        await _acknowledge(message, delivery.queue, requeue=True)

    def _count_parked(self, queue: str, label: str | None) -> None:
        if label is None or self.on_dead_lettered is None:
            return
        try:
            self.on_dead_lettered(queue, label)
        except Exception:  # counting must never change how a message is settled
            log.exception("dead_letter_callback_failed", queue=queue, label=label)

    async def _dead_letter(
        self, message: AbstractIncomingMessage, delivery: Delivery, reason: str
    ) -> bool:
        """Park a copy in the dead-letter exchange, then ack; requeue if the copy failed.

        Returns whether the copy was parked.
        """
        headers = {
            key: value for key, value in (message.headers or {}).items() if not key.startswith("x-")
        }
        headers[names.HEADER_DEAD_LETTER_REASON] = reason[:_REASON_LIMIT]
        headers[names.HEADER_DEAD_LETTER_QUEUE] = delivery.queue
        copy = _Wire(
            message.body,
            _properties(
                headers=headers,
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                correlation_id=message.correlation_id,
                timestamp=message.timestamp,
                kind=message.type,
            ),
        )
        try:
            await self._send(
                names.DEAD_LETTER_EXCHANGE,
                "",
                copy,
                mandatory=True,
                what=delivery.message_id or "(no id)",
            )
        except PublishFailed as e:
            log.warning(
                "dead_letter_failed",
                queue=delivery.queue,
                message_id=delivery.message_id,
                error=str(e),
            )
            # Requeued after a backoff: parked as poison instead, it would carry the wrong reason.
            await self._requeue(message, delivery)
            return False
        log.debug("delivery_dead_lettered", queue=delivery.queue, message_id=delivery.message_id)
        await _acknowledge(message, delivery.queue, requeue=None)
        return True


# --- helpers ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Wire:
    """A message as it is published: body and AMQP properties."""

    body: bytes
    properties: aiormq.spec.Basic.Properties


def _properties(
    *,
    headers: dict[str, Any],
    content_type: str | None,
    correlation_id: str | None,
    timestamp: datetime | None,
    kind: str | None,
    content_encoding: str | None = None,
) -> aiormq.spec.Basic.Properties:
    """Persistent-message properties with a random AMQP ``message_id``.

    Built here rather than through ``aio_pika.Message``, whose checks and conversions cost
    a few percent of a busy daemon's CPU for values that are already of the right type. The
    id is random per attempt: aiormq matches returns to publishes by it.
    """
    return aiormq.spec.Basic.Properties(
        content_type=content_type,
        content_encoding=content_encoding,
        headers=headers,
        delivery_mode=DeliveryMode.PERSISTENT.value,
        priority=0,  # what aio-pika sends by default, kept so the wire does not change
        correlation_id=correlation_id or None,
        message_id=uuid.uuid4().hex,
        timestamp=timestamp,
        message_type=str(kind) if kind else None,
    )


def _requeue_backoff(delivery: Delivery) -> float:
    """How long to hold a delivery before requeueing it.

    Doubles with each redelivery RabbitMQ reports (quorum queues count them), from 0.1 s up to
    ``_REQUEUE_BACKOFF_CAP``: 13.1 s of holding before the tenth redelivery, where at once
    it took a fraction of a second, and a missing dead-letter exchange does not spin.
    """
    count = delivery.headers.get("x-delivery-count")
    attempts = count if isinstance(count, int) and count >= 0 else int(delivery.redelivered)
    return float(min(_REQUEUE_BACKOFF_CAP, 0.1 * 2 ** min(attempts, 10)))


def broker_url(url: str, heartbeat: int) -> URL:
    """The URL to connect to, with the heartbeat set unless the URL sets it.

    Raises:
        ConfigError: the URL is not an ``amqp://`` or ``amqps://`` URL with a host.
    """
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"the RabbitMQ URL {redact_url(url)!r} is malformed: {e}") from e
    if parsed.scheme not in ("amqp", "amqps") or not parsed.host:
        raise ConfigError(
            f"the RabbitMQ URL {redact_url(url)!r} is not valid: use "
            "amqp://user:password@host:5672/vhost (or amqps:// for TLS)"
        )
    if "heartbeat" in parsed.query:
        return parsed
    return parsed.update_query(heartbeat=heartbeat)


async def _acknowledge(
    message: AbstractIncomingMessage, queue: str, *, requeue: Literal[True] | None
) -> None:
    """Ack (``requeue=None``) or nack with requeue; a channel lost meanwhile is tolerated."""
    try:
        if requeue is None:
            await message.ack()
        else:
            await message.nack(requeue=True)
    except _BROKER_ERRORS as e:
        # Delivery tags belong to the channel that delivered: after a reconnect the old one
        # is gone, and the broker redelivers the message on the new one.
        log.warning(
            "delivery_settle_failed",
            queue=queue,
            action="ack" if requeue is None else "requeue",
            error=_describe(e),
        )


async def _requeue_waiting(inbox: _Inbox, queue: str) -> None:
    """Give back deliveries that were received but never handed to a handler."""
    while not inbox.empty():
        message = inbox.get_nowait()
        if message is not None and not _stale(message):
            await _acknowledge(message, queue, requeue=True)


async def _close_quietly(channel: AbstractChannel) -> None:
    """Close a channel, ignoring a connection that is already gone.

    A robust channel is closed even while its connection is down: that is what stops aio-pika
    from restoring it (and its consumers) after the reconnect.
    """
    if not channel.is_initialized:
        return
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await channel.close()
    except (TimeoutError, *_BROKER_ERRORS) as e:
        log.debug("channel_close_failed", error=_describe(e))
    except asyncio.CancelledError:
        # aiormq reports a channel whose connection closed meanwhile as cancelled.
        if _being_cancelled():
            raise
        log.debug("channel_close_failed", error="cancelled by its connection")


def _stale(message: AbstractIncomingMessage) -> bool:
    """Whether the channel that delivered ``message`` is closed (so it cannot be settled)."""
    try:
        return message.channel.is_closed
    except ChannelInvalidStateError:
        return True


def _connection_lost(error: RuntimeError) -> bool:
    """Whether aio-pika or aiormq raised ``error`` for a connection that is down."""
    text = str(error)
    return text == "Connection was not opened" or text.endswith(" closed")


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _reply_text(error: BaseException) -> str:
    """The broker's explanation inside an aiormq error."""
    for argument in error.args:
        if isinstance(argument, str) and argument:
            return re.sub(r"^[A-Z_]+ - ", "", argument)  # drop the "PRECONDITION_FAILED - " code
    return _describe(error)


def _describe(error: BaseException) -> str:
    """A one-line account of an I/O error (aiormq wraps OS errors as ``(errno, text)``)."""
    texts = [str(argument) for argument in error.args if isinstance(argument, str) and argument]
    if texts:
        return texts[-1]
    return type(error).__name__
