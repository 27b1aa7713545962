"""Measure the project end to end: the daemon and the four example services as processes.

One :func:`run_row` is one fresh world (vhost, database, processes), a warm-up, an idle
baseline, then the measured closed-loop run of N sagas. What is measured and how:

* **sagas/s, steps/s**: sagas that ended (lifecycle events) over the time from the first
  start to the last end; steps are the commands the participants handled (the delta of their
  ``saga_participant_commands_total``), forward and compensating.
* **CPU ms per saga** per process from ``/proc/<pid>/stat`` before and after: each daemon, the
  broker's ``beam.smp`` (minus its idle rate over the same time, measured just before: the
  broker is shared), the PostgreSQL backends connected to the run's database (listed from
  ``pg_stat_activity``; the shared WAL writer, checkpointer and the like are not included) and
  the harness's own driver.
* **store round trips per step**: the delta of ``xact_commit + xact_rollback`` of the run's
  database in ``pg_stat_database`` (every statement outside a transaction block is one, each
  read included), read over another database after the backends' stats flush, minus the idle
  rate (sweep, relay and gauge loops), over the steps.
* **publishes per step**: every daemon's AMQP publishes by exchange, counted by
  :mod:`bench.probe`, over the steps; timers are publishes into the delay ladder.
* **deferred timer cost** (the timer row only): after the run, CPU until every step timer
  published during the run has come back through the ladder and been handled as stale (the
  orchestrator's ``saga_messages_total{queue="saga.timers"}``), minus the idle rates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import probe, procstat
from bench.context import ROOT, Context
from bench.daemons import SagaCluster, SagaDaemon, metric_sum
from bench.driver import Driver, RunResult, TapRecord
from bench.infra import PgStats, fresh_database, fresh_mongo_database, fresh_vhost, unique_name

STEPS = ("reserve_inventory", "process_payment", "create_shipment", "send_confirmation")


@dataclass(frozen=True)
class RowSpec:
    """One configuration of the project."""

    name: str
    store: str
    """``postgres``, ``memory`` or ``mongo``."""
    replicas: int = 1
    env: dict[str, str] = field(default_factory=dict)
    sagas: int | None = None
    """Saga count when it differs from ``--sagas``."""
    deferred_window: float | None = None
    """Watch the step timers drain for at most this many seconds after the run."""


def step_timeouts(seconds: float) -> str:
    """``SAGA_STEP_TIMEOUTS`` giving every step of the order saga ``seconds``."""
    return json.dumps({f"order_fulfillment.{step}": seconds for step in STEPS})


def publish_category(exchange: str) -> str:
    """Which kind of message a publish to ``exchange`` carries."""
    categories = {
        "saga.commands": "commands",
        "saga.replies": "replies",
        "saga.events": "events",
        "saga.start": "starts",
        "saga.dead-letter": "dead_letters",
        "": "timers",  # a timer already due goes straight to saga.timers
    }
    if exchange.startswith("saga.delay."):
        return "timers"
    return categories.get(exchange, exchange)


@contextlib.asynccontextmanager
async def store_url(ctx: Context, store: str) -> AsyncIterator[tuple[str, str | None]]:
    """A fresh store for one run: its URL and, for PostgreSQL, the database name."""
    if store == "postgres":
        async with fresh_database(ctx.servers) as (url, name):
            yield url, name
    elif store == "mongo":
        async with fresh_mongo_database(ctx.servers) as url:
            yield url, None
    else:
        yield "memory://", None


@dataclass
class World:
    """The processes, driver and counters of one run."""

    cluster: SagaCluster
    driver: Driver
    pg: PgStats | None
    ctx: Context

    async def groups(self) -> dict[str, list[int]]:
        """Process ids to meter, by name."""
        groups = self.cluster.pids()
        if self.ctx.broker_pid is not None:
            groups["broker"] = [self.ctx.broker_pid]
        if self.pg is not None:
            groups["postgres"] = await self.pg.backend_pids()
        groups["driver"] = [os.getpid()]
        return groups

    async def snapshot(self) -> dict[str, Any]:
        """Store counters, metrics and publish counts now."""
        return {
            "pg": await self.pg.counters() if self.pg is not None else {},
            "metrics": await self.cluster.metrics(),
            "publishes": self.cluster.publishes(),
            "at": time.perf_counter(),
        }

    async def idle_rates(self, seconds: float) -> dict[str, float]:
        """Broker CPU and store transactions per second while no saga runs."""
        groups = {"broker": [self.ctx.broker_pid] if self.ctx.broker_pid else []}
        meter = procstat.CpuMeter.start(groups)
        before = await self.pg.counters() if self.pg is not None else {}
        started = time.perf_counter()
        await asyncio.sleep(seconds)
        meter.sample(groups)
        after = await self.pg.counters() if self.pg is not None else {}
        elapsed = time.perf_counter() - started
        return {
            "seconds": elapsed,
            "broker_cpu_per_s": meter.seconds().get("broker", 0.0) / elapsed,
            "xact_per_s": (_xacts(after) - _xacts(before)) / elapsed if after else 0.0,
        }


@contextlib.asynccontextmanager
async def world(ctx: Context, spec: RowSpec, label: str) -> AsyncIterator[World]:
    """A fresh vhost and store, the processes started, a driver connected."""
    async with fresh_vhost(ctx.servers) as amqp, store_url(ctx, spec.store) as (url, database):
        env = {
            **ctx.base_env(),
            "SAGA_AMQP_URL": amqp,
            "SAGA_STORE_URL": url,
            "SAGA_IDEMPOTENCY_URL": url,
            # The memory row measures the engine without a database: one process per service,
            # never restarted, so nothing needs to be shared.
            "SAGA_ALLOW_MEMORY_STORE": "1" if url.startswith("memory://") else "",
            **spec.env,
        }
        cluster = SagaCluster(env, ctx.workdir / label, replicas=spec.replicas)
        driver = Driver(amqp, unique_name("b"))
        pg = await PgStats.connect(ctx.servers, database) if database else None
        try:
            await cluster.start()
            yield World(cluster, driver, pg, ctx)
        finally:
            await driver.close()
            codes = await cluster.stop()
            bad = {name: code for name, code in codes.items() if code not in (0, None)}
            if bad:
                print(f"  note: {label}: daemons exited with {bad} (logs in {cluster.workdir})")
            if pg is not None:
                await pg.close()


async def run_row(ctx: Context, spec: RowSpec, repeat: int, *, profile: bool) -> dict[str, Any]:
    """Measure one row once; the figures as a JSON-friendly dict."""
    options = ctx.options
    sagas = spec.sagas or options.sagas
    label = f"{spec.name}-r{repeat}".replace(" ", "_").replace(",", "")
    async with world(ctx, spec, label) as w:
        await w.driver.open()
        if options.warmup:
            await w.driver.closed_loop(
                options.warmup, min(options.in_flight, options.warmup), within=300
            )
        await asyncio.sleep(options.settle)  # the warm-up's last stats flush and acks
        idle = await w.idle_rates(options.baseline)
        groups = await w.groups()
        meter = procstat.CpuMeter.start(groups)
        before = await w.snapshot()
        profiler = await start_profiler(ctx, w, label) if profile else None
        result = await w.driver.closed_loop(
            sagas, options.in_flight, within=max(300.0, sagas / 2.0)
        )
        meter.sample(await w.groups())
        ended_at = time.perf_counter()
        profile_summary = await stop_profiler(profiler) if profiler else None
        await asyncio.sleep(options.settle)
        after = await w.snapshot()
        figures = figures_of(
            result,
            cpu=meter.seconds(),
            writes=meter.write_calls(),
            before=before,
            after=after,
            idle=idle,
            ended_at=ended_at,
        )
        figures["in_flight"] = options.in_flight
        if profile_summary is not None:
            figures["profile"] = profile_summary
        if spec.deferred_window is not None:
            figures["deferred"] = await deferred_timers(w, idle, after, spec, result)
        return figures


def _xacts(counters: dict[str, int]) -> int:
    return counters.get("xact_commit", 0) + counters.get("xact_rollback", 0)


def _delta_counts(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, int]]:
    """What bench.probe counted in each daemon during the run, by key."""
    return {
        name: {
            key: value - before["publishes"].get(name, {}).get(key, 0)
            for key, value in counts.items()
        }
        for name, counts in after["publishes"].items()
    }


def _delta_prefixed(
    before: dict[str, Any], after: dict[str, Any], prefix: str
) -> dict[str, dict[str, int]]:
    """Each daemon's counts under ``prefix`` during the run, by the rest of their key; a daemon
    with none of them counted is left out."""
    found: dict[str, dict[str, int]] = {}
    for name, counts in _delta_counts(before, after).items():
        for key, delta in counts.items():
            if key.startswith(prefix) and delta > 0:
                found.setdefault(name, {})[key.removeprefix(prefix)] = delta
    return found


def _delta_statements(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, int]]:
    """asyncpg calls of each daemon during the run, by statement verb."""
    return _delta_prefixed(before, after, probe.STATEMENT_PREFIX)


def _delta_collections(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Each daemon's garbage collections during the run: runs, microseconds and pauses over
    10 ms, by generation."""
    return _delta_prefixed(before, after, probe.GC_PREFIX)


def _delta_confirm_waits(before: dict[str, Any], after: dict[str, Any]) -> int:
    """The orchestrators' rounds of confirms during the run (see :data:`probe.CONFIRM_WAITS`)."""
    return sum(
        counts.get(probe.CONFIRM_WAITS, 0)
        for name, counts in _delta_counts(before, after).items()
        if name.startswith("orchestrator")
    )


def _delta_publishes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for counts in _delta_counts(before, after).values():
        for exchange, delta in counts.items():
            if not probe.is_exchange(exchange):
                continue
            category = publish_category(exchange)
            totals[category] = totals.get(category, 0) + delta
    return totals


def _delta_metric(before: dict[str, Any], after: dict[str, Any], name: str, **labels: str) -> float:
    total = 0.0
    for daemon, samples in after["metrics"].items():
        total += metric_sum(samples, name, **labels) - metric_sum(
            before["metrics"].get(daemon, {}), name, **labels
        )
    return total


def figures_of(
    result: RunResult,
    *,
    cpu: dict[str, float],
    writes: dict[str, float],
    before: dict[str, Any],
    after: dict[str, Any],
    idle: dict[str, float],
    ended_at: float,
) -> dict[str, Any]:
    """The row's figures from the run and the counters around it."""
    finished = max(result.finished, 1)
    steps = _delta_metric(before, after, "saga_participant_commands_total")
    seconds = result.seconds
    metered = ended_at - before["at"]
    cpu_ms = {name: value * 1000 / finished for name, value in cpu.items()}
    if "broker" in cpu:
        cpu_ms["broker_raw"] = cpu_ms["broker"]
        net = cpu["broker"] - idle["broker_cpu_per_s"] * metered
        cpu_ms["broker"] = max(net, 0.0) * 1000 / finished
    publishes = _delta_publishes(before, after)
    figures: dict[str, Any] = {
        "sagas": result.finished,
        "started": result.started,
        "ended": result.ended,
        "timed_out": result.timed_out,
        "seconds": seconds,
        "sagas_per_s": result.finished / seconds if seconds else 0.0,
        "steps": steps,
        "steps_per_s": steps / seconds if seconds else 0.0,
        "cpu_ms_per_saga": cpu_ms,
        "idle": idle,
        "publishes": publishes,
        "publishes_per_step": sum(publishes.values()) / steps if steps else None,
        "publishes_per_step_by_kind": {k: v / steps for k, v in publishes.items()} if steps else {},
        "confirm_waits_per_step": _delta_confirm_waits(before, after) / steps if steps else None,
        "collections": _delta_collections(before, after),
        "orchestrator_messages": {
            queue: _delta_metric(before, after, "saga_messages_total", queue=queue)
            for queue in ("saga.start", "saga.replies", "saga.timers")
        },
        "statements_per_step": {
            daemon: {verb: count / steps for verb, count in verbs.items()}
            for daemon, verbs in _delta_statements(before, after).items()
        }
        if steps
        else {},
        "write_calls_per_step": {name: count / steps for name, count in writes.items()}
        if steps
        else {},
        "version_conflicts": _delta_metric(before, after, "saga_version_conflicts_total"),
        "publish_failures": _delta_metric(before, after, "saga_publish_failures_total"),
    }
    if after["pg"]:
        window = after["at"] - before["at"]
        xacts = _xacts(after["pg"]) - _xacts(before["pg"]) - idle["xact_per_s"] * window
        figures["pg"] = {key: after["pg"][key] - before["pg"].get(key, 0) for key in after["pg"]}
        figures["xact_per_step"] = xacts / steps if steps else None
    return figures


async def deferred_timers(
    w: World, idle: dict[str, float], after_run: dict[str, Any], spec: RowSpec, result: RunResult
) -> dict[str, Any]:
    """CPU spent after the run while the step timers come back and are found stale."""
    assert spec.deferred_window is not None
    groups = await w.groups()
    meter = procstat.CpuMeter.start(groups)
    started = time.perf_counter()
    published = sum(
        value
        for counts in after_run["publishes"].values()
        for exchange, value in counts.items()
        if publish_category(exchange) == "timers"
    )
    handled_at_start = _timers_handled(after_run)
    deadline = started + spec.deferred_window
    handled = handled_at_start
    while time.perf_counter() < deadline:
        await asyncio.sleep(1.0)
        handled = _timers_handled(await w.snapshot())
        if handled >= published:
            break
    meter.sample(await w.groups())
    window = time.perf_counter() - started
    cpu = meter.seconds()
    finished = max(result.finished, 1)
    broker_net = cpu.get("broker", 0.0) - idle["broker_cpu_per_s"] * window
    return {
        "window_s": window,
        "timers_published_total": published,
        "timers_handled_before_window": handled_at_start,
        "timers_handled_in_window": handled - handled_at_start,
        "all_back": handled >= published,
        "cpu_ms_per_saga": {
            "broker": max(broker_net, 0.0) * 1000 / finished,
            "broker_raw": cpu.get("broker", 0.0) * 1000 / finished,
            "orchestrator": sum(v for k, v in cpu.items() if k.startswith("orchestrator"))
            * 1000
            / finished,
            "postgres": cpu.get("postgres", 0.0) * 1000 / finished,
        },
    }


def _timers_handled(snapshot: dict[str, Any]) -> float:
    return sum(
        metric_sum(samples, "saga_messages_total", queue="saga.timers")
        for samples in snapshot["metrics"].values()
    )


# --- the latency phase --------------------------------------------------------------------


async def latency_phase(ctx: Context, rate: float) -> dict[str, Any]:
    """Open-loop arrivals at ``rate`` sagas/s on the PostgreSQL row; reply -> next command."""
    spec = RowSpec("latency", "postgres", env={"BENCH_STAGES": "1"})
    async with world(ctx, spec, "latency") as w:
        await w.driver.open()
        if ctx.options.warmup:
            await w.driver.closed_loop(ctx.options.warmup, ctx.options.in_flight, within=300)
        orchestrator = w.cluster.orchestrators[0]
        await stage_times(orchestrator)  # the warm-up's, left out
        await w.driver.tap()
        w.driver.taps.clear()
        result = await w.driver.open_loop(
            rate, ctx.options.latency_seconds, within=ctx.options.latency_seconds + 300
        )
        await asyncio.sleep(0.5)
        gaps = reply_to_next_command(w.driver.taps)
        stages = await stage_times(orchestrator)
    return {
        "orchestrator_stages_ms": stages,
        "target_rate": rate,
        "achieved_rate": result.started / ctx.options.latency_seconds,
        "sagas": result.finished,
        "timed_out": result.timed_out,
        "pairs": len(gaps["total"]),
        "ms": {name: percentiles(values) for name, values in gaps.items()},
    }


async def stage_times(daemon: SagaDaemon, within: float = 60.0) -> dict[str, Any]:
    """The orchestrator's stage percentiles since the last call (see :mod:`bench.probe`)."""
    path = Path(f"{daemon.probe_file}{probe.STAGE_SUFFIX}")
    times = await asyncio.to_thread(_signalled_file, daemon.pid, path, within)
    return {
        stage: {"n": len(values), **percentiles(values)}
        for stage, values in times.items()
        if values
    }


def _signalled_file(pid: int, path: Path, within: float) -> dict[str, Any]:
    """Send ``SIGUSR1`` and read the JSON file the process writes from its handler."""
    path.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + within
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} wrote no {path.name} within {within:.0f} s")
        time.sleep(0.05)
    figures: dict[str, Any] = json.loads(path.read_text())
    return figures


def reply_to_next_command(taps: list[TapRecord]) -> dict[str, list[float]]:
    """For every reply, the time until the saga's next command passed the broker (ms).

    ``total``: the participant stamping the reply (just before publishing it) to the next
    command reaching its queue; ``reply_leg``: reply stamped to reply seen on the tap;
    ``to_decision``: reply seen to the orchestrator's decision time (stamped in the command);
    ``decision_to_command``: decision to command seen (store write, publish, routing).
    """
    by_saga: dict[str, list[TapRecord]] = {}
    for record in sorted(taps, key=lambda r: r.seen_at):
        by_saga.setdefault(record.saga_id, []).append(record)
    gaps: dict[str, list[float]] = {
        "total": [],
        "reply_leg": [],
        "to_decision": [],
        "decision_to_command": [],
    }
    for records in by_saga.values():
        for index, reply in enumerate(records):
            if reply.kind != "reply":
                continue
            following = next((r for r in records[index + 1 :] if r.kind == "command"), None)
            if following is None:
                continue
            gaps["total"].append((following.seen_at - reply.sent_at) * 1000)
            gaps["reply_leg"].append((reply.seen_at - reply.sent_at) * 1000)
            gaps["to_decision"].append((following.sent_at - reply.seen_at) * 1000)
            gaps["decision_to_command"].append((following.seen_at - following.sent_at) * 1000)
    return gaps


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p90, p99 and max of ``values`` (nearest rank)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(p * len(ordered) + 0.5) - 1))]

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "max": ordered[-1]}


# --- resident memory against sagas in flight ------------------------------------------------


async def rss_phase(ctx: Context, store: str) -> dict[str, Any]:
    """Orchestrator RSS with 0, ... sagas parked on a first step that never answers."""
    spec = RowSpec(f"rss-{store}", store, env={"SAGA_STEP_TIMEOUTS": step_timeouts(86400)})
    points: list[dict[str, Any]] = []
    async with world(ctx, spec, f"rss-{store}") as w:
        await w.driver.open(watch=("SagaStepStarted",))
        orchestrator = w.cluster.orchestrators[0]
        parked = 0
        for target in sorted(ctx.options.rss_counts):
            wanted = target - parked
            started = time.perf_counter()
            if wanted > 0:
                parked += await w.driver.park(
                    wanted, "reserve_inventory", within=max(120.0, wanted / 10.0)
                )
            seconds = time.perf_counter() - started
            await asyncio.sleep(3.0)
            memory = orchestrator.rss()
            if os.environ.get("BENCH_TRACEMALLOC"):
                os.kill(orchestrator.pid, signal.SIGUSR2)  # see bench.probe
            points.append(
                {
                    "target": target,
                    "parked": parked,
                    "seconds_to_park": seconds,
                    "rss_mib": memory.get("VmRSS", 0) / 1024,
                    "hwm_mib": memory.get("VmHWM", 0) / 1024,
                }
            )
            print(
                f"  rss {store}: {parked} parked -> {memory.get('VmRSS', 0) / 1024:.1f} MiB "
                f"(parking took {seconds:.0f} s)",
                flush=True,
            )
    return {"store": store, "points": points}


# --- the profiler ---------------------------------------------------------------------------


@dataclass
class Profiler:
    """A running ``py-spy record`` of the orchestrator."""

    process: asyncio.subprocess.Process
    output: Path


def py_spy() -> str | None:
    """The py-spy executable: on the PATH or beside this interpreter."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


async def start_profiler(ctx: Context, w: World, label: str) -> Profiler | None:
    """Start sampling the (first) orchestrator with py-spy, if py-spy is installed."""
    binary = py_spy()
    if binary is None:
        print("  note: py-spy is not installed (pip install '.[bench]'); no profile")
        return None
    output = ctx.workdir / f"{label}.pyspy.txt"
    process = await asyncio.create_subprocess_exec(
        binary,
        "record",
        "--pid",
        str(w.cluster.orchestrators[0].pid),
        "--format",
        "raw",
        "--rate",
        "100",
        "--gil",  # Python work only: not a thread preempted in a send(), not the probe thread
        "--duration",
        str(int(ctx.options.profile_seconds)),
        "--output",
        str(output),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return Profiler(process, output)


async def stop_profiler(profiler: Profiler) -> dict[str, Any]:
    """Stop py-spy (it writes its samples on SIGINT) and summarise them."""
    if profiler.process.returncode is None:
        profiler.process.send_signal(signal.SIGINT)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(30):
            await profiler.process.wait()
    return summarise_profile(profiler.output)


def summarise_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Self and total sample shares per function from py-spy's collapsed stacks."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        return {"error": f"no profile: {e}"}
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [_short_frame(frame) for frame in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + count

    def share(table: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(table.items(), key=lambda item: item[1], reverse=True)[:top]
        return [(name, 100.0 * count / samples) for name, count in ranked]

    return {"file": str(path), "samples": samples, "self": share(own), "total": share(total)}


def _short_frame(frame: str) -> str:
    """``function (path/to/module.py:123)`` -> ``function (module.py)``; threads kept."""
    name, _, where = frame.partition(" (")
    source = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3.11/"):
        if marker in source:
            source = source.split(marker, 1)[1]
            break
    else:
        source = source.removeprefix(f"{ROOT}/")
    return f"{name} ({source})" if source else name
