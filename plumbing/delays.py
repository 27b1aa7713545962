"""Delayed delivery on a plain RabbitMQ: the binary delay ladder (no plugin).

A delay of ``d`` whole seconds is written in binary. Level ``L`` of the ladder is a topic
exchange and a queue, both named ``saga.delay.<L>``; the queue holds every message for exactly
``2^L`` seconds (a per-queue TTL, so expiry order is arrival order and a long delay never
blocks a short one) and then dead-letters it to the exchange of level ``L-1``; level 0
dead-letters to ``saga.delay.deliver``. A message visits the queue of every level whose bit
is 1 and skips, through an exchange-to-exchange binding, every level whose bit is 0, so it
waits ``sum(2^L for set bits) == d`` seconds in total. The design is NServiceBus's "native
delayed delivery"; Kombu/Celery use the same layout.

The routing key carries the plan: the delay's bits, most significant first, as dot-separated
words, then the destination queue name::

    delay 5 s to saga.timers, 4 levels:   0.1.0.1.saga.timers
    enters level 2 (the highest set bit) -> waits 4 s -> level 1 exchange: bit 0, passes on
    -> level 0 queue: waits 1 s -> saga.delay.deliver -> binding "#.saga.timers" -> saga.timers

Guarantees and limits:

* Never early: the delay is the number of seconds until ``deliver_at`` rounded *up*, counted
  from before the publish. Lateness is the sum of the per-hop dead-letter latencies.
* A ``deliver_at`` in the past is published straight to its destination.
* Beyond the ladder's maximum (``2^levels - 1`` s, about 48 days with the default 22 levels)
  the delay is cut to the maximum: the message arrives early, which is harmless because the
  saga's stored due time is the truth and the core re-arms an early timer.
* Quorum level queues (the default) dead-letter *at least once*
  (``x-dead-letter-strategy=at-least-once``, which needs ``x-overflow=reject-publish``, and an
  explicit ``x-max-length`` so a stuck hop cannot grow without bound): a timer is never lost in
  the ladder but may arrive twice; a duplicate timer is stale and changes nothing. Classic
  level queues dead-letter *at most once*: a broker crash or a full target can lose a timer,
  and the periodic sweep over the store's due times fires that saga anyway.
* No ``x-expires`` on level queues: a queue TTL can delete delayed messages with the queue.
* Changing the number of levels changes the routing-key format: let the ladder drain first
  (or rely on the sweep for the timers in flight), and delete the old level queues by hand.
* Never re-publish a message taken from the ladder with its ``x-death`` headers: RabbitMQ
  3.10-3.12 sees the levels already listed there as a dead-letter cycle and silently drops the
  message (Celery issue 9867). The transport strips every ``x-`` header it is asked to send.

Everything here is pure: :meth:`DelayLadder.topology` describes the exchanges, queues and
bindings as data (``saga topology`` prints them) and :meth:`DelayLadder.route` says where one
message goes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from contracts import names
from plumbing.errors import ConfigError
from plumbing.topology import BindingSpec, ExchangeSpec, QueueSpec, QueueType, Topology

DEFAULT_LEVELS: Final = 22
"""Delays up to 2^22 - 1 s (48.5 days), comfortably more than 30 days."""

MAX_LEVELS: Final = 28
"""The most levels supported (about 8.5 years, as NServiceBus)."""

DEFAULT_MAX_LENGTH: Final = 1_000_000
"""Messages one level queue may hold before publishes to it are refused (nacked)."""

_ROUTING_KEY_LIMIT: Final = 255  # AMQP shortstr: the longest routing key the broker accepts
_MICROSECOND: Final = timedelta(microseconds=1)
_WILDCARDS: Final = frozenset("*#")


@dataclass(frozen=True)
class DelayRoute:
    """Where to publish one delayed message: the first level's exchange and the routing key."""

    delay: int
    """Seconds the message will wait, at least 1."""
    exchange: str
    routing_key: str


@dataclass(frozen=True)
class DelayLadder:
    """The binary delay ladder: ``levels`` TTL queues of 2^0 .. 2^(levels-1) seconds.

    Args:
        levels: how many levels; the longest delay is ``2^levels - 1`` seconds.
        queue_type: quorum (at-least-once dead-lettering, the default) or classic (at most
            once; the store sweep repairs a lost timer).
        max_length: how many messages one level queue may hold; past it, publishes into the
            ladder are nacked and the outbox retries them.
    """

    levels: int = DEFAULT_LEVELS
    queue_type: QueueType = QueueType.QUORUM
    max_length: int = DEFAULT_MAX_LENGTH

    def __post_init__(self) -> None:
        if not 1 <= self.levels <= MAX_LEVELS:
            raise ConfigError(
                f"the delay ladder needs between 1 and {MAX_LEVELS} levels, not {self.levels}"
            )
        if self.max_length < 1:
            raise ConfigError(
                f"a delay level queue must hold at least one message, not {self.max_length}"
            )

    @property
    def max_delay(self) -> int:
        """The longest delay in seconds; longer ones are cut to it."""
        return (1 << self.levels) - 1

    def level_name(self, level: int) -> str:
        """The name of level ``level``'s exchange and queue."""
        return f"{names.DELAY_EXCHANGE_PREFIX}.{level}"

    def _next_hop(self, level: int) -> str:
        """Where level ``level`` passes messages on: the level below, or the deliver exchange."""
        return self.level_name(level - 1) if level > 0 else names.DELAY_DELIVER_EXCHANGE

    def delay_for(self, deliver_at: datetime, now: datetime) -> int:
        """Whole seconds to wait so the message is not delivered before ``deliver_at``.

        0 means due now (``deliver_at`` is not in the future); the result never exceeds
        :attr:`max_delay`.
        """
        microseconds = (deliver_at - now) // _MICROSECOND
        if microseconds <= 0:
            return 0
        seconds = -(-microseconds // 1_000_000)  # ceiling: a timer may be late, never early
        return min(seconds, self.max_delay)

    def routing_key(self, delay: int, queue: str) -> str:
        """The delay's bits (most significant first) as words, then the destination queue."""
        self._check_delay(delay)
        _check_destination(queue)
        bits = format(delay, f"0{self.levels}b")
        key = ".".join((*bits, queue))
        if len(key.encode()) > _ROUTING_KEY_LIMIT:
            raise ConfigError(
                f"queue name {queue!r} is too long for a delayed routing key: with "
                f"{self.levels} levels it may have at most "
                f"{_ROUTING_KEY_LIMIT - 2 * self.levels} bytes"
            )
        return key

    def route(self, delay: int, queue: str) -> DelayRoute:
        """Where a message for ``queue`` delayed by ``delay`` seconds is published.

        It enters at the level of the delay's highest set bit: the levels above would only
        pass it down.
        """
        key = self.routing_key(delay, queue)
        return DelayRoute(delay, self.level_name(delay.bit_length() - 1), key)

    def hops(self, delay: int) -> tuple[int, ...]:
        """The levels whose queue a message delayed by ``delay`` seconds waits in, in order."""
        self._check_delay(delay)
        return tuple(level for level in reversed(range(self.levels)) if delay >> level & 1)

    def destination(self, routing_key: str) -> str | None:
        """The destination queue named by a ladder routing key, or None for any other key."""
        words = routing_key.split(".", self.levels)
        if len(words) <= self.levels or any(word not in ("0", "1") for word in words[:-1]):
            return None
        return words[-1]

    def queue_arguments(self, level: int) -> dict[str, Any]:
        """The arguments of level ``level``'s queue."""
        arguments: dict[str, Any] = {
            "x-queue-type": self.queue_type.value,
            "x-message-ttl": (1 << level) * 1000,
            "x-dead-letter-exchange": self._next_hop(level),
            "x-overflow": "reject-publish",
            "x-max-length": self.max_length,
        }
        if self.queue_type is QueueType.QUORUM:
            arguments["x-dead-letter-strategy"] = "at-least-once"
        return arguments

    def topology(self, destinations: Iterable[str]) -> Topology:
        """The ladder's exchanges, queues and bindings, delivering to ``destinations``.

        Raises:
            ConfigError: a destination name cannot be routed unambiguously.
        """
        targets = sorted(set(destinations))
        for queue in targets:
            self.routing_key(self.max_delay, queue)  # refuses names no routing key can carry
        _check_no_suffixes(targets)
        exchanges = [ExchangeSpec(names.DELAY_DELIVER_EXCHANGE, "topic")]
        queues = []
        bindings = []
        for level in reversed(range(self.levels)):
            name = self.level_name(level)
            exchanges.append(ExchangeSpec(name, "topic"))
            queues.append(QueueSpec(name, self.queue_arguments(level)))
            bindings.append(BindingSpec(name, name, self._bit_pattern(level, "1")))
            bindings.append(
                BindingSpec(name, self._next_hop(level), self._bit_pattern(level, "0"), True)
            )
        bindings.extend(
            BindingSpec(names.DELAY_DELIVER_EXCHANGE, queue, f"#.{queue}") for queue in targets
        )
        return Topology(tuple(exchanges), tuple(queues), tuple(bindings))

    def _bit_pattern(self, level: int, bit: str) -> str:
        """A topic pattern matching keys whose bit for ``level`` is ``bit``."""
        return ".".join(["*"] * (self.levels - 1 - level) + [bit, "#"])

    def _check_delay(self, delay: int) -> None:
        if not 1 <= delay <= self.max_delay:
            raise ValueError(f"a delay must be between 1 and {self.max_delay} s, not {delay}")


def _check_destination(queue: str) -> None:
    if not queue or _WILDCARDS & set(queue):
        raise ConfigError(
            f"{queue!r} cannot receive delayed messages: a destination queue name must be "
            "non-empty and must not contain the topic wildcards '*' or '#'"
        )


def _check_no_suffixes(queues: list[str]) -> None:
    """Refuse destinations where one name ends with '.' + another: "#.b" would match both."""
    for queue in queues:
        for other in queues:
            if queue != other and queue.endswith("." + other):
                raise ConfigError(
                    f"delayed destinations {other!r} and {queue!r} clash: the deliver binding "
                    f"'#.{other}' would also route messages meant for {queue!r}; rename one"
                )
