"""The ``saga`` command line: demo, daemons, operator commands, schema and topology.

Every failure an operator can cause (a bad setting, an unreachable store or broker, an unknown
saga, an argument out of range) ends with one line on stderr and exit status 2, never a
traceback. Arguments are checked before anything connects, and what an error echoes of the
user's input has its control characters escaped: a pasted ``\x1b[2J`` is shown, not obeyed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from plumbing.daemons import event_loop_factory
from plumbing.errors import SagaError

EXIT_USAGE = 2
EXIT_SAGA_FAILED = 1
"""``saga start --wait``: the saga failed or got stuck."""
EXIT_TIMEOUT = 3
"""Whatever was waited for did not happen in time (``saga start --timeout``)."""


REASON_LIMIT = 500
"""Characters in an operator's ``--reason``: it is kept in the saga's history."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors never echo a control character the user typed."""

    def error(self, message: str) -> NoReturn:
        """Print the usage and ``message`` (escaped), and exit with status 2."""
        super().error(printable(message))


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (``\x1b``, ``\n``, ``\u2028``).

    An error that echoes user input then stays one line and cannot drive the terminal.
    """
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="saga", description="Saga orchestrator over RabbitMQ: run, operate and inspect sagas."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the order saga three ways and print the timelines")
    demo.add_argument("--json", action="store_true", help='print {"sagas": [...]} instead')

    schema = sub.add_parser("schema", help="print the message schemas (AsyncAPI 3 by default)")
    schema.add_argument("--format", choices=("asyncapi", "jsonschema"), default="asyncapi")
    schema.add_argument(
        "--app", help="MODULE:ATTR whose contracts to export (default: the example order app)"
    )

    for name, text in (
        ("orchestrator", "run the orchestrator daemon"),
        ("participant", "run a participant service"),
    ):
        daemon = sub.add_parser(name, help=text)
        daemon.add_argument("--app", help="MODULE:ATTR (default: $SAGA_APP)")

    start = sub.add_parser(
        "start",
        help="start a saga and wait until the orchestrator accepts it (idempotent on --id)",
    )
    start.add_argument("saga_type", type=saga_type)
    start.add_argument("--id", required=True, dest="saga_id", type=new_saga_id)
    start.add_argument("--data", required=True, help="the saga's data as a JSON object")
    start.add_argument(
        "--traceparent",
        type=traceparent,
        help="W3C trace context to continue (default: a new trace)",
    )
    start.add_argument(
        "--version", type=positive_int, help="the definition version to run (default: the newest)"
    )
    waiting = start.add_mutually_exclusive_group()
    waiting.add_argument(
        "--wait", action="store_true", help="wait until the saga ends and print its outcome"
    )
    waiting.add_argument(
        "--no-wait", action="store_true", help="only hand the request to the broker"
    )
    start.add_argument(
        "--timeout", type=positive_float, default=60.0, help="seconds to wait (default 60)"
    )
    start.add_argument("--json", action="store_true", help="print the outcome as JSON")

    ls = sub.add_parser("ls", help="list sagas from the store")
    _add_filter(ls, bulk=False)
    ls.add_argument("--limit", type=positive_int, default=50, help="at most this many (50)")
    ls.add_argument("--json", action="store_true")

    show = sub.add_parser("show", help="show one saga: data, step results, errors, timeline")
    show.add_argument("saga_id", type=saga_id)
    show.add_argument("--json", action="store_true")

    _add_parked(sub)
    _add_console(sub)

    _add_actions(sub)

    watch = sub.add_parser("watch", help="stream lifecycle events as they are published")
    watch.add_argument("--type", dest="saga_type", type=saga_type, help="only sagas of this type")
    watch.add_argument("--event", type=event_name, help="only this event, e.g. SagaFailed")
    watch.add_argument("--json", action="store_true", help="one JSON object per event")
    watch.add_argument("--count", type=positive_int, help="stop after this many events")

    topology = sub.add_parser("topology", help="print (or declare) the RabbitMQ topology")
    topology.add_argument("--app", help="MODULE:ATTR (default: $SAGA_APP)")
    topology.add_argument("--declare", action="store_true", help="declare it on $SAGA_AMQP_URL")
    return parser


def _add_actions(sub: Any) -> None:
    """``saga retry|abort|resolve|resume``."""
    for name, text in (
        ("retry", "re-drive a stuck saga (send its failing compensation again)"),
        ("abort", "stop a running saga and compensate it now"),
        ("resolve", "mark a stuck compensation as done by hand and carry on"),
        ("resume", "carry a held saga on (after its definition is back or its cause is fixed)"),
    ):
        action = sub.add_parser(name, help=text)
        action.add_argument(
            "--app", help="MODULE:ATTR of the saga definitions (default: $SAGA_APP)"
        )
        if name == "resume":
            action.add_argument("saga_id", type=saga_id)
            action.add_argument(
                "--to-version",
                type=positive_int,
                help="move the saga to this version of its definition first (a migration)",
            )
            continue
        action.add_argument(
            "saga_id",
            nargs="?",
            type=saga_id,
            help="the saga; or give --status/--type to act on many",
        )
        action.add_argument(
            "--by", help="the operator's name, recorded in the saga's history (default: $USER)"
        )
        if name in ("abort", "resolve"):
            action.add_argument(
                "--reason", type=reason, default=None, help="recorded in the saga's history"
            )
        _add_filter(action, bulk=True)
        action.add_argument(
            "--yes", action="store_true", help="act on every matching saga without asking"
        )
        action.add_argument(
            "--timeout",
            type=positive_float,
            default=30.0,
            help="seconds to wait for the orchestrator daemon to answer (30), with a broker",
        )


def _add_parked(sub: Any) -> None:
    """``saga parked ls|show|replay|discard``."""
    parked = sub.add_parser("parked", help="messages parked in saga.parked: list, show, replay")
    parked_sub = parked.add_subparsers(dest="parked_command", required=True, metavar="ACTION")
    parked_ls = parked_sub.add_parser("ls", help="list parked messages, oldest first")
    parked_ls.add_argument("--limit", type=positive_int, default=100, help="at most (100)")
    parked_ls.add_argument("--json", action="store_true")
    for name, text in (
        ("show", "show a parked message: why it was parked, its headers and body"),
        ("replay", "send a parked message back to the queue it was parked from"),
        ("discard", "delete a parked message for good"),
    ):
        one = parked_sub.add_parser(name, help=text)
        one.add_argument("message_id", help="the id `saga parked ls` shows")
        if name == "show":
            one.add_argument("--json", action="store_true")


def _add_console(sub: Any) -> None:
    """``saga console``."""
    console = sub.add_parser("console", help="serve the operator console: HTTP API and page")
    console.add_argument("--app", help="MODULE:ATTR of the saga definitions (default: $SAGA_APP)")
    console.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine)"
    )
    console.add_argument("--port", type=int, default=8474, help="port (default 8474; 0: any)")
    console.add_argument(
        "--apply-here",
        action="store_true",
        help="apply actions in this process (counted on its /metrics), not through the daemon",
    )


def _add_filter(parser: argparse.ArgumentParser, *, bulk: bool) -> None:
    """The options that select sagas: ``saga ls`` and the bulk form of the actions."""
    also = " (with no SAGA_ID: act on every matching saga)" if bulk else ""
    parser.add_argument("--status", help="only sagas in this status" + also)
    parser.add_argument(
        "--type", dest="saga_type", type=saga_type, help="only sagas of this type" + also
    )
    parser.add_argument(
        "--version", type=positive_int, help="only sagas running this definition version"
    )
    parser.add_argument(
        "--step", type=step_name, help="only sagas on this step, forward or compensating"
    )
    parser.add_argument("--id-prefix", help="only sagas whose id starts with this")
    if not bulk:
        parser.add_argument("--held", action="store_true", help="only held sagas")


def positive_int(text: str) -> int:
    """An argument that must be a whole number from 1 up."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: give 1 or more")
    return value


def positive_float(text: str) -> float:
    """An argument that must be a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not allowed: give more than 0")
    if math.isinf(value):
        raise argparse.ArgumentTypeError(f"{value:g} is not allowed: give a finite number")
    return value


def saga_type(text: str) -> str:
    """An argument that names a saga type."""
    return _definition_name(text, "saga type")


def step_name(text: str) -> str:
    """An argument that names a step."""
    return _definition_name(text, "step")


def _definition_name(text: str, what: str) -> str:
    """``text`` if it follows the definitions' naming rule, else a sentence saying the rule."""
    from orchestrator.definition import NAME_RULE, is_name

    if not is_name(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a {what} name: use {NAME_RULE}")
    return text


def new_saga_id(text: str) -> str:
    """An argument that is the id of a saga to start: what a start request accepts."""
    from contracts.messages import SAGA_ID_LIMIT, SAGA_ID_PATTERN

    if len(text) > SAGA_ID_LIMIT or not re.fullmatch(SAGA_ID_PATTERN, text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a saga id: use letters, digits and . _ : @ # + = ~ / - "
            f"(no spaces), starting with a letter or a digit, at most {SAGA_ID_LIMIT} characters"
        )
    return text


def saga_id(text: str) -> str:
    """An argument that is the id of an existing saga (older ones may predate the id rules)."""
    from contracts.messages import SAGA_ID_LIMIT

    if not text or len(text) > SAGA_ID_LIMIT:
        raise argparse.ArgumentTypeError(
            f"a saga id has 1 to {SAGA_ID_LIMIT} characters, not {len(text)}"
        )
    return text


def event_name(text: str) -> str:
    """An argument that names a lifecycle event."""
    from contracts.events import EventName

    known = [event.value for event in EventName]
    if text not in known:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a lifecycle event; use one of {', '.join(sorted(known))}"
        )
    return text


def traceparent(text: str) -> str:
    """An argument that is a W3C ``traceparent`` header value."""
    from plumbing import tracing

    if not tracing.valid(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a W3C traceparent; it looks like "
            "00-<32 hex digits>-<16 hex digits>-<2 hex digits>, neither id all zeros"
        )
    return text


def reason(text: str) -> str:
    """An argument kept in a saga's history: printable, bounded."""
    if len(text) > REASON_LIMIT:
        raise argparse.ArgumentTypeError(
            f"it has {len(text)} characters; at most {REASON_LIMIT} are kept"
        )
    if not text.isprintable():
        raise argparse.ArgumentTypeError(
            f"{text!r} holds control characters or line breaks; give one line of text"
        )
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``saga`` console script."""
    args = _parser().parse_args(argv)
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            return runner.run(_dispatch(args))
    except SagaError as e:
        print(f"saga {args.command}: {printable(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except TimeoutError as e:
        print(f"saga {args.command}: {printable(str(e)) or 'timed out'}", file=sys.stderr)
        return EXIT_TIMEOUT
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`saga schema | head`): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


async def _dispatch(args: argparse.Namespace) -> int:
    from orchestrator import commands

    handlers: dict[str, Any] = {
        "demo": commands.demo,
        "schema": commands.schema,
        "orchestrator": commands.orchestrator,
        "participant": commands.participant,
        "start": commands.start,
        "ls": commands.ls,
        "show": commands.show,
        "retry": commands.retry,
        "abort": commands.abort,
        "resolve": commands.resolve,
        "resume": commands.resume,
        "parked": commands.parked,
        "console": commands.console,
        "topology": commands.topology,
        "watch": commands.watch,
    }
    result: int = await handlers[args.command](args)
    return result


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON."""
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


if __name__ == "__main__":
    sys.exit(main())
