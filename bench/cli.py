"""``python -m bench``: the whole benchmark in one invocation, rows interleaved in repeats.

Each repeat runs every row once, in the same order, each in a fresh vhost and database with
fresh processes: the ceiling (bare aio-pika request/reply, without and with one TTL-queue
publish per request), the project with PostgreSQL stores, memory stores, two orchestrator
replicas on PostgreSQL, MongoDB-wire stores (when ``SAGA_BENCH_MONGO_URL`` or
``SAGA_TEST_MONGO_URL`` is set) and the optional peers (Celery, DBOS; ``pip install
'.[bench]'``). Medians are reported. Once per invocation, after the repeats: the deferred
timer row, the latency phase at half the PostgreSQL throughput and the RSS phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import shlex
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench import peers, procstat, report
from bench.ceiling_run import ceiling_latency, run_ceiling
from bench.context import DEFAULT_AMQP_URL, ROOT, Context, Options
from bench.driver import END_EVENTS
from bench.infra import Servers, server_versions
from bench.project import (
    RowSpec,
    latency_phase,
    percentiles,
    rss_phase,
    run_row,
    step_timeouts,
)

ALL_ROWS = (
    "ceiling",
    "ceiling+timer",
    "postgres",
    "memory",
    "postgres-x2",
    "postgres-ends",
    "mongo",
    "celery",
    "dbos",
    "timers",
    "latency",
    "rss",
)
RESULTS = ROOT / "bench" / "results"

QUICK = {
    "sagas": 200,
    "repeat": 1,
    "warmup": 20,
    "baseline": 3.0,
    "timer_sagas": 200,
    "timer_timeout": 30,
    "latency_seconds": 10.0,
    "rss_counts": "0,500",
    "profile_seconds": 15.0,
}
DEFAULTS = {
    "sagas": 2000,
    "repeat": 3,
    "warmup": 50,
    "baseline": 5.0,
    "timer_sagas": 800,
    "timer_timeout": 120,
    "latency_seconds": 30.0,
    "rss_counts": "0,1000,5000",
    "profile_seconds": 30.0,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=report.METHOD,
    )
    parser.add_argument("--sagas", type=int, help="sagas per row and repeat (default 2000)")
    parser.add_argument("--in-flight", type=int, default=100, help="sagas in flight (100)")
    parser.add_argument("--repeat", type=int, help="interleaved repeats (default 3)")
    parser.add_argument("--quick", action="store_true", help="a short run: 200 sagas, 1 repeat")
    parser.add_argument(
        "--rows",
        default=",".join(ALL_ROWS),
        help=f"comma list of rows and phases to run (default: all of {','.join(ALL_ROWS)})",
    )
    parser.add_argument("--warmup", type=int, help="unmeasured sagas before each row (50)")
    parser.add_argument("--baseline", type=float, help="idle seconds measured per row (5)")
    parser.add_argument(
        "--settle",
        type=float,
        default=11.0,
        help="seconds for PostgreSQL stats to flush: an idle backend reports after 10 s (11)",
    )
    parser.add_argument(
        "--timer-sagas",
        type=int,
        help="sagas of the timer row at most (800; fewer so the run ends before the first hop)",
    )
    parser.add_argument(
        "--timer-timeout",
        type=int,
        help="step timeout of the timer row, s (120: four ladder hops, like each default)",
    )
    parser.add_argument("--latency-seconds", type=float, help="open-loop phase length (30)")
    parser.add_argument("--rss-counts", help="sagas parked for the RSS phase (0,1000,5000)")
    parser.add_argument("--rss-stores", default="postgres,memory", help="(postgres,memory)")
    parser.add_argument(
        "--no-profile", action="store_true", help="do not profile the daemon with py-spy"
    )
    parser.add_argument("--profile-seconds", type=float, help="py-spy sampling time (30)")
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("SAGA_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        help="a database to connect to for creating and dropping the runs' databases",
    )
    parser.add_argument(
        "--mongo-url",
        default=os.environ.get("SAGA_BENCH_MONGO_URL") or os.environ.get("SAGA_TEST_MONGO_URL"),
    )
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def options_of(args: argparse.Namespace) -> Options:
    """The options as a frozen record."""
    rows = tuple(row.strip() for row in args.rows.split(",") if row.strip())
    unknown = [row for row in rows if row not in ALL_ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(ALL_ROWS)}")
    return Options(
        sagas=args.sagas,
        in_flight=args.in_flight,
        repeat=args.repeat,
        warmup=args.warmup,
        baseline=args.baseline,
        settle=args.settle,
        rows=rows,
        timer_sagas=args.timer_sagas,
        timer_timeout=args.timer_timeout,
        latency_seconds=args.latency_seconds,
        rss_counts=tuple(int(n) for n in str(args.rss_counts).split(",") if n.strip()),
        rss_stores=tuple(s.strip() for s in args.rss_stores.split(",") if s.strip()),
        profile=not args.no_profile,
        profile_seconds=args.profile_seconds,
        quick=args.quick,
    )


def versions() -> dict[str, str]:
    """Versions of Python and the client libraries."""
    found = {"python": platform.python_version()}
    for package in ("aio-pika", "aiormq", "asyncpg", "pymongo", "celery", "dbos", "py-spy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found


def project_rows(ctx: Context) -> list[RowSpec]:
    """The project rows of one repeat, in order."""
    wanted = ctx.options.rows
    rows = []
    if "postgres" in wanted:
        rows.append(RowSpec("postgres", "postgres"))
    if "memory" in wanted:
        rows.append(RowSpec("memory", "memory"))
    if "postgres-x2" in wanted:
        rows.append(RowSpec("postgres-x2", "postgres", replicas=2))
    if "postgres-ends" in wanted:
        # The lifecycle-event lever: only the outcome events a caller waits on are published.
        ends = ",".join(END_EVENTS)
        rows.append(RowSpec("postgres-ends", "postgres", env={"SAGA_PUBLISHED_EVENTS": ends}))
    if "mongo" in wanted and ctx.servers.mongo_url:
        rows.append(RowSpec("mongo", "mongo"))
    return rows


async def guarded(name: str, job: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any] | None:
    """Run one measurement; a failure is printed and recorded, never fatal to the rest."""
    started = time.perf_counter()
    print(f"- {name} ...", flush=True)
    try:
        figures = await job()
    except Exception as e:  # noqa: BLE001 - one broken row must not lose the others
        traceback.print_exc()
        print(f"  {name} FAILED: {e!r}", flush=True)
        return None
    rate = figures.get("sagas_per_s")
    extra = f": {rate:.1f} sagas/s" if isinstance(rate, float) else ""
    print(f"  {name} done in {time.perf_counter() - started:.0f} s{extra}", flush=True)
    return figures


def plan(ctx: Context, record: dict[str, Any]) -> tuple[list[str], list[RowSpec], list[str]]:
    """The ceiling, project and peer rows of each repeat; skipped ones noted in ``record``."""
    options = ctx.options
    rows: dict[str, dict[str, Any]] = record["rows"]
    ceiling_rows: list[str] = [n for n in ("ceiling", "ceiling+timer") if n in options.rows]
    specs = project_rows(ctx)
    peer_rows = [name for name in ("celery",) if name in options.rows]
    if "dbos" in options.rows:
        peer_rows += ["dbos-sync", "dbos-async"]
    for name in [*ceiling_rows, *(spec.name for spec in specs), *peer_rows]:
        rows[name] = {"runs": []}
    if "mongo" in options.rows and not ctx.servers.mongo_url:
        rows["mongo"] = {"skipped": "no SAGA_BENCH_MONGO_URL or SAGA_TEST_MONGO_URL given"}
    for name in peer_rows:
        reason = peers.unavailable(name)
        if reason:
            rows[name] = {"skipped": reason}
    runnable = [name for name in peer_rows if "skipped" not in rows[name]]
    return ceiling_rows, specs, runnable


async def run(ctx: Context, record: dict[str, Any]) -> None:
    """Every row and phase; fills ``record`` as it goes."""
    options = ctx.options
    rows: dict[str, dict[str, Any]] = record["rows"]
    ceiling_rows, specs, peer_rows = plan(ctx, record)
    profiled = not options.profile
    for repeat in range(1, options.repeat + 1):
        print(f"repeat {repeat} of {options.repeat}", flush=True)
        jobs: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = []
        for name in ceiling_rows:
            jobs.append((name, functools.partial(run_ceiling, ctx, name == "ceiling+timer")))
        for spec in specs:
            profile = not profiled and spec.name == "postgres"
            profiled = profiled or profile
            jobs.append((spec.name, functools.partial(run_row, ctx, spec, repeat, profile=profile)))
        for name in peer_rows:
            jobs.append((name, functools.partial(peers.run, name, ctx)))
        for name, job in jobs:
            figures = await guarded(name, job)
            if figures:
                if "profile" in figures:
                    record["profile"] = figures.pop("profile")
                rows[name]["runs"].append(figures)
                rows[name]["median"] = report.median_figures(rows[name]["runs"])
    await once_per_invocation(ctx, record)


async def once_per_invocation(ctx: Context, record: dict[str, Any]) -> None:
    """The timer row, the latency phase and the RSS phase."""
    options = ctx.options
    rows: dict[str, dict[str, Any]] = record["rows"]
    if "timers" in options.rows:
        timeout = options.timer_timeout
        name = f"postgres, timeouts {timeout}s"
        # Every ladder hop should fall after the run, so the window sees each timer's whole
        # journey: the run must end before the first hop (the timeout's highest bit).
        first_hop = 1 << (timeout.bit_length() - 1)
        peak = rows.get("postgres", {}).get("median", {}).get("sagas_per_s")
        sagas = options.timer_sagas
        if peak:
            sagas = max(min(sagas, int(0.7 * first_hop * peak)), 10)
        spec = RowSpec(
            name,
            "postgres",
            env={"SAGA_STEP_TIMEOUTS": step_timeouts(timeout)},
            sagas=sagas,
            deferred_window=timeout + 30.0,
        )
        figures = await guarded(name, functools.partial(run_row, ctx, spec, 1, profile=False))
        if figures:
            figures["hops_during_run"] = figures["seconds"] > first_hop
            record["deferred"] = {"row": name, "timeout": timeout, **figures.pop("deferred")}
            rows[name] = {"runs": [figures], "median": report.median_figures([figures])}
    if "latency" in options.rows:
        peak = rows.get("postgres", {}).get("median", {}).get("sagas_per_s")
        if peak:
            latency = await guarded("latency", functools.partial(latency_phase, ctx, peak / 2))
            if latency:
                record["latency"] = latency
                latency["floor"] = await latency_floor(ctx, rows, latency["target_rate"])
        else:
            record["notes"].append("latency phase skipped: no PostgreSQL row measured")
    if "rss" in options.rows:
        record["rss"] = []
        for store in options.rss_stores:
            result = await guarded(f"rss {store}", functools.partial(rss_phase, ctx, store))
            if result:
                record["rss"].append(result)


async def latency_floor(
    ctx: Context, rows: dict[str, dict[str, Any]], project_rate: float
) -> list[dict[str, Any]]:
    """The ceiling (with timers) open loop at half its own peak, and at the project's rate:
    reply -> next request, the floor of the project's reply -> next command."""
    peak = rows.get("ceiling+timer", {}).get("median", {}).get("sagas_per_s")
    rates = [("the project's rate", project_rate)]
    if peak:  # else no ceiling+timer row was measured: its half load is unknown
        rates.insert(0, ("the ceiling's half load", peak / 2))
    floor: list[dict[str, Any]] = []
    for label, rate in rates:
        result = await guarded(
            f"latency floor at {rate:.1f}/s", functools.partial(ceiling_latency, ctx, rate)
        )
        if result:
            gaps = result.pop("gaps_ms")
            floor.append({"label": label, "pairs": len(gaps), "ms": percentiles(gaps), **result})
    return floor


def render(record: dict[str, Any]) -> str:
    """Everything printed at the end."""
    parts = [
        f"command: {record['command']}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()),
        f"load average at start {record['load_start']}, at end {record['load_end']} "
        f"({record['cpus']} CPUs)",
        f"sagas per row {record['options']['sagas']}, in flight "
        f"{record['options']['in_flight']}, repeats {record['options']['repeat']}, "
        "10% declined at payment and compensated",
        "",
        report.main_table(record["rows"]),
        "",
        "publishes per step by kind (daemons only; timers = into the delay ladder)",
        report.publishes_table(record["rows"]),
    ]
    if statements := report.statements_table(record["rows"]):
        parts += ["", "store statements per step (asyncpg calls by daemon and verb)", statements]
    if writes := report.write_calls_table(record["rows"]):
        parts += ["", "write system calls per step, by process (/proc/<pid>/io syscw)", writes]
    if collections := report.collections_table(record["rows"]):
        parts += ["", "garbage collections during the run, by daemon", collections]
    if "deferred" in record:
        parts += ["", f"deferred timer cost ({record['deferred']['row']})"]
        parts.append(report.deferred_table(record["deferred"]))
        if (
            record["rows"]
            .get(record["deferred"]["row"], {})
            .get("median", {})
            .get("hops_during_run")
        ):
            parts.append("  note: the run outlasted the first ladder hop; some hops fell in it")
    if "latency" in record:
        parts += ["", "reply -> next command latency at half the PostgreSQL throughput"]
        parts.append(report.latency_table(record["latency"]))
    if record.get("rss"):
        parts += ["", "orchestrator RSS against sagas in flight"]
        parts.append(report.rss_table(record["rss"]))
    if "profile" in record:
        parts += ["", "orchestrator profile during the first PostgreSQL run"]
        parts.append(report.profile_table(record["profile"]))
    if record["notes"]:
        parts += ["", "notes:"] + [f"  {note}" for note in record["notes"]]
    parts += ["", report.METHOD]
    return "\n".join(parts)


async def amain(args: argparse.Namespace, argv: list[str]) -> int:
    """Run and report."""
    options = options_of(args)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir = RESULTS / "logs" / stamp
    workdir.mkdir(parents=True, exist_ok=True)
    servers = Servers(args.amqp_url, args.pg_url, args.mongo_url)
    broker = procstat.broker_pid(urlsplit(args.amqp_url).port or 5672)
    ctx = Context(options, servers, workdir, broker)
    record: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, "-m", "bench", *argv]),
        "started_at": stamp,
        "versions": {**versions(), **await server_versions(servers)},
        "cpus": os.cpu_count(),
        "load_start": [round(x, 2) for x in procstat.load_average()],
        "options": {k: getattr(options, k) for k in options.__dataclass_fields__},
        "rows": {},
        "notes": [],
    }
    if broker is None:
        record["notes"].append("no single beam.smp process found: broker CPU not measured")
    print(f"bench: results and logs in {workdir}", flush=True)
    try:
        await run(ctx, record)
    finally:
        record["load_end"] = [round(x, 2) for x in procstat.load_average()]
        output = RESULTS / f"bench-{stamp}.json"
        output.write_text(json.dumps(record, indent=2, default=str))
        print()
        print(render(record))
        print(f"\nJSON: {output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench``."""
    arguments = sys.argv[1:] if argv is None else argv
    return asyncio.run(amain(parse_args(arguments), arguments))
