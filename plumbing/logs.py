"""Structured logging: one JSON line per event, with saga id, step and correlation id bound.

Handlers bind ``saga_id``, ``saga_type``, ``step``, ``message_id`` and ``correlation_id`` once
per message through contextvars, so every line a message causes carries them. Event names are
snake_case past tense (``message_dead_lettered``).
"""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def configure_logging(level: str = "info", *, json: bool = True) -> None:
    """Route structlog to stderr at ``level``, as JSON lines or for a human console."""
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    # aio-pika and aiormq log through the standard library.
    logging.basicConfig(level=max(_LEVELS[level], logging.WARNING), stream=sys.stderr)
