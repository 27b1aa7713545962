"""Every line a daemon writes is one JSON object: ours, the libraries', and tracebacks too."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.processes import Daemon, free_port
from tests.integration.rabbit_support import rabbitmqctl

ROOT = Path(__file__).resolve().parents[2]


def json_lines(text: str | Path) -> list[dict[str, object]]:
    """Every line of ``text`` (or of the file it names) parsed as a JSON object; fails on the
    first line that is not."""
    where = f"{text.name}:" if isinstance(text, Path) else "line "
    lines = text.read_text() if isinstance(text, Path) else text
    parsed = []
    for number, line in enumerate(lines.splitlines(), start=1):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"{where}{number} is not JSON: {line[:300]!r}")
        assert isinstance(value, dict), f"{where}{number} is not a JSON object: {line!r}"
        parsed.append(value)
    return parsed


PROGRAM = """
import logging, warnings, structlog
from plumbing.logs import configure_logging

configure_logging("info", json=True)
structlog.get_logger("saga").info("saga_started", saga_id="s-1")
try:
    secret = "s3cret"
    raise ValueError("boom")
except ValueError:
    logging.getLogger("aiormq.connection").warning("reader failed\\nsecond line", exc_info=True)
    structlog.get_logger("saga").exception("handler_failed")
logging.getLogger("aio_pika").info("chatty library detail")
warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
raise RuntimeError("escaped")
"""


def test_library_records_warnings_and_crashes_are_json_without_locals() -> None:
    result = subprocess.run(
        [sys.executable, "-W", "always", "-c", PROGRAM],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    lines = json_lines(result.stderr)
    events = [line["event"] for line in lines]
    assert events[0] == "saga_started"
    assert "reader failed\nsecond line" in events  # a multi-line message stays one line
    assert "handler_failed" in events
    assert "chatty library detail" not in events  # libraries log warnings and up only
    assert any("deprecated thing" in str(event) for event in events)
    assert events[-1] == "uncaught_exception"
    library = next(line for line in lines if line.get("logger") == "aiormq.connection")
    assert isinstance(library["exception"], list)
    assert library["exception"][0]["exc_type"] == "ValueError"
    assert "s3cret" not in result.stderr  # frames come without their locals


@pytest.mark.rabbitmq
async def test_a_participant_through_dropped_connections_logs_only_json(
    vhost_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "payment.log"
    port = free_port()
    env = {
        **os.environ,
        "SAGA_AMQP_URL": vhost_url,
        "SAGA_HTTP_HOST": "127.0.0.1",
        "SAGA_HTTP_PORT": str(port),
        "SAGA_LOG_LEVEL": "info",
        "SAGA_ALLOW_MEMORY_STORE": "1",  # one process, and what it handles is not checked
    }
    daemon = Daemon(
        "payment", ("participant", "--app", "examples.order_fulfillment:payment"), env, port, log
    )
    vhost = vhost_url.rsplit("/", 1)[1]
    try:
        await daemon.start()
        await daemon.wait_ready(within=60)
        async with asyncio.timeout(60):
            # The broker drops the connection; aio-pika and aiormq report it and reconnect.
            while "aiormq" not in log.read_text():
                await asyncio.to_thread(
                    rabbitmqctl, "close_all_connections", "-p", vhost, "json log test"
                )
                await asyncio.sleep(0.5)
        await daemon.wait_ready(within=60)
    finally:
        assert await daemon.stop() == 0
    lines = json_lines(log.read_text())
    assert any(str(line.get("logger", "")).startswith("aiormq") for line in lines)
    assert lines[-1]["event"] == "participant_stopped"
