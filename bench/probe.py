"""Run a ``saga`` daemon with its AMQP publishes counted: ``python -m bench.probe ARGS``.

``ARGS`` are those of ``python -m orchestrator.cli`` (``orchestrator --app ...`` or
``participant --app ...``): the daemon runs unchanged. Before it starts, aiormq's
``Channel.basic_publish`` is wrapped to count each publish by exchange name, and a thread writes
the counts as JSON to ``$BENCH_PROBE_FILE`` twice a second (and at exit). Counting costs a
dictionary update per publish; nothing else in the daemon changes. The orchestrator's rounds of
confirms (``OutboxPublisher._send``: a transition's messages published, then their confirms
awaited together) are counted too, under ``confirm waits``.

Without a management plugin the broker keeps no per-exchange publish counters, and the
project's metrics count failed publishes only, so this is how the harness measures publishes
per step (by destination: commands, replies, timers into the delay ladder, lifecycle events).

The garbage collector's runs and pauses are counted by generation (``gc 2 runs``, ...).

With ``$BENCH_STAGES`` set, the orchestrator's stages are timed too (wall time, what the event
loop's other work adds included): handling a reply, the saga store's ``load`` and ``save``
(the save's wait for a batch included), one batched write of the store, and publishing a
transition's messages with their confirms. On each ``SIGUSR1`` their times since the last one
go to ``$BENCH_PROBE_FILE`` with ``.stages.json`` added (so a run can leave its warm-up
out).

With ``$BENCH_TRACEMALLOC`` set to a path, the daemon also traces its allocations, and each
``SIGUSR2`` writes the biggest live allocation sites to ``PATH.N.txt`` (what the RSS phase
uses to show where memory per saga in flight goes).
"""

from __future__ import annotations

import atexit
import functools
import gc
import json
import os
import signal
import sys
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

_COUNTS: dict[str, int] = {}
_INTERVAL = 0.5
CONFIRM_WAITS = "confirm waits"
"""The key of the orchestrator's publish rounds: each publishes a transition's messages and
awaits their confirms together."""
GC_PREFIX = "gc "
STATEMENT_PREFIX = "pg "


def _count(key: str, by: int = 1) -> None:
    _COUNTS[key] = _COUNTS.get(key, 0) + by


def is_exchange(key: str) -> bool:
    """Whether a count is of publishes to an exchange (not statements, rounds or collections)."""
    return not key.startswith((GC_PREFIX, STATEMENT_PREFIX)) and key != CONFIRM_WAITS


def install() -> None:
    """Wrap ``aiormq.channel.Channel.basic_publish`` (what every publish goes through, aio-pika's
    and the transport's own) to count publishes by exchange name."""
    from aiormq.channel import Channel

    original: Callable[..., Awaitable[Any]] = Channel.basic_publish

    @functools.wraps(original)
    async def counted(self: Channel, *args: Any, **kwargs: Any) -> Any:
        _count(kwargs.get("exchange", ""))
        return await original(self, *args, **kwargs)

    Channel.basic_publish = counted  # type: ignore[method-assign]

    from asyncpg.connection import Connection

    for name in ("execute", "executemany", "fetch", "fetchmany", "fetchrow", "fetchval"):
        setattr(Connection, name, _counting_statements(getattr(Connection, name)))

    from orchestrator.outbox import OutboxPublisher

    send = OutboxPublisher._send

    @functools.wraps(send)
    async def waited(self: OutboxPublisher, saga_id: str, entries: list[Any]) -> int:
        if entries:
            _count(CONFIRM_WAITS)
        return await send(self, saga_id, entries)

    OutboxPublisher._send = waited  # type: ignore[method-assign]


def time_collections() -> None:
    """Count the garbage collector's runs and their pauses by generation: ``gc N runs``,
    ``gc N us`` (total microseconds of wall time: the pause the event loop sees, preemption
    included), ``gc N cpu us`` (of the thread's CPU time), ``gc N over 10 ms`` (pauses longer
    than that) and ``gc N freed`` (unreachable objects it found: reference cycles)."""
    started = 0.0
    started_cpu = 0

    def callback(phase: str, info: dict[str, int]) -> None:
        nonlocal started, started_cpu
        if phase == "start":
            started = time.perf_counter()
            started_cpu = time.thread_time_ns()
            return
        generation = info["generation"]
        pause = int((time.perf_counter() - started) * 1e6)
        prefix = f"{GC_PREFIX}{generation}"
        _count(f"{prefix} runs")
        _count(f"{prefix} us", pause)
        _count(f"{prefix} cpu us", (time.thread_time_ns() - started_cpu) // 1000)
        _count(f"{prefix} over 10 ms", pause > 10_000)
        _count(f"{prefix} freed", info["collected"])

    gc.callbacks.append(callback)


def _counting_statements(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """Wrap an asyncpg call to count it as ``pg <first word of the statement>``."""

    @functools.wraps(original)
    async def counted(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        verb = query.split(None, 1)[0].upper() if query.strip() else "?"
        _count(f"{STATEMENT_PREFIX}{verb}")
        return await original(self, query, *args, **kwargs)

    return counted


_STAGES: dict[str, list[float]] = {}
STAGE_SUFFIX = ".stages.json"


def time_stages() -> None:
    """Time the orchestrator's stages (see the module docstring) in milliseconds."""
    from orchestrator.outbox import OutboxPublisher
    from orchestrator.runtime import Orchestrator
    from orchestrator.stores.postgres import PostgresStore

    stages = [
        (Orchestrator, "on_reply", "reply handled"),
        (PostgresStore, "load", "store load"),
        (PostgresStore, "save", "store save"),
        (PostgresStore, "_write", "store batch write"),
        (OutboxPublisher, "_send", "publish and confirms"),
    ]
    for owner, name, stage in stages:
        setattr(owner, name, _timed(getattr(owner, name), _STAGES.setdefault(stage, [])))


def _timed(original: Callable[..., Awaitable[Any]], into: list[float]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            into.append((time.perf_counter() - started) * 1000)

    return timed


def dump_stages(path: Path) -> None:
    """Write the stages' times (ms) since the last call beside the counts (``path`` +
    ``.stages.json``), then start them afresh."""
    partial = Path(f"{path}{STAGE_SUFFIX}.tmp")
    partial.write_text(json.dumps(_STAGES))
    for values in _STAGES.values():
        values.clear()
    partial.replace(Path(f"{path}{STAGE_SUFFIX}"))


def dump(path: Path) -> None:
    """Write the counts to ``path`` atomically."""
    snapshot = _COUNTS.copy()  # a C-level copy: safe while the event loop thread counts
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(snapshot))
    partial.replace(path)


def _dump_forever(path: Path, stop: threading.Event) -> None:
    while not stop.wait(_INTERVAL):
        dump(path)


def trace_allocations(prefix: str, frames: int = 6, top: int = 30) -> None:
    """Trace allocations; on each ``SIGUSR2`` write the ``top`` sites to ``prefix.N.txt``."""
    tracemalloc.start(frames)
    taken = 0

    def write(_signum: int, _frame: object) -> None:
        nonlocal taken
        taken += 1
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        stats = snapshot.statistics("traceback")
        total = sum(stat.size for stat in stats)
        lines = [f"traced {total / 2**20:.1f} MiB in {len(stats)} sites"]
        for stat in stats[:top]:
            lines.append(f"{stat.size / 2**20:9.2f} MiB {stat.count:>9} blocks")
            lines.extend(f"    {line}" for line in stat.traceback.format(most_recent_first=True))
        Path(f"{prefix}.{taken}.txt").write_text("\n".join(lines) + "\n")

    signal.signal(signal.SIGUSR2, write)


def main() -> int:
    """Install the counter, start the dumper and run the ``saga`` command line."""
    from orchestrator.cli import main as saga_main

    install()
    time_collections()
    target = os.environ.get("BENCH_PROBE_FILE")
    if target and os.environ.get("BENCH_STAGES"):
        time_stages()
        signal.signal(signal.SIGUSR1, lambda _signum, _frame: dump_stages(Path(target)))
    if prefix := os.environ.get("BENCH_TRACEMALLOC"):
        trace_allocations(prefix)
    if target:
        path = Path(target)
        stop = threading.Event()
        threading.Thread(target=_dump_forever, args=(path, stop), daemon=True).start()
        atexit.register(dump, path)
        atexit.register(stop.set)
    return saga_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
