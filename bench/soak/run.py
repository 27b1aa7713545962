"""One soak run: set up, load and break for ``minutes``, drain, operate, check, report.

The run owns everything it breaks: a private RabbitMQ node or cluster (:mod:`bench.soak.broker`),
a PostgreSQL database of its own on the shared server (dropped afterwards unless kept), and
the saga processes (``saga orchestrator`` replicas and the four ledger services of
:mod:`bench.soak.services`), each started the way users start them. Every background loop
(load, faults, hostile messages, metrics, load average) is a task of one TaskGroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg

from bench.daemons import http_get, metric_sum, parse_metrics
from bench.infra import Servers, fresh_database
from bench.soak import chaos, checks, scenarios
from bench.soak.broker import Broker
from bench.soak.services import LEDGER, LEDGER_SCHEMA
from contracts import names
from contracts.messages import StartSaga
from orchestrator.engine import OperatorResolve
from orchestrator.loader import load_app
from orchestrator.processes import Daemon, SagaProcesses
from orchestrator.runtime import Orchestrator
from orchestrator.state import SagaState, SagaStatus
from orchestrator.store import SagaFilter, SagaStore
from orchestrator.stores import open_store
from plumbing.clock import SystemClock
from plumbing.codec import start_message
from plumbing.delays import DelayLadder
from plumbing.errors import ConfigError, PublishFailed
from plumbing.rabbitmq import RabbitTransport
from plumbing.topology import QueuePolicy, orchestrator_topology

APP = "examples.order_fulfillment:app"
SERVICES = tuple(f"bench.soak.services:{s}" for s in chaos.SERVICES)
AT_LEAST_ONCE = frozenset({"notification"})
"""Services whose effect is outside the outcome's transaction (see :mod:`bench.soak.services`)."""
_METRICS = (
    "saga_timers_fired_total",
    "saga_version_conflicts_total",
    "saga_late_replies_total",
    "saga_stale_timers_total",
    "saga_dead_lettered_total",
    "saga_publish_failures_total",
)


@dataclass(frozen=True)
class SoakConfig:
    """What one run does."""

    minutes: float
    rate: float = 3.0
    """Start requests a second, at most."""
    in_flight: int = 80
    """At most this many sagas unfinished at once (a bounded backlog, as a real client's)."""
    replicas: int = 2
    nodes: int = 1
    """Broker nodes: 1, or a cluster of 3 (quorum queues replicated on each)."""
    replica_kill_every: tuple[float, float] = (15.0, 30.0)
    participant_kill_every: tuple[float, float] = (45.0, 90.0)
    broker_kill_every: tuple[float, float] = (150.0, 240.0)
    hostile_every: float = 10.0
    seed: int = 1
    pg_admin_url: str = "postgresql://postgres@127.0.0.1:5432/test"
    workdir: Path | None = None
    keep: bool = False
    """Keep the database and the work directory afterwards."""


@dataclass
class Figures:
    """Everything measured, for the report."""

    sent: list[str] = field(default_factory=list)
    load: list[float] = field(default_factory=list)
    metrics: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)
    problems: Counter[str] = field(default_factory=Counter)
    """Things that went wrong on the soak's side (by kind), e.g. unconfirmed publishes."""
    phases: dict[str, float] = field(default_factory=dict)

    def problem(self, what: str) -> None:
        """Count a problem (its first 90 characters name its kind)."""
        self.problems[what[:90]] += 1


@dataclass(frozen=True)
class Report:
    """The verdict and the figures of a run."""

    checks: list[checks.Check]
    figures: dict[str, Any]

    @property
    def ok(self) -> bool:
        """Whether every invariant held."""
        return all(c.ok for c in self.checks)

    def text(self) -> str:
        """The report as the terminal shows it."""
        lines = ["", "Chaos soak", "=========="]
        for key, value in self.figures.items():
            lines.append(f"{key}: {json.dumps(value, default=str)}")
        lines += ["", "Invariants"]
        for check in self.checks:
            lines.append(f"  [{'ok' if check.ok else 'BROKEN'}] {check.name}: {check.detail}")
        lines.append("")
        lines.append("all invariants held" if self.ok else "AN INVARIANT BROKE")
        return "\n".join(lines)


def environment(amqp: str, database: str) -> dict[str, str]:
    """The ``SAGA_*`` settings of every process of the run."""
    timeouts = {f"order_fulfillment.{s}": scenarios.STEP_TIMEOUT for s in scenarios.STEPS}
    return {
        "SAGA_AMQP_URL": amqp,
        "SAGA_STORE_URL": database,
        "SAGA_IDEMPOTENCY_URL": database,
        "SAGA_STEP_TIMEOUTS": json.dumps(timeouts),
        # A claim left by a killed non-transactional handler is retaken after 5 s.
        "SAGA_IDEMPOTENCY_LEASE": "5",
        "SAGA_LOG_LEVEL": "warning",
    }


async def run(config: SoakConfig) -> Report:
    """Run the soak and return its report."""
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="saga-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    (workdir / "rabbit").mkdir(exist_ok=True)
    broker = await Broker.start(workdir / "rabbit", config.nodes)
    try:
        servers = Servers(amqp_url=broker.urls, pg_admin_url=config.pg_admin_url, mongo_url=None)
        async with _database(servers, config.keep) as database:
            report = await _soak(config, broker, database, workdir)
            report.figures["dead_letter_forwarding_stalls_in_broker_logs"] = broker.stalls()
            report.figures["workdir"] = str(workdir)
            return report
    finally:
        broker.close()
        if not config.keep:
            shutil.rmtree(workdir / "rabbit", ignore_errors=True)


@contextlib.asynccontextmanager
async def _database(servers: Servers, keep: bool) -> AsyncIterator[str]:
    if keep:
        name = f"saga_soak_{os.getpid()}_{int(time.time())}"
        admin = await asyncpg.connect(servers.pg_admin_url)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        from bench.infra import with_path

        yield with_path(servers.pg_admin_url, name)
        return
    async with fresh_database(servers) as (url, _):
        yield url


async def _soak(config: SoakConfig, broker: Broker, database: str, workdir: Path) -> Report:
    run_id = os.urandom(3).hex()
    db = await asyncpg.connect(database)
    await db.execute(LEDGER_SCHEMA)
    processes = SagaProcesses(
        APP, SERVICES, environment(broker.urls, database), config.replicas, workdir / "logs"
    )
    for daemon in processes.daemons.values():
        # Small prefetches keep the connection pools small: the PostgreSQL server's hundred
        # connections are shared with everyone on the machine.
        prefetch = "8" if daemon.args[0] == "orchestrator" else "4"
        daemon.env = {**daemon.env, "SAGA_PREFETCH": prefetch}
    store = open_store(database)
    transport = RabbitTransport(broker.urls)
    faults = chaos.FaultLog()
    hostile = chaos.HostileLog()
    figures = Figures()
    clock = time.monotonic
    try:
        began = clock()
        await processes.start(within=180)
        await transport.declare(orchestrator_topology((), QueuePolicy()))
        figures.phases["start_up_s"] = round(clock() - began, 1)
        loading = asyncio.Event()
        watching = asyncio.Event()
        began = clock()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(_load_average(figures, watching))
            tasks.create_task(_scrape(processes, figures, watching))
            async with asyncio.TaskGroup() as chaos_tasks:
                chaos_tasks.create_task(
                    _generate(config, transport, store, figures, run_id=run_id, loading=loading)
                )
                chaos_tasks.create_task(_kill_replicas(config, processes, faults, loading))
                chaos_tasks.create_task(_kill_participants(config, processes, faults, loading))
                chaos_tasks.create_task(_kill_broker(config, broker, faults, loading))
                chaos_tasks.create_task(_hostile(config, broker, figures, hostile, loading))
            figures.phases["load_and_faults_s"] = round(clock() - began, 1)
            for daemon in processes.daemons.values():
                await _ensure_up(daemon, faults)
            began = clock()
            await _settle(store, len(figures.sent), {"completed", "failed", "stuck"})
            figures.phases["settle_s"] = round(clock() - began, 1)
            stuck = await _resolve_stuck(store, transport, figures)
            await _settle(store, len(figures.sent), {"completed", "failed"})
            began = clock()
            queues = await _drained(store, broker)
            figures.phases["drain_s"] = round(clock() - began, 1)
            watching.set()
        parked = await _parked(broker.url())
        codes = await processes.stop()
        states = {s: await _state(store, s) for s in figures.sent}
        rows = await db.fetch(
            f"SELECT seq, saga_id, step, direction, service, pid FROM {LEDGER} ORDER BY seq"
        )
    finally:
        await processes.stop()
        await transport.close()
        await store.close()
        await db.close()
    return _verdict(
        config,
        figures,
        faults=faults,
        hostile=hostile,
        states=states,
        rows=rows,
        stuck=stuck,
        parked=parked,
        queues=queues,
        codes=codes,
    )


def _verdict(
    config: SoakConfig,
    figures: Figures,
    *,
    faults: chaos.FaultLog,
    hostile: chaos.HostileLog,
    states: dict[str, SagaState | None],
    rows: list[asyncpg.Record],
    stuck: set[str],
    parked: list[checks.Parked],
    queues: dict[str, int],
    codes: dict[str, int | None],
) -> Report:
    effects = [checks.Effect(**dict(row)) for row in rows]
    killed = {s: faults.killed_pids(s) for s in chaos.SERVICES}
    found = [
        *checks.saga_checks(figures.sent, states, stuck),
        checks.Check(
            "refused compensations rested stuck until the operator resolved them",
            len(stuck) == checks.expected_stuck(figures.sent),
            f"{len(stuck)} stuck, {checks.expected_stuck(figures.sent)} expected",
        ),
    ]
    effect_found, effect_figures = checks.effect_checks(
        figures.sent, effects, killed, AT_LEAST_ONCE
    )
    found += effect_found
    backlog = {q: n for q, n in queues.items() if n and q != names.PARKED_QUEUE}
    found.append(
        checks.Check(
            "outbox and queues drained (only the parking queue holds messages)",
            not backlog and queues.get("__outbox__", 0) == 0,
            f"outbox {queues.get('__outbox__', 0)}, non-empty queues {backlog}",
        )
    )
    found += checks.parking_checks(parked, hostile.must_park, hostile.may_park)
    app = load_app(APP, {f"order_fulfillment.{s}": scenarios.STEP_TIMEOUT for s in scenarios.STEPS})
    late = checks.lateness([s for s in states.values() if s is not None], app["order_fulfillment"])
    found.append(checks.lateness_check(late))
    found.append(
        checks.Check(
            "every process stopped cleanly on SIGTERM at the end",
            set(codes.values()) <= {0},
            f"exit statuses {codes}",
        )
    )
    statuses = Counter(s.status.value for s in states.values() if s is not None)
    metrics: dict[str, float] = {}
    for samples in figures.metrics.values():
        for key, value in samples.items():
            metrics[key] = metrics.get(key, 0.0) + value
    load = figures.load or [0.0]
    fig: dict[str, Any] = {
        "minutes": config.minutes,
        "replicas": config.replicas,
        "broker_nodes": config.nodes,
        "sagas": len(figures.sent),
        "statuses": dict(statuses),
        "by_scenario": checks.by_scenario(figures.sent),
        "stuck_resolved_by_operator": len(stuck),
        "faults": faults.counts(),
        "broker_outages_s": [round(f.outage, 1) for f in faults.faults if f.kind == "kill-broker"],
        "hostile_sent": dict(hostile.sent),
        "hostile_unconfirmed": dict(hostile.uncertain),
        "parked": len(parked),
        "parked_reasons": dict(Counter(p.reason.split(":")[0][:60] for p in parked)),
        **effect_figures,
        "timer_lateness_s": {k: checks.lateness_summary(v) for k, v in late.items()},
        "orchestrator_metrics_summed_over_incarnations": metrics,
        "load_average_1m": {
            "mean": round(sum(load) / len(load), 2),
            "max": round(max(load), 2),
        },
        "phases_s": figures.phases,
        "problems": dict(figures.problems.most_common(10)),
    }
    return Report(found, fig)


# --- load -------------------------------------------------------------------------------------


async def _generate(
    config: SoakConfig,
    transport: RabbitTransport,
    store: SagaStore,
    figures: Figures,
    *,
    run_id: str,
    loading: asyncio.Event,
) -> None:
    """Start sagas at ``rate`` a second, at most ``in_flight`` unfinished, for ``minutes``."""
    rng = scenarios.picker(config.seed)
    stop_at = time.monotonic() + config.minutes * 60
    finished = 0
    checked = 0.0
    n = 0
    try:
        while time.monotonic() < stop_at:
            if n - finished >= config.in_flight and time.monotonic() - checked > 1:
                finished = await _finished(store)
                checked = time.monotonic()
            if n - finished >= config.in_flight:
                await asyncio.sleep(0.5)
                continue
            scenario = scenarios.draw(rng)
            saga_id, data = scenarios.order(n, scenario, run_id)
            await _send_start(transport, saga_id, data, figures)
            figures.sent.append(saga_id)
            n += 1
            await asyncio.sleep(1 / config.rate)
    finally:
        loading.set()


async def _finished(store: SagaStore) -> int:
    try:
        counts = await store.count_by_status()
    except Exception:  # noqa: BLE001 - the store is shared and busy; pacing guesses on
        return 0
    return sum(n for (_, status), n in counts.items() if status in ("completed", "failed", "stuck"))


async def _send_start(
    transport: RabbitTransport, saga_id: str, data: dict[str, object], figures: Figures
) -> None:
    """Publish one start request, retrying while the broker is away (a client's outbox would)."""
    request = StartSaga(saga_type="order_fulfillment", saga_id=saga_id, data=data)
    async with asyncio.timeout(600):
        while True:
            try:
                await transport.publish(start_message(request, SystemClock().now()))
                return
            except PublishFailed as e:
                # The kind, without the saga id, so that the report counts them together.
                figures.problem(f"start request not confirmed, sent again ({type(e).__name__})")
                await asyncio.sleep(1)


# --- faults -----------------------------------------------------------------------------------


async def _until(loading: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until the load ends; whether the load is still on."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await loading.wait()
    return not loading.is_set()


async def _kill_replicas(
    config: SoakConfig, processes: SagaProcesses, faults: chaos.FaultLog, loading: asyncio.Event
) -> None:
    rng = random.Random(config.seed + 1)
    replicas = [d for d in processes.daemons.values() if d.args[0] == "orchestrator"]
    while await _until(loading, chaos.interval(rng, config.replica_kill_every)):
        victim = rng.choice(replicas)
        await _kill_and_restart(victim, faults, "kill-orchestrator", rng.uniform(0, 3))


async def _kill_participants(
    config: SoakConfig, processes: SagaProcesses, faults: chaos.FaultLog, loading: asyncio.Event
) -> None:
    rng = random.Random(config.seed + 2)
    services = [d for d in processes.daemons.values() if d.args[0] == "participant"]
    while await _until(loading, chaos.interval(rng, config.participant_kill_every)):
        victim = rng.choice(services)
        await _kill_and_restart(victim, faults, "kill-participant", rng.uniform(0, 3))


async def _kill_and_restart(daemon: Daemon, faults: chaos.FaultLog, kind: str, down: float) -> None:
    if daemon.process is None or daemon.process.returncode is not None:
        await _ensure_up(daemon, faults)
        return
    pid = daemon.process.pid
    await daemon.kill()
    faults.add(kind, daemon.name, pid)
    await asyncio.sleep(down)  # down for a moment: its queue fills, another replica takes over
    await _ensure_up(daemon, faults)


async def _ensure_up(daemon: Daemon, faults: chaos.FaultLog) -> None:
    """Start the daemon if it is not running, and wait until it is ready (it waits out a broker
    that is down); start it again if it exits meanwhile."""
    async with asyncio.timeout(900):
        while True:
            if daemon.process is None or daemon.process.returncode is not None:
                await daemon.start()
            try:
                await daemon.wait_ready(within=300)
                return
            except ConfigError:
                faults.add("exited-and-restarted", daemon.name, None)
            except TimeoutError:
                continue


async def _kill_broker(
    config: SoakConfig, broker: Broker, faults: chaos.FaultLog, loading: asyncio.Event
) -> None:
    """SIGKILL a broker node every few minutes (in a short run: once, at a third of it)."""
    rng = random.Random(config.seed + 3)
    wait = min(chaos.interval(rng, config.broker_kill_every), config.minutes * 60 / 3)
    while await _until(loading, wait):
        began = time.monotonic()
        name = await broker.kill_next(down=rng.uniform(1, 5))
        faults.add("kill-broker", name, None, outage=time.monotonic() - began)
        wait = chaos.interval(rng, config.broker_kill_every)


async def _hostile(
    config: SoakConfig,
    broker: Broker,
    figures: Figures,
    log: chaos.HostileLog,
    loading: asyncio.Event,
) -> None:
    ladder = DelayLadder()
    n = 0
    while await _until(loading, config.hostile_every):
        real = figures.sent[-200:]
        await chaos.send_hostile(
            broker.url(), chaos.hostile_round(n, real, ladder), log, figures.problem
        )
        n += 1


# --- watching ---------------------------------------------------------------------------------


async def _load_average(figures: Figures, done: asyncio.Event) -> None:
    while await _until(done, 10):
        figures.load.append(os.getloadavg()[0])


async def _scrape(processes: SagaProcesses, figures: Figures, done: asyncio.Event) -> None:
    """Every orchestrator's counters every 2 s, kept per process incarnation (a killed one's
    last scrape stands), so that the sums survive the kills (less the last 2 s of each)."""
    while await _until(done, 2):
        for daemon in processes.daemons.values():
            if daemon.args[0] != "orchestrator" or daemon.process is None:
                continue
            answer = await http_get(daemon.port, "/metrics", within=2)
            if answer is None or answer[0] != 200:
                continue
            samples = parse_metrics(answer[1])
            wanted: dict[str, float] = {}
            for name in _METRICS:
                wanted[name] = metric_sum(samples, name)
            for source in ("broker", "sweeper"):
                wanted[f"saga_timers_fired_total[{source}]"] = metric_sum(
                    samples, "saga_timers_fired_total", source=source
                )
            figures.metrics[(daemon.name, daemon.process.pid)] = wanted


# --- the end ----------------------------------------------------------------------------------


async def _settle(store: SagaStore, count: int, resting: set[str]) -> None:
    """Wait until ``count`` sagas exist and all rest in ``resting``; fail after 10 minutes
    without progress."""
    progress_at = time.monotonic()
    last = -1
    while True:
        counts = await store.count_by_status()
        total = sum(counts.values())
        done = sum(n for (_, status), n in counts.items() if status in resting)
        if total >= count and done == total:
            return
        if done != last:
            last, progress_at = done, time.monotonic()
        if time.monotonic() - progress_at > 600:
            raise TimeoutError(f"no progress for 10 minutes: {counts}")
        await asyncio.sleep(2)


async def _resolve_stuck(
    store: SagaStore, transport: RabbitTransport, figures: Figures
) -> set[str]:
    """Act as the operator: resolve every stuck saga's refused compensation by hand."""
    timeouts = {f"order_fulfillment.{s}": scenarios.STEP_TIMEOUT for s in scenarios.STEPS}
    engine = Orchestrator(load_app(APP, timeouts), store, transport)
    resolved: set[str] = set()
    while True:
        stuck = await store.find(SagaFilter(status=SagaStatus.STUCK, limit=500))
        if not stuck:
            return resolved
        for item in stuck:
            await engine.operate(item.state.saga_id, OperatorResolve("refund done by hand"))
            resolved.add(item.state.saga_id)


async def _drained(store: SagaStore, broker: Broker) -> dict[str, int]:
    """Wait (up to 5 minutes) until no outbox holds a message and every queue but the parking
    queue is empty (timers of finished sagas still travel the delay ladder for up to a
    minute); the queue depths at the end, with the outbox as ``__outbox__``."""
    depths: dict[str, int] = {}
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(300):
            while True:
                far = datetime.now(UTC) + timedelta(days=1)
                outbox = len(await store.unpublished(far, 1000))
                text = await broker.ctl("list_queues", "name", "messages", "--formatter", "json")
                depths = {row["name"]: int(row["messages"]) for row in json.loads(text)}
                depths["__outbox__"] = outbox
                if not any(n for q, n in depths.items() if q != names.PARKED_QUEUE):
                    break
                await asyncio.sleep(5)
    return depths


async def _parked(url: str) -> list[checks.Parked]:
    """Every message in the parking queue (taken off it), with its reason."""
    found: list[checks.Parked] = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(names.PARKED_QUEUE)
        while (message := await queue.get(fail=False)) is not None:
            headers = message.headers
            reason = _text(headers.get(names.HEADER_DEAD_LETTER_REASON))
            if not reason and headers.get("x-death"):
                reason = f"x-death: {headers['x-death']!r}"
            found.append(
                checks.Parked(
                    message_id=message.message_id or _text(headers.get(names.HEADER_MESSAGE_ID)),
                    saga_id=_text(headers.get(names.HEADER_SAGA_ID))
                    or message.correlation_id
                    or "",
                    reason=reason,
                    queue=_text(headers.get(names.HEADER_DEAD_LETTER_QUEUE)),
                    hostile=_text(headers.get(chaos.HOSTILE_HEADER)),
                )
            )
            await message.ack()
    return found


def _text(value: object) -> str:
    """A header value as text (AMQP tables carry strings as bytes or str)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


async def _state(store: SagaStore, saga_id: str) -> SagaState | None:
    record = await store.load(saga_id)
    return None if record is None else record.state


def report_json(report: Report) -> str:
    """The report as JSON (checks and figures)."""
    return json.dumps(
        {"ok": report.ok, "checks": [asdict(c) for c in report.checks], **report.figures},
        indent=2,
        default=str,
    )
