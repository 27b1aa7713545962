"""What each ``saga`` subcommand does (the parser lives in :mod:`orchestrator.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from contracts import names
from contracts.events import LifecycleEvent, lifecycle_event_adapter
from contracts.messages import StartSaga
from orchestrator import demo as demos
from orchestrator.cli import EXIT_SAGA_FAILED, print_json
from orchestrator.engine import OperatorAbort, OperatorResolve, OperatorRetry
from orchestrator.loader import load_app
from orchestrator.runtime import OperatorAction, Orchestrator
from orchestrator.settings import Settings
from orchestrator.state import SagaState, SagaStatus
from orchestrator.store import SagaFilter, SagaStore
from orchestrator.stores import open_store
from plumbing import tracing
from plumbing.clock import SystemClock
from plumbing.codec import start_message
from plumbing.delays import DelayLadder
from plumbing.errors import ConfigError, PublishFailed, SagaNotFound
from plumbing.logs import configure_logging
from plumbing.settings import load_settings
from plumbing.topology import Topology, client_topology, orchestrator_topology
from plumbing.transport import Outgoing
from plumbing.urls import redact_url


def _quiet_settings() -> Settings:
    settings = load_settings(Settings)
    configure_logging("warning", json=settings.log_format.value == "json")
    return settings


async def demo(args: argparse.Namespace) -> int:
    """``saga demo``: the order saga three ways."""
    settings = _quiet_settings()
    if settings.amqp_url:
        from orchestrator.demo_rabbitmq import run_with_processes

        states = await run_with_processes(settings)
    else:
        states = await demos.run_embedded()
    if args.json:
        demos.render_json(states, sys.stdout)
    else:
        demos.render_text(states, sys.stdout)
    return 0


async def schema(args: argparse.Namespace) -> int:
    """``saga schema``: AsyncAPI 3 (or a JSON Schema bundle) of every message."""
    from contracts.schema import asyncapi_document, json_schema_bundle

    if args.format == "jsonschema":
        print_json(json_schema_bundle())
    else:
        print_json(asyncapi_document(version=_package_version()))
    return 0


def _package_version() -> str:
    try:
        return version("saga-orchestrator")
    except PackageNotFoundError:
        return "0+unknown"


async def orchestrator(args: argparse.Namespace) -> int:
    """``saga orchestrator``: the daemon."""
    from orchestrator.daemon import run_orchestrator

    settings = load_settings(Settings)
    configure_logging(settings.log_level, json=settings.log_format.value == "json")
    app = load_app(args.app or settings.app, settings.step_timeouts)
    await run_orchestrator(app, settings)
    return 0


async def participant(args: argparse.Namespace) -> int:
    """``saga participant``: a participant service."""
    # The CLI is the one place that knows both sides: a participant never loads the engine.
    from participants.daemon import load_participant, run_participant
    from participants.settings import ParticipantSettings

    settings = load_settings(ParticipantSettings)
    configure_logging(settings.log_level, json=settings.log_format.value == "json")
    service = load_participant(args.app or settings.app)
    await run_participant(service, settings)
    return 0


async def start(args: argparse.Namespace) -> int:
    """``saga start``: ask the orchestrator to start a saga; wait for its answer (and end)."""
    from orchestrator.client import SagaClient
    from plumbing.daemons import rabbit_transport

    settings = _quiet_settings()
    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--data is not JSON: {e.msg} at character {e.pos}") from e
    if not isinstance(data, dict):
        raise ConfigError("--data must be a JSON object")
    traceparent = tracing.continue_or_start(args.traceparent)
    transport = rabbit_transport(settings)
    if args.no_wait:
        request = StartSaga(
            saga_type=args.saga_type,
            saga_id=args.saga_id,
            data=data,
            version=args.version,
            traceparent=traceparent,
        )
        try:
            await transport.declare(client_topology(settings.queue_policy))
            await transport.publish(start_message(request, SystemClock().now()))
        finally:
            await transport.close()
        print(
            f"start request for {args.saga_type} {args.saga_id} confirmed by the broker "
            f"(trace {tracing.trace_id(traceparent)}); not waiting for the orchestrator"
        )
        return 0
    client = SagaClient(
        settings.amqp_url or "",
        answer_timeout=args.timeout,
        policy=settings.queue_policy,
        transport=transport,
    )
    async with client:
        handle = await client.start(
            args.saga_type, args.saga_id, data, version=args.version, traceparent=traceparent
        )
        said = "already started" if handle.status.value == "already_started" else "started"
        print(f"saga {args.saga_id} {said} ({args.saga_type} v{handle.version})")
        if not args.wait:
            return 0
        outcome = await handle.result(timeout=args.timeout)
    if args.json:
        print_json(outcome.model_dump(mode="json"))
    else:
        print(f"saga {args.saga_id} {outcome.status}")
        if outcome.failure_reason:
            print(f"  reason: {outcome.failure_reason}")
        for step, result in outcome.results.items():
            print(f"  {step}: {json.dumps(result, sort_keys=True)}")
    return 0 if outcome.status == "completed" else EXIT_SAGA_FAILED


@asynccontextmanager
async def _store(settings: Settings) -> AsyncIterator[SagaStore]:
    store = open_store(settings.store_url, retention=settings.retention)
    try:
        await store.setup()
        yield store
    finally:
        await store.close()


async def ls(args: argparse.Namespace) -> int:
    """``saga ls``: sagas from the store, newest first."""
    settings = _quiet_settings()
    status = None
    if args.status:
        try:
            status = SagaStatus(args.status)
        except ValueError as e:
            known = ", ".join(s.value for s in SagaStatus)
            raise ConfigError(
                f"--status {args.status!r} is not a status; use one of {known}"
            ) from e
    async with _store(settings) as store:
        listed = await store.find(
            SagaFilter(
                status=status,
                saga_type=args.saga_type,
                version=args.version,
                held=True if args.held else None,
                limit=args.limit,
            )
        )
    if args.json:
        print_json({"sagas": [item.summary() for item in listed]})
        return 0
    if not listed:
        print(f"no sagas in {redact_url(settings.store_url)} match")
        return 0
    widths = (28, 22, 4, 13, 34)
    print(_row(("SAGA ID", "TYPE", "VER", "STATUS", "STEP", "UPDATED / HELD"), widths))
    for item in listed:
        state = item.state
        last = f"{state.updated_at:%Y-%m-%d %H:%M:%S}"
        if item.hold is not None:
            last = f"HELD: {item.hold.reason}"
        cells = (
            state.saga_id,
            state.saga_type,
            f"v{state.definition_version}",
            state.status.value,
            _current_step(state),
            last,
        )
        print(_row(cells, widths))
    return 0


def _row(cells: tuple[str, ...], widths: tuple[int, ...]) -> str:
    padded = [cell.ljust(width) for cell, width in zip(cells, widths, strict=False)]
    return " ".join([*padded, *cells[len(widths) :]])


def _current_step(state: SagaState) -> str:
    for step in reversed(state.steps):
        if step.status.value != "not_started":
            return f"{step.name} ({step.status.value})"
    return "-"


async def show(args: argparse.Namespace) -> int:
    """``saga show``: one saga's timeline."""
    settings = _quiet_settings()
    async with _store(settings) as store:
        record = await store.load(args.saga_id)
    if record is None:
        raise SagaNotFound(f"no saga has id {args.saga_id!r} in {redact_url(settings.store_url)}")
    if args.json:
        print_json(record.summary())
        return 0
    demos.render_timeline(record.state, sys.stdout)
    print(f"  definition: {record.state.saga_type} v{record.state.definition_version}")
    if record.hold is not None:
        print(f"  HELD since {record.hold.since:%Y-%m-%d %H:%M:%S}: {record.hold.reason}")
        if record.state.inbox:
            print(f"  {len(record.state.inbox)} reply(ies) kept for when it resumes")
    if record.outbox:
        print(f"  ({len(record.outbox)} message(s) waiting in the outbox)")
    return 0


class _OutboxOnly:
    """A transport for operator commands run without a broker: every publish is deferred.

    The action is saved with its outbox, and the daemon's outbox relay publishes it.
    """

    async def declare(self, topology: Topology) -> None:
        """Nothing to declare."""

    async def publish(self, message: Outgoing) -> None:
        """Leave the message in the outbox."""
        raise PublishFailed("no broker configured here; the daemon's outbox relay will send it")

    async def consume(self, *args: object, **kwargs: object) -> None:
        """Operator commands consume nothing."""
        raise NotImplementedError

    async def close(self) -> None:
        """Nothing to release."""


async def _operate(args: argparse.Namespace, action: OperatorAction | None) -> int:
    """Apply an operator action (``None``: resume) and say what it changed."""
    settings = _quiet_settings()
    app = load_app(args.app or settings.app, settings.step_timeouts)
    async with _store(settings) as store:
        if settings.amqp_url:
            from plumbing.daemons import rabbit_transport

            transport = rabbit_transport(settings)
        else:
            transport = _OutboxOnly()  # type: ignore[assignment]
        try:
            engine = Orchestrator(app, store, transport)
            before = await store.load(args.saga_id)
            if before is None:
                raise SagaNotFound(f"no saga has id {args.saga_id!r}")
            if action is None:
                after = await engine.resume(args.saga_id, to_version=args.to_version)
            else:
                after = await engine.operate(args.saga_id, action)
            record = await store.load(args.saga_id)
        finally:
            await transport.close()
    print(f"saga {args.saga_id}: {before.state.status.value} -> {after.status.value}")
    if record is not None and record.outbox:
        waiting = len(record.outbox)
        print(f"  {waiting} message(s) wait in the outbox; the orchestrator daemon sends them")
    return 0


async def resume(args: argparse.Namespace) -> int:
    """``saga resume``: carry a held saga on, optionally on another definition version."""
    return await _operate(args, None)


async def retry(args: argparse.Namespace) -> int:
    """``saga retry``: re-drive a stuck saga."""
    return await _operate(args, OperatorRetry())


async def abort(args: argparse.Namespace) -> int:
    """``saga abort``: compensate a running saga now."""
    return await _operate(args, OperatorAbort(args.reason or "aborted by an operator"))


async def resolve(args: argparse.Namespace) -> int:
    """``saga resolve``: mark a stuck compensation as done by hand."""
    return await _operate(args, OperatorResolve(args.reason or "resolved by an operator"))


async def topology(args: argparse.Namespace) -> int:
    """``saga topology``: print (or declare) exchanges, queues, bindings and the delay ladder."""
    from plumbing.daemons import rabbit_transport

    settings = load_settings(Settings)
    spec = args.app or settings.app
    services = load_app(spec).services if spec else frozenset[str]()
    wanted = orchestrator_topology(services, settings.queue_policy)
    if not args.declare:
        ladder = DelayLadder(levels=settings.delay_levels, queue_type=settings.queue_type)
        print_json((wanted + ladder.topology([names.TIMERS_QUEUE])).describe())
        return 0
    configure_logging("warning", json=False)
    transport = rabbit_transport(settings)
    try:
        await transport.declare(wanted)
    finally:
        await transport.close()
    full = transport.full_topology(wanted)
    print(
        f"declared {len(full.exchanges)} exchanges, {len(full.queues)} queues and "
        f"{len(full.bindings)} bindings on {redact_url(settings.amqp_url or '')}"
    )
    return 0


async def watch(args: argparse.Namespace) -> int:
    """``saga watch``: stream lifecycle events to the terminal as they are published."""
    from plumbing.daemons import rabbit_transport

    settings = _quiet_settings()
    transport = rabbit_transport(settings)
    key = f"{args.saga_type or '*'}.{args.event or '*'}"
    seen = 0
    try:
        connection = await transport.connect()
        channel = connection.channel()
        await channel.initialize()
        exchange = await channel.declare_exchange(names.EVENTS_EXCHANGE, "topic", durable=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key=key)
        print(f"watching {key} on {redact_url(settings.amqp_url or '')}", file=sys.stderr)
        async with queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                event = lifecycle_event_adapter.validate_json(message.body)
                if args.json:
                    print(event.model_dump_json(exclude_none=True), flush=True)
                else:
                    print(_event_line(event), flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    break
    finally:
        await transport.close()
    return 0


def _event_line(event: LifecycleEvent) -> str:
    subject = event.step or ""
    if event.attempt is not None:
        subject += f" #{event.attempt}"
    line = (
        f"{event.at:%H:%M:%S.%f}"[:-3]
        + f"  {event.saga_type:<20} {event.saga_id:<24} {event.event.value:<26} {subject:<24}"
    )
    return (line + (f" {event.detail}" if event.detail else "")).rstrip()
