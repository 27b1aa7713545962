"""The delay ladder: every delay is routed through levels that add up to it, never less."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts import names
from plumbing.delays import DEFAULT_LEVELS, MAX_LEVELS, DelayLadder
from plumbing.errors import ConfigError
from plumbing.topology import QueueType, Topology

LADDER = DelayLadder()
THIRTY_DAYS = 30 * 24 * 3600
instants = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)


def topic_match(pattern: list[str], words: list[str]) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` zero or more."""
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(topic_match(rest, words[skip:]) for skip in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and topic_match(rest, words[1:])


def routed_queues(topology: Topology, exchange: str, key: str) -> set[str]:
    """The queues a message published to ``exchange`` with ``key`` reaches."""
    queues: set[str] = set()
    for binding in topology.bindings:
        if binding.source != exchange:
            continue
        if not topic_match(binding.routing_key.split("."), key.split(".")):
            continue
        if binding.to_exchange:
            queues |= routed_queues(topology, binding.destination, key)
        else:
            queues.add(binding.destination)
    return queues


def travel(ladder: DelayLadder, delay: int, destination: str) -> tuple[int, list[str]]:
    """Follow a delayed message through the declared topology as RabbitMQ would.

    Returns the seconds it waited and the queues it passed through.
    """
    topology = ladder.topology([destination, names.TIMERS_QUEUE])
    arguments = {queue.name: queue.arguments for queue in topology.queues}
    route = ladder.route(delay, destination)
    exchange, waited, visited = route.exchange, 0, []
    for _ in range(ladder.levels + 1):
        queues = routed_queues(topology, exchange, route.routing_key)
        assert len(queues) == 1, f"{route.routing_key} at {exchange} reached {queues}"
        (queue,) = queues
        visited.append(queue)
        if queue == destination:
            return waited, visited
        waited += arguments[queue]["x-message-ttl"] // 1000
        exchange = arguments[queue]["x-dead-letter-exchange"]
    raise AssertionError(f"{route.routing_key} never reached {destination}: {visited}")


ladders = st.builds(DelayLadder, levels=st.integers(min_value=1, max_value=MAX_LEVELS))


@given(ladder=ladders, data=st.data())
def test_every_delay_waits_exactly_its_length_and_reaches_its_queue(
    ladder: DelayLadder, data: st.DataObject
) -> None:
    delay = data.draw(st.integers(min_value=1, max_value=ladder.max_delay))
    waited, visited = travel(ladder, delay, "saga.billing.commands")
    assert waited == delay
    assert visited[:-1] == [ladder.level_name(level) for level in ladder.hops(delay)]
    assert sum(1 << level for level in ladder.hops(delay)) == delay


@given(delay=st.integers(min_value=1, max_value=LADDER.max_delay))
def test_the_routing_key_is_the_delays_bits_then_the_queue(delay: int) -> None:
    route = LADDER.route(delay, names.TIMERS_QUEUE)
    assert re.fullmatch(rf"([01]\.){{{DEFAULT_LEVELS}}}saga\.timers", route.routing_key)
    assert int(route.routing_key[: 2 * DEFAULT_LEVELS - 1].replace(".", ""), 2) == delay
    assert route.exchange == f"saga.delay.{delay.bit_length() - 1}"
    assert route.delay == delay
    assert LADDER.destination(route.routing_key) == names.TIMERS_QUEUE
    assert len(route.routing_key) <= 255


@given(
    now=instants,
    ahead=st.timedeltas(min_value=timedelta(microseconds=1), max_value=timedelta(days=30)),
)
def test_a_future_deliver_at_is_never_early(now: datetime, ahead: timedelta) -> None:
    delay = LADDER.delay_for(now + ahead, now)
    assert timedelta(seconds=delay) >= ahead
    assert timedelta(seconds=delay) - ahead < timedelta(seconds=1)


@given(
    now=instants,
    behind=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=3650)),
)
def test_a_deliver_at_now_or_in_the_past_is_due_now(now: datetime, behind: timedelta) -> None:
    assert LADDER.delay_for(now - behind, now) == 0


@given(beyond=st.timedeltas(min_value=timedelta(seconds=1), max_value=timedelta(days=36500)))
def test_a_delay_beyond_the_ladder_is_cut_to_its_maximum(beyond: timedelta) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    deliver_at = now + timedelta(seconds=LADDER.max_delay) + beyond
    assert LADDER.delay_for(deliver_at, now) == LADDER.max_delay


def test_the_default_ladder_covers_thirty_days() -> None:
    assert LADDER.levels == 22
    assert LADDER.max_delay == 2**22 - 1
    assert LADDER.max_delay >= THIRTY_DAYS
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert LADDER.delay_for(start + timedelta(days=30), start) == THIRTY_DAYS


def test_quorum_levels_dead_letter_at_least_once_with_a_bound_and_no_expiry() -> None:
    topology = LADDER.topology([names.TIMERS_QUEUE])
    levels = [queue for queue in topology.queues if queue.name.startswith("saga.delay.")]
    assert len(levels) == DEFAULT_LEVELS
    for queue in levels:
        level = int(queue.name.rsplit(".", 1)[1])
        next_hop = f"saga.delay.{level - 1}" if level else names.DELAY_DELIVER_EXCHANGE
        assert queue.arguments == {
            "x-queue-type": "quorum",
            "x-message-ttl": 2**level * 1000,
            "x-dead-letter-exchange": next_hop,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-max-length": 1_000_000,
        }


def test_classic_levels_have_no_dead_letter_strategy() -> None:
    ladder = DelayLadder(levels=3, queue_type=QueueType.CLASSIC, max_length=500)
    for queue in ladder.topology([names.TIMERS_QUEUE]).queues:
        assert queue.arguments["x-queue-type"] == "classic"
        assert queue.arguments["x-max-length"] == 500
        assert "x-dead-letter-strategy" not in queue.arguments
        assert "x-expires" not in queue.arguments


def test_the_topology_binds_each_destination_once_at_the_deliver_exchange() -> None:
    topology = DelayLadder(levels=2).topology(["saga.timers", "saga.other", "saga.timers"])
    delivers = [b for b in topology.bindings if b.source == names.DELAY_DELIVER_EXCHANGE]
    assert [(b.destination, b.routing_key) for b in delivers] == [
        ("saga.other", "#.saga.other"),
        ("saga.timers", "#.saga.timers"),
    ]
    described = topology.describe()
    assert {"name": "saga.delay.deliver", "type": "topic"} in described["exchanges"]
    assert {
        "source": "saga.delay.1",
        "destination": "saga.delay.0",
        "destination_type": "exchange",
        "routing_key": "0.#",
    } in described["bindings"]


def test_destination_reads_only_ladder_keys() -> None:
    ladder = DelayLadder(levels=3)
    assert ladder.destination("0.1.1.saga.timers") == "saga.timers"
    assert ladder.destination("saga.timers") is None
    assert ladder.destination("0.1.saga.timers") is None
    assert ladder.destination("0.1.1") is None


@pytest.mark.parametrize("levels", [0, MAX_LEVELS + 1])
def test_a_level_count_out_of_range_is_a_config_error(levels: int) -> None:
    with pytest.raises(ConfigError, match="between 1 and 28 levels"):
        DelayLadder(levels=levels)


@pytest.mark.parametrize("queue", ["", "saga.*", "saga.#"])
def test_a_destination_with_wildcards_is_refused(queue: str) -> None:
    with pytest.raises(ConfigError, match="cannot receive delayed messages"):
        LADDER.topology([queue])


def test_destinations_where_one_name_ends_another_are_refused() -> None:
    with pytest.raises(ConfigError, match="clash"):
        LADDER.topology(["saga.timers", "billing.saga.timers"])


def test_a_routing_key_longer_than_amqp_allows_is_refused() -> None:
    with pytest.raises(ConfigError, match="too long"):
        LADDER.route(5, "q" * 250)
    with pytest.raises(ConfigError, match="at most 211 bytes"):
        LADDER.topology(["q" * 212])
    assert LADDER.route(5, "q" * 211).routing_key.endswith("q" * 211)


@pytest.mark.parametrize("delay", [0, -1, 2**22])
def test_route_refuses_a_delay_outside_the_ladder(delay: int) -> None:
    with pytest.raises(ValueError, match="a delay must be between"):
        LADDER.route(delay, names.TIMERS_QUEUE)
