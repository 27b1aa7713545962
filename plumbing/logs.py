"""Structured logging: one JSON object per line, from our code and from every library.

Handlers bind ``saga_id``, ``saga_type``, ``step``, ``message_id`` and ``correlation_id`` once
per message through contextvars, so every line a message causes carries them. Event names are
snake_case past tense (``message_dead_lettered``).

aio-pika, aiormq, asyncio, asyncpg and PyMongo log through the standard library; their records
go through structlog's :class:`~structlog.stdlib.ProcessorFormatter` with the same processors,
so a broker restart produces JSON lines too, never plain text. Exceptions are a structured
``exception`` field (frames as a list), not a multi-line traceback, and an exception that
escapes the program is logged the same way before the process exits.
"""

from __future__ import annotations

import logging
import sys
from types import TracebackType

import structlog
from structlog.types import Processor

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

_LIBRARY_FLOOR = logging.WARNING
"""Libraries chat at info and debug (aiormq logs every frame at debug): warnings and up only."""


def configure_logging(level: str = "info", *, json: bool = True) -> None:
    """Send structlog and the standard library's logging to stderr at ``level``.

    With ``json`` every line is one JSON object; otherwise lines are rendered for a human.
    """
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
        # Frames without their locals: a local can hold a password, and they bloat every line.
        exceptions: list[Processor] = [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        ]
    else:
        renderer = structlog.dev.ConsoleRenderer()
        exceptions = []  # the console renderer prints tracebacks itself
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *exceptions, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *exceptions,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(_LEVELS[level], _LIBRARY_FLOOR))
    logging.captureWarnings(True)
    if json:
        sys.excepthook = _log_uncaught


def _log_uncaught(
    kind: type[BaseException], error: BaseException, traceback: TracebackType | None
) -> None:
    """Log an exception that ends the program as one JSON line instead of a traceback."""
    structlog.get_logger("saga").critical("uncaught_exception", exc_info=(kind, error, traceback))


def quiet_unless_configured() -> None:
    """Configure warnings-only console logging, unless the application configured structlog.

    Unconfigured, structlog prints every debug line; a test that runs the harness wants only
    what went wrong.
    """
    if not structlog.is_configured():
        configure_logging("warning", json=False)
