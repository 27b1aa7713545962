"""How the daemons start: a server that is down is waited for, a mistake is one sentence.

Each daemon runs as an operator runs it, ``saga orchestrator`` or ``saga participant`` in a
fresh interpreter with only the ``SAGA_*`` settings the test gives. A broker or store that is
down is a closed port (nothing listens on port 1) or, for one that comes up while the daemon
waits, a :class:`~tests.support.late_server.LateServer` in front of the real one.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from orchestrator.processes import Daemon, free_port, http_status
from tests.support.late_server import LateServer

APP = "examples.order_fulfillment:app"
PAYMENT = "examples.order_fulfillment:payment"
DOWN = "amqp://guest:guest@127.0.0.1:1/"
"""A broker that is down: nothing listens on port 1."""


def saga(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``saga ARGS`` with only the given SAGA_* settings and no log output below critical."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        env={**clean, "SAGA_LOG_LEVEL": "critical", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def one_sentence(done: subprocess.CompletedProcess[str], command: str) -> str:
    """The one line a failed daemon printed, after checking it is all it printed."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"saga {command}: ")
    return lines[0]


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        pytest.param(
            ("orchestrator", "--app", APP),
            {"SAGA_AMQP_URL": DOWN},
            "SAGA_STORE_URL is memory:// while the broker is shared: a restart or a second "
            "replica would not have the sagas this process keeps",
            id="orchestrator-memory-store",
        ),
        pytest.param(
            ("participant", "--app", PAYMENT),
            {"SAGA_AMQP_URL": DOWN},
            "SAGA_IDEMPOTENCY_URL is memory:// while the broker is shared",
            id="participant-memory-store",
        ),
        pytest.param(
            ("orchestrator", "--app", APP),
            {"SAGA_AMQP_URL": DOWN, "SAGA_ALLOW_MEMORY_STORE": "1", "SAGA_STARTUP_WAIT": "1"},
            "cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:1/",
            id="orchestrator-broker-down",
        ),
        pytest.param(
            ("participant", "--app", PAYMENT),
            {"SAGA_AMQP_URL": DOWN, "SAGA_ALLOW_MEMORY_STORE": "1", "SAGA_STARTUP_WAIT": "1"},
            "cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:1/",
            id="participant-broker-down",
        ),
        pytest.param(
            ("orchestrator", "--app", APP),
            {
                "SAGA_AMQP_URL": DOWN,
                "SAGA_STORE_URL": "postgresql://ops:s3cret@127.0.0.1:1/saga",
                "SAGA_STARTUP_WAIT": "0",
            },
            "PostgreSQL at postgresql://ops:***@127.0.0.1:1/saga is unavailable",
            id="orchestrator-store-down",
        ),
        pytest.param(
            ("participant", "--app", PAYMENT),
            {
                "SAGA_AMQP_URL": DOWN,
                "SAGA_IDEMPOTENCY_URL": "postgresql://ops:s3cret@127.0.0.1:1/saga",
                "SAGA_STARTUP_WAIT": "0",
            },
            "PostgreSQL at postgresql://ops:***@127.0.0.1:1/saga is unavailable",
            id="participant-store-down",
        ),
        pytest.param(
            ("participant", "--app", PAYMENT),
            {
                "SAGA_AMQP_URL": DOWN,
                "SAGA_IDEMPOTENCY_URL": "mongodb://127.0.0.1:1/saga",
                "SAGA_STARTUP_WAIT": "0",
            },
            "MongoDB at mongodb://127.0.0.1:1/saga is unavailable",
            id="participant-mongodb-without-server",
        ),
        pytest.param(
            ("participant", "--app", "examples.nowhere:payment"),
            {"SAGA_AMQP_URL": DOWN},
            "cannot import 'examples.nowhere' for the participant service",
            id="unknown-module",
        ),
        pytest.param(
            ("participant", "--app", APP),
            {"SAGA_AMQP_URL": DOWN},
            "is a App, not a participants.Participant (did you mean `saga orchestrator`?)",
            id="participant-given-the-app",
        ),
        pytest.param(
            ("orchestrator", "--app", APP),
            {"SAGA_AMQP_URL": DOWN, "SAGA_STARTUP_WAIT": "soon"},
            "SAGA_STARTUP_WAIT is invalid",
            id="bad-setting",
        ),
    ],
)
def test_a_start_up_failure_is_one_sentence_and_status_2(
    args: tuple[str, ...], env: dict[str, str], expected: str
) -> None:
    done = saga(*args, **env)
    assert expected in one_sentence(done, args[0])
    assert "s3cret" not in done.stderr


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.mark.parametrize(("command", "target"), [("orchestrator", APP), ("participant", PAYMENT)])
def test_a_probe_port_taken_names_the_setting(command: str, target: str, taken_port: int) -> None:
    done = saga(
        command,
        "--app",
        target,
        SAGA_AMQP_URL=DOWN,
        SAGA_ALLOW_MEMORY_STORE="1",
        SAGA_HTTP_PORT=str(taken_port),
    )
    sentence = one_sentence(done, command)
    assert f"cannot serve /metrics, /healthz and /readyz on 127.0.0.1:{taken_port}" in sentence
    assert "set SAGA_HTTP_PORT to a free port" in sentence


def contents(log: Path) -> str:
    """What the daemon logged so far (for a failing assertion)."""
    return log.read_text()


def events(log: Path, name: str) -> list[dict[str, object]]:
    """The JSON log lines of ``log`` whose event is ``name``."""
    found = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == name:
                found.append(entry)
    return found


async def until_logged(daemon: Daemon, log: Path, name: str, count: int) -> None:
    """Wait until ``log`` holds ``count`` lines of event ``name``; fail if the daemon exits."""
    async with asyncio.timeout(60):
        while len(events(log, name)) < count:
            assert daemon.process is not None
            assert daemon.process.returncode is None, contents(log)
            await asyncio.sleep(0.1)


def behind(url: str, late: LateServer) -> str:
    """``url`` with its host and port replaced by the late server's (credentials kept)."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{late.port}" if credentials else f"127.0.0.1:{late.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def target(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


async def waits_then_serves(daemon: Daemon, log: Path, late: LateServer, waiting_for: str) -> None:
    """The daemon waits (logged, not ready) while ``late`` is closed, and serves once open."""
    try:
        await daemon.start()
        await until_logged(daemon, log, "startup_waiting", 2)
        waits = events(log, "startup_waiting")
        assert {entry["waiting_for"] for entry in waits} == {waiting_for}
        assert [entry["retry_in"] for entry in waits[:2]] == [0.5, 1.0]  # backing off
        assert await http_status(daemon.port, "/healthz") == 200
        assert await http_status(daemon.port, "/readyz") == 503
        await late.open()
        await daemon.wait_ready(within=60)
        assert events(log, "startup_reached")[0]["reached"] == waiting_for
    finally:
        assert await daemon.stop() == 0, contents(log)


@pytest.mark.rabbitmq
async def test_a_participant_started_before_the_broker_waits_for_it(
    vhost_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "payment.log"
    port = free_port()
    async with LateServer(*target(vhost_url, 5672)) as late:
        env = {
            **os.environ,
            "SAGA_AMQP_URL": behind(vhost_url, late),
            "SAGA_ALLOW_MEMORY_STORE": "1",
            "SAGA_HTTP_PORT": str(port),
            "SAGA_LOG_LEVEL": "info",
        }
        daemon = Daemon("payment", ("participant", "--app", PAYMENT), env, port, log)
        await waits_then_serves(daemon, log, late, "RabbitMQ")


@pytest.mark.rabbitmq
@pytest.mark.postgres
async def test_the_orchestrator_started_before_its_store_waits_for_it(
    vhost_url: str, database_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "orchestrator.log"
    port = free_port()
    async with LateServer(*target(database_url, 5432)) as late:
        env = {
            **os.environ,
            "SAGA_AMQP_URL": vhost_url,
            "SAGA_STORE_URL": behind(database_url, late),
            "SAGA_HTTP_PORT": str(port),
            "SAGA_LOG_LEVEL": "info",
        }
        daemon = Daemon("orchestrator", ("orchestrator", "--app", APP), env, port, log)
        await waits_then_serves(daemon, log, late, "the saga store")
