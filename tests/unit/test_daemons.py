"""The start-up rules both daemons share (:mod:`plumbing.daemons`), without a server."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from plumbing.daemons import (
    YOUNG_COLLECTION_THRESHOLD,
    event_loop_factory,
    first_saga_error,
    refuse_memory_store,
    tune_garbage_collector,
    wait_until_reachable,
)
from plumbing.errors import BrokerUnavailable, ConfigError, StoreUnavailable
from plumbing.settings import SagaSettings, load_settings


class Flaky:
    """An attempt that fails with ``error`` ``failures`` times, then succeeds."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error


async def test_a_server_that_comes_up_is_waited_for_with_backoff_and_a_line_per_attempt() -> None:
    attempt = Flaky(2, BrokerUnavailable("cannot connect to RabbitMQ at amqp://x/: refused"))
    with capture_logs() as logs:
        reached = await wait_until_reachable(
            "RabbitMQ", attempt, give_up_after=float("inf"), stopping=asyncio.Event()
        )
    assert reached
    assert attempt.calls == 3
    waiting = [entry for entry in logs if entry["event"] == "startup_waiting"]
    assert [(w["attempt"], w["retry_in"]) for w in waiting] == [(1, 0.5), (2, 1.0)]
    assert waiting[0]["error"] == "cannot connect to RabbitMQ at amqp://x/: refused"


async def test_giving_up_raises_the_last_error_saying_so() -> None:
    attempt = Flaky(5, StoreUnavailable("PostgreSQL at postgresql://db/saga is unavailable"))
    with pytest.raises(StoreUnavailable) as raised:
        await wait_until_reachable(
            "the saga store", attempt, give_up_after=0, stopping=asyncio.Event()
        )
    assert attempt.calls == 1
    assert str(raised.value) == (
        "PostgreSQL at postgresql://db/saga is unavailable; gave up after 1 attempt(s) "
        "(SAGA_STARTUP_WAIT=0)"
    )


async def test_a_mistake_is_not_waited_out() -> None:
    attempt = Flaky(5, ConfigError("RabbitMQ refused the login"))
    with pytest.raises(ConfigError):
        await wait_until_reachable(
            "RabbitMQ", attempt, give_up_after=float("inf"), stopping=asyncio.Event()
        )
    assert attempt.calls == 1


async def test_a_stop_ends_the_wait_without_an_error() -> None:
    stopping = asyncio.Event()
    attempts = 0

    async def attempt() -> None:
        nonlocal attempts
        attempts += 1
        stopping.set()  # SIGTERM arrives during the first attempt
        raise BrokerUnavailable("down")

    reached = await wait_until_reachable(
        "RabbitMQ", attempt, give_up_after=float("inf"), stopping=stopping
    )
    assert not reached
    assert attempts == 1


def test_first_saga_error_unwraps_a_group_of_saga_errors() -> None:
    cause = BrokerUnavailable("the connection to RabbitMQ is closed")
    group = ExceptionGroup("consumers", [ExceptionGroup("inner", [cause]), StoreUnavailable("x")])
    with pytest.raises(BrokerUnavailable) as raised, first_saga_error():
        raise group
    assert raised.value is cause
    assert raised.value.__cause__ is group


def test_first_saga_error_leaves_a_bug_in_its_group() -> None:
    group = ExceptionGroup("consumers", [BrokerUnavailable("down"), KeyError("bug")])
    with pytest.raises(ExceptionGroup) as raised, first_saga_error():
        raise group
    assert raised.value is group


@pytest.mark.parametrize(
    ("url", "allowed", "refused"),
    [
        ("memory://", False, True),
        ("MEMORY://", False, True),
        ("memory://", True, False),
        ("postgresql://db/saga", False, False),
        ("mongodb://db/saga", False, False),
    ],
)
def test_memory_stores_are_refused_unless_allowed(url: str, allowed: bool, refused: bool) -> None:
    settings = load_settings(SagaSettings, allow_memory_store=allowed)
    if not refused:
        refuse_memory_store(settings, "SAGA_STORE_URL", url, "would lose sagas")
        return
    with pytest.raises(ConfigError) as raised:
        refuse_memory_store(settings, "SAGA_STORE_URL", url, "would lose sagas")
    assert str(raised.value) == (
        "SAGA_STORE_URL is memory:// while the broker is shared: a restart or a second replica "
        "would lose sagas; set SAGA_STORE_URL to a postgresql:// or mongodb:// URL (or "
        "SAGA_ALLOW_MEMORY_STORE=1 for a single throwaway process)"
    )


def test_start_up_settings_default_to_waiting_and_a_port_per_daemon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SAGA_HTTP_PORT", "")  # empty, as systemd's Environment=SAGA_HTTP_PORT=
    monkeypatch.delenv("SAGA_STARTUP_WAIT", raising=False)
    monkeypatch.delenv("SAGA_ALLOW_MEMORY_STORE", raising=False)
    settings = load_settings(SagaSettings)
    assert settings.http_port is None
    assert settings.startup_wait == float("inf")
    assert settings.allow_memory_store is False
    monkeypatch.setenv("SAGA_STARTUP_WAIT", "-1")
    with pytest.raises(ConfigError, match="SAGA_STARTUP_WAIT is invalid"):
        load_settings(SagaSettings)


def test_uvloop_runs_the_daemons_when_installed_unless_turned_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uvloop = pytest.importorskip("uvloop")
    monkeypatch.delenv("SAGA_EVENT_LOOP", raising=False)
    assert event_loop_factory() is uvloop.new_event_loop
    monkeypatch.setenv("SAGA_EVENT_LOOP", "uvloop")
    assert event_loop_factory() is uvloop.new_event_loop
    monkeypatch.setenv("SAGA_EVENT_LOOP", "asyncio")
    assert event_loop_factory() is None


def test_an_unknown_event_loop_is_refused_with_a_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGA_EVENT_LOOP", "trio")
    with pytest.raises(ConfigError, match="use uvloop or asyncio"):
        event_loop_factory()


class _Cycle:
    """An object in a reference cycle: only the garbage collector ever frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def collector_thresholds() -> Iterator[tuple[int, int, int]]:
    """The collector's thresholds before the test; they are put back, and what the test froze
    is unfrozen, afterwards."""
    thresholds = gc.get_threshold()
    try:
        yield thresholds
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("collector_thresholds")
def test_what_start_up_allocated_is_left_out_of_later_collections() -> None:
    kept = _Cycle()
    frozen_before = gc.get_freeze_count()
    tune_garbage_collector()
    assert gc.get_freeze_count() > frozen_before
    assert not gc.is_tracked(kept) or all(o is not kept for o in gc.get_objects())
    made_after = _Cycle()
    assert any(o is made_after for o in gc.get_objects())


def test_the_young_generation_is_collected_less_often_and_cycles_are_still_freed(
    collector_thresholds: tuple[int, int, int],
) -> None:
    tune_garbage_collector()
    assert gc.get_threshold() == (YOUNG_COLLECTION_THRESHOLD, *collector_thresholds[1:])
    assert collector_thresholds[0] < YOUNG_COLLECTION_THRESHOLD

    # Cycles made after start-up are found by the next young collection, as before.
    cycle = weakref.ref(_Cycle())
    assert cycle() is not None
    gc.collect(0)
    assert cycle() is None
