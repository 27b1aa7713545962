"""What both long-running processes share: the broker from settings, start-up and signals.

``saga orchestrator`` (:mod:`orchestrator.daemon`) and ``saga participant``
(:mod:`participants.daemon`) read their settings from the environment, log JSON, serve
``/metrics``, ``/healthz`` and ``/readyz``, and shut down gracefully on SIGTERM or SIGINT.

Start-up follows what an operator under systemd or Kubernetes expects:

* **A server that is down is waited for.** The broker and the stores are tried with exponential
  backoff (0.5 s doubling up to 30 s), one ``startup_waiting`` log line per failed attempt,
  ``/readyz`` answering 503 meanwhile, for ``SAGA_STARTUP_WAIT`` seconds (default: for ever,
  as an outage after start-up is ridden out). Exiting instead would turn a broker restart into
  a crash loop that systemd's start limit ends for good.
* **A mistake stops the process with one sentence** and a non-zero exit: a bad setting, a port
  taken, an app that does not import, credentials refused. Retrying those changes nothing.
* **Memory stores are refused next to a real broker** unless ``SAGA_ALLOW_MEMORY_STORE=1``:
  a second replica or a restart would not see what the first one kept, so sagas would be lost
  (their replies reach the replica that does not have them) and commands would run twice.
* **Probe ports do not collide on one host by default**: the orchestrator listens on 9400, a
  participant service on a free port it logs (``http_listening``); a fleet that scrapes them
  sets ``SAGA_HTTP_PORT`` per process, as the systemd units and manifests in ``deploy/`` do.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import importlib.util
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

import structlog

from plumbing.delays import DelayLadder
from plumbing.errors import BrokerUnavailable, ConfigError, SagaError, StoreUnavailable
from plumbing.http import ProbeServer
from plumbing.metrics import ProcessMetrics
from plumbing.rabbitmq import RabbitTransport
from plumbing.settings import SagaSettings
from plumbing.stores import StoreKind, store_kind

log = structlog.get_logger("daemon")

ORCHESTRATOR_PORT: Final = 9400
"""The orchestrator's probe port when ``SAGA_HTTP_PORT`` is unset."""
FIRST_BACKOFF: Final = 0.5
"""Seconds before the second start-up attempt; each later wait doubles, up to the cap."""
MAX_BACKOFF: Final = 30.0
"""The longest wait between two start-up attempts."""


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (``pip install 'saga-orchestrator[uvloop]'``),
    unless ``SAGA_EVENT_LOOP=asyncio``; None: the standard library's.

    Read from the environment directly: the loop is chosen before any setting is loaded.

    Raises:
        ConfigError: ``SAGA_EVENT_LOOP`` names another loop, or uvloop, which is missing.
    """
    wanted = os.environ.get("SAGA_EVENT_LOOP", "").strip().lower()
    if wanted not in ("", "uvloop", "asyncio"):
        raise ConfigError(
            f"SAGA_EVENT_LOOP is {wanted!r}; use uvloop or asyncio (or leave it unset: uvloop "
            "when installed)"
        )
    installed = importlib.util.find_spec("uvloop") is not None
    if wanted == "uvloop" and not installed:
        raise ConfigError(
            "SAGA_EVENT_LOOP=uvloop but uvloop is not installed; pip install "
            "'saga-orchestrator[uvloop]' or unset SAGA_EVENT_LOOP"
        )
    if wanted == "asyncio" or not installed:
        return None
    # Imported by name: an optional dependency, loaded only when it is installed and wanted.
    factory: Callable[[], asyncio.AbstractEventLoop] = importlib.import_module(
        "uvloop"
    ).new_event_loop
    return factory


YOUNG_COLLECTION_THRESHOLD: Final = 10_000
"""Net allocations of tracked objects between two young-generation collections (CPython's
default is 700)."""


def tune_garbage_collector() -> None:
    """Leave what start-up allocated out of every later garbage collection, and collect the
    young generation every :data:`YOUNG_COLLECTION_THRESHOLD` net allocations instead of 700.

    A full collection walks every object the collector tracks, and the event loop waits for
    it: start-up leaves tens of thousands of them that live as long as the process, and the
    bench measured the orchestrator's full collections pausing it for up to 59 ms (209 ms in
    all over a 1,000-saga run; 31 ms once frozen). Frozen objects are never walked again;
    what the daemon allocates afterwards is collected as before.

    A young collection walks what was allocated since the last one and is still alive. With
    100 sagas in flight that is the working set of their pending operations (coroutines,
    contexts, timeouts: 2,000-4,000 objects), whatever the threshold, so every collection
    cost the orchestrator about 1 ms of CPU and it ran one every 2.5 sagas: 0.85-0.94 ms of
    CPU per saga, 7% of the orchestrator's, and 13-24 pauses over 10 ms in a 1,000-saga run.
    At 10,000 most of what a message allocates is freed by reference counting before the
    count is reached: 5-7 young collections in the same run, 0.05-0.08 ms per saga. Only
    reference cycles wait longer to be freed, and the daemons hardly make any: the collector
    found 0-101 unreachable objects in a whole 1,000-saga run.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, old)


def rabbit_transport(
    settings: SagaSettings, metrics: ProcessMetrics | None = None
) -> RabbitTransport:
    """The RabbitMQ transport the settings describe, counting into ``metrics`` if given."""
    if not settings.amqp_url:
        raise ConfigError(
            "SAGA_AMQP_URL is not set; give the RabbitMQ URL, e.g. "
            "amqp://guest:guest@localhost:5672/ (or the comma-separated URLs of a cluster's nodes)"
        )
    return RabbitTransport(
        settings.amqp_url,
        prefetch=settings.prefetch,
        heartbeat=settings.heartbeat,
        publish_timeout=settings.publish_timeout,
        ladder=DelayLadder(levels=settings.delay_levels, queue_type=settings.queue_type),
        # Park a poison message ourselves, with a reason, before the broker's limit drops it.
        poison_threshold=max(1, min(10, settings.delivery_limit - 1)),
        on_publish_failure=(
            None
            if metrics is None
            else lambda reason: metrics.publish_failures.labels(reason).inc()
        ),
        # Counted once parked (a parking that fails is retried): messages, not attempts.
        on_dead_lettered=(
            None
            if metrics is None
            else lambda queue, label: metrics.dead_lettered.labels(queue, label).inc()
        ),
        max_body=settings.max_message_bytes,
    )


def on_signals(stop: Callable[[], None]) -> None:
    """Call ``stop`` on SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)


async def until_set_or_done(event: asyncio.Event, task: asyncio.Task[None]) -> None:
    """Wait until ``event`` is set or ``task`` ends, whichever comes first."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


def refuse_memory_store(settings: SagaSettings, variable: str, url: str, loss: str) -> None:
    """Refuse ``memory://`` in ``variable`` unless the settings allow it explicitly.

    ``loss`` says what goes wrong, completing "a restart or a second replica ...".

    Raises:
        ConfigError: the URL names the memory store and ``SAGA_ALLOW_MEMORY_STORE`` is off.
    """
    if settings.allow_memory_store or store_kind(url, variable) is not StoreKind.MEMORY:
        return
    raise ConfigError(
        f"{variable} is memory:// while the broker is shared: a restart or a second replica "
        f"{loss}; set {variable} to a postgresql:// or mongodb:// URL (or "
        "SAGA_ALLOW_MEMORY_STORE=1 for a single throwaway process)"
    )


async def start_probes(probes: ProbeServer) -> None:
    """Start serving the probes; a port that cannot be had is one sentence naming the setting.

    Raises:
        ConfigError: the address is taken, not ours, or not allowed.
    """
    try:
        await probes.start()
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(
            f"cannot serve /metrics, /healthz and /readyz on {probes.host}:{probes.port} "
            f"({reason}); set SAGA_HTTP_PORT to a free port (each process on a host needs its "
            "own), or to 0 to turn the endpoint off"
        ) from e


async def wait_until_reachable(
    what: str,
    attempt: Callable[[], Awaitable[None]],
    *,
    give_up_after: float,
    stopping: asyncio.Event,
) -> bool:
    """Call ``attempt`` until the server it needs answers; False if stopped meanwhile.

    Only :class:`BrokerUnavailable` and :class:`StoreUnavailable` are waited out: any other
    error (credentials refused, a bad URL) is a mistake that retrying does not fix, and is
    raised at once. Each attempt is bounded by the connect timeout of the client it uses, so a
    SIGTERM is honoured within one attempt.

    Args:
        what: names the server in log lines ("the saga store", "RabbitMQ").
        give_up_after: seconds after which the last error is raised; ``inf`` waits for ever.
        stopping: set on SIGTERM or SIGINT; the wait ends without an error.

    Raises:
        BrokerUnavailable | StoreUnavailable: still unreachable after ``give_up_after``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + give_up_after
    delay = FIRST_BACKOFF
    failures = 0
    while not stopping.is_set():
        try:
            await attempt()
        except (BrokerUnavailable, StoreUnavailable) as e:
            failures += 1
            if loop.time() + delay > deadline:
                raise type(e)(
                    f"{e}; gave up after {failures} attempt(s) (SAGA_STARTUP_WAIT="
                    f"{give_up_after:g})"
                ) from e
            log.warning(
                "startup_waiting", waiting_for=what, attempt=failures, error=str(e), retry_in=delay
            )
            if await _set_within(stopping, delay):
                break
            delay = min(delay * 2, MAX_BACKOFF)
            continue
        if failures:
            log.info("startup_reached", reached=what, attempts=failures + 1)
        return True
    log.info("startup_abandoned", waiting_for=what, attempts=failures)
    return False


async def _set_within(event: asyncio.Event, seconds: float) -> bool:
    """Whether ``event`` is set within ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True


@contextlib.contextmanager
def first_saga_error() -> Iterator[None]:
    """Raise a task group's failure as its first :class:`SagaError` when all of it is one.

    A consumer or loop that fails for a reason the operator can act on (the broker went away
    for good, a queue was deleted) then ends the daemon with that one sentence instead of an
    ``ExceptionGroup`` traceback. Anything else, a bug above all, propagates unchanged.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        matched, rest = group.split(SagaError)
        if matched is None or rest is not None:
            raise
        leaf: BaseException = matched
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        raise leaf from group
