"""What each ``saga`` subcommand does (the parser lives in :mod:`orchestrator.cli`)."""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from contracts import names
from contracts.events import LifecycleEvent, lifecycle_event_adapter
from contracts.messages import StartSaga
from orchestrator import demo as demos
from orchestrator.cli import EXIT_SAGA_FAILED, print_json
from orchestrator.definition import App
from orchestrator.engine import Action
from orchestrator.loader import load_app
from orchestrator.operations import Applied, Operations, OutboxOnly
from orchestrator.runtime import Orchestrator
from orchestrator.settings import Settings
from orchestrator.state import SagaState, SagaStatus
from orchestrator.store import SagaFilter, SagaStore
from orchestrator.stores import open_store
from plumbing import tracing
from plumbing.clock import SystemClock
from plumbing.codec import start_message
from plumbing.delays import DelayLadder
from plumbing.errors import ConfigError, SagaNotFound
from plumbing.logs import configure_logging
from plumbing.parked import ParkedMessage, ParkedQueue
from plumbing.settings import load_settings
from plumbing.topology import client_topology, orchestrator_topology
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
    """``saga schema``: AsyncAPI 3 (or a JSON Schema bundle) of every message, with the
    contracts of ``--app`` (default: the example order saga's)."""
    from contracts.schema import (
        EXAMPLE_CONTRACTS,
        AppContracts,
        asyncapi_document,
        json_schema_bundle,
    )

    if args.app:
        module = args.app.partition(":")[0]
        app = load_app(args.app)
        contracts = AppContracts(app.contracts, f"{module}.", f"the app {args.app}", _flows(app))
    else:
        from examples.order_fulfillment import app as example

        contracts = dataclasses.replace(EXAMPLE_CONTRACTS, sagas=_flows(example))
    if args.format == "jsonschema":
        print_json(json_schema_bundle(contracts))
    else:
        print_json(asyncapi_document(version=_package_version(), app=contracts))
    return 0


def _flows(app: App) -> dict[str, Any]:
    """Each definition's stages, parallel groups included, by ``type.vN``."""
    return {f"{saga.name}.v{saga.version}": saga.flow() for saga in app.sagas}


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


def _filter(args: argparse.Namespace, limit: int = 100) -> SagaFilter:
    """The sagas the selecting options name (``saga ls``, bulk actions)."""
    status = None
    if args.status:
        try:
            status = SagaStatus(args.status)
        except ValueError as e:
            known = ", ".join(s.value for s in SagaStatus)
            raise ConfigError(
                f"--status {args.status!r} is not a status; use one of {known}"
            ) from e
    return SagaFilter(
        status=status,
        saga_type=args.saga_type,
        version=args.version,
        held=True if getattr(args, "held", False) else None,
        step=args.step,
        id_prefix=args.id_prefix,
        limit=limit,
    )


async def ls(args: argparse.Namespace) -> int:
    """``saga ls``: sagas from the store, newest first."""
    settings = _quiet_settings()
    query = _filter(args, args.limit)
    async with _store(settings) as store:
        listed = await store.find(query)
    if args.json:
        print_json({"sagas": [item.summary() for item in listed]})
        return 0
    if not listed:
        print(f"no sagas in {redact_url(settings.store_url)} match")
        return 0
    widths = (28, 22, 4, 13, 44)
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
    step = state.current_step
    if step is None:
        return "-"
    undoing = "undo " if step.status.is_compensation else ""
    return f"{undoing}{step.name} ({step.status.value})"


async def show(args: argparse.Namespace) -> int:
    """``saga show``: one saga's data, step results and errors, and its timeline."""
    settings = _quiet_settings()
    async with _store(settings) as store:
        record = await store.load(args.saga_id)
    if record is None:
        raise SagaNotFound(f"no saga has id {args.saga_id!r} in {redact_url(settings.store_url)}")
    if args.json:
        print_json(record.summary())
        return 0
    state = record.state
    demos.render_timeline(state, sys.stdout)
    print(f"  definition: {state.saga_type} v{state.definition_version}")
    print(f"  on step: {_current_step(state)}")
    print(f"  data: {json.dumps(state.data, sort_keys=True)}")
    for step in state.steps:
        result = state.results.get(step.name)
        if result is not None:
            print(f"  result of {step.name}: {json.dumps(result, sort_keys=True)}")
    for step in state.steps:
        if step.error is not None:
            print(f"  error of {step.name} ({step.status.value}): {step.error.summary}")
    for step in state.steps:
        if step.heartbeat_at is not None:
            beat = f"+{demos.span(step.heartbeat_at - state.created_at)}"
            details = f": {step.heartbeat}" if step.heartbeat else ""
            print(f"  last heartbeat of {step.name} #{step.attempt} at {beat}{details}")
    if record.hold is not None:
        print(f"  HELD since {record.hold.since:%Y-%m-%d %H:%M:%S}: {record.hold.reason}")
        if state.inbox:
            print(f"  {len(state.inbox)} reply(ies) kept for when it resumes")
    if record.outbox:
        print(f"  ({len(record.outbox)} message(s) waiting in the outbox)")
    return 0


def operator_name(given: str | None) -> str:
    """Who is acting: ``--by``, else the login name (recorded in the saga's history)."""
    if given:
        return given
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "an operator"


@asynccontextmanager
async def _operations(args: argparse.Namespace) -> AsyncIterator[Operations]:
    """Operations on the configured store. With a broker, actions go to the orchestrator
    daemon (which applies and counts them); without one, they are applied here and what they
    send waits in the outbox for the daemon's relay."""
    settings = _quiet_settings()
    app = load_app(args.app or settings.app, settings.step_timeouts)
    async with _store(settings) as store:
        daemon = None
        if settings.amqp_url:
            from orchestrator.client import SagaClient
            from plumbing.daemons import rabbit_transport

            transport = rabbit_transport(settings)
            daemon = SagaClient(
                settings.amqp_url,
                answer_timeout=getattr(args, "timeout", 30.0),
                policy=settings.queue_policy,
                transport=rabbit_transport(settings),
            )
        else:
            transport = OutboxOnly()  # type: ignore[assignment]
        try:
            yield Operations(Orchestrator(app, store, transport), daemon)
        finally:
            if daemon is not None:
                await daemon.close()
            await transport.close()


def _said(applied: Applied) -> None:
    print(f"saga {applied.saga_id}: {applied.before.value} -> {applied.after.value}")
    if applied.unsent:
        waiting = applied.unsent
        print(f"  {waiting} message(s) wait in the outbox; the orchestrator daemon sends them")


async def _act(args: argparse.Namespace, action: Action) -> int:
    """Apply an action to one saga, or (no SAGA_ID) to every saga the filter matches."""
    by = operator_name(args.by)
    reason = getattr(args, "reason", None)
    if args.saga_id is not None:
        if args.status or args.saga_type or args.step or args.id_prefix or args.version:
            raise ConfigError("give a SAGA_ID or a filter (--status, --type, ...), not both")
        async with _operations(args) as operations:
            _said(await operations.act(args.saga_id, action, by=by, reason=reason))
        return 0
    if not (args.status or args.saga_type):
        raise ConfigError("give a SAGA_ID, or --status and/or --type to act on many sagas")
    query = _filter(args)
    async with _operations(args) as operations:
        saga_ids = await operations.matching(query)
        if not saga_ids:
            print("no sagas match")
            return 0
        described = _described(query)
        if not args.yes and not _confirmed(f"{action.value} {len(saga_ids)} {described}?"):
            print("nothing done")
            return EXIT_SAGA_FAILED
        outcome = await operations.bulk(saga_ids, action, by=by, reason=reason)
    for applied in outcome.applied:
        _said(applied)
    for refused in outcome.refused:
        print(f"saga {refused.saga_id}: refused: {refused.reason}")
    print(f"{action.value}: {len(outcome.applied)} applied, {len(outcome.refused)} refused")
    return 0 if not outcome.refused else EXIT_SAGA_FAILED


def _described(query: SagaFilter) -> str:
    words = [query.status.value if query.status else "", "saga(s)"]
    if query.saga_type:
        words.append(f"of type {query.saga_type}")
    if query.step:
        words.append(f"on step {query.step}")
    return " ".join(word for word in words if word)


def _confirmed(question: str) -> bool:
    """Ask on the terminal; anything but yes (or no terminal at all) is no."""
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


async def resume(args: argparse.Namespace) -> int:
    """``saga resume``: carry a held saga on, optionally on another definition version."""
    async with _operations(args) as operations:
        before = await operations.engine.store.load(args.saga_id)
        if before is None:
            raise SagaNotFound(f"no saga has id {args.saga_id!r}")
        after = await operations.engine.resume(args.saga_id, to_version=args.to_version)
    print(f"saga {args.saga_id}: {before.state.status.value} -> {after.status.value}")
    return 0


async def retry(args: argparse.Namespace) -> int:
    """``saga retry``: re-drive a stuck saga (or every stuck saga a filter matches)."""
    return await _act(args, Action.RETRY)


async def abort(args: argparse.Namespace) -> int:
    """``saga abort``: compensate a running saga now."""
    return await _act(args, Action.ABORT)


async def resolve(args: argparse.Namespace) -> int:
    """``saga resolve``: mark a stuck compensation as done by hand."""
    return await _act(args, Action.RESOLVE)


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


@asynccontextmanager
async def _parked_queue() -> AsyncIterator[ParkedQueue]:
    from plumbing.daemons import rabbit_transport

    settings = _quiet_settings()
    transport = rabbit_transport(settings)
    try:
        yield ParkedQueue(await transport.connect())
    finally:
        await transport.close()


async def parked(args: argparse.Namespace) -> int:
    """``saga parked ls|show|replay|discard``: the messages in ``saga.parked``."""
    async with _parked_queue() as queue:
        match args.parked_command:
            case "ls":
                found = await queue.list(args.limit)
                if args.json:
                    print_json({"parked": [message.summary() for message in found]})
                elif not found:
                    print(f"no messages are parked in {names.PARKED_QUEUE}")
                for message in [] if args.json else found:
                    when = "-" if message.parked_at is None else f"{message.parked_at:%m-%d %H:%M}"
                    print(
                        f"{message.message_id}  {when}  {message.queue or '?':<28} "
                        f"{message.saga_id or '-':<24} {message.reason}"
                    )
            case "show":
                message = await queue.get(args.message_id)
                if args.json:
                    print_json(message.summary(whole=True))
                else:
                    _print_parked(message)
            case "replay":
                message = await queue.replay(args.message_id)
                print(f"parked message {message.message_id} sent back to {message.queue}")
            case "discard":
                message = await queue.discard(args.message_id)
                print(f"parked message {message.message_id} discarded")
    return 0


def _print_parked(message: ParkedMessage) -> None:
    print(f"message {message.message_id}")
    print(f"  reason:    {message.reason}")
    print(f"  from:      {message.queue or '(unknown queue)'}")
    print(f"  saga:      {message.saga_id or '-'}   kind: {message.kind or '-'}")
    if message.parked_at is not None:
        print(f"  sent at:   {message.parked_at:%Y-%m-%d %H:%M:%S}")
    for key, value in sorted(message.headers.items()):
        print(f"  header {key}: {value}")
    try:
        body = json.dumps(json.loads(message.body), indent=2, sort_keys=True)
    except ValueError:
        body = message.text
    print("  body:")
    for line in body.splitlines():
        print(f"    {line}")


async def console(args: argparse.Namespace) -> int:
    """``saga console``: serve the operator console until interrupted."""
    import asyncio

    from orchestrator.console.auth import Access, parse_tokens

    settings = load_settings(Settings)
    configure_logging(settings.log_level, json=settings.log_format.value == "json")
    tokens = parse_tokens(
        settings.console_tokens.get_secret_value() if settings.console_tokens else None
    )
    access = Access.for_binding(args.host, tokens)
    try:
        from orchestrator.console.server import serve_console
    except ImportError as e:
        raise ConfigError(
            f"the console needs its extra ({e.name} is missing): "
            "pip install 'saga-orchestrator[console]'"
        ) from e
    app = load_app(args.app or settings.app, settings.step_timeouts)
    async with (
        _store(settings) as store,
        serve_console(
            app,
            store,
            access,
            host=args.host,
            port=args.port,
            amqp_url=settings.amqp_url,
            apply_here=args.apply_here,
        ) as url,
    ):
        print(f"console on {url}/ ({redact_url(settings.store_url)})", flush=True)
        await asyncio.Event().wait()  # until interrupted: Ctrl-C or SIGTERM ends the run
    return 0
