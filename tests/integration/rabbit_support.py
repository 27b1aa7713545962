"""Helpers for tests against the real RabbitMQ: a fresh virtual host per test, and a look inside.

A test on its own vhost (created and deleted with ``rabbitmqctl``) never meets messages from
another test or an earlier run under fixed names such as ``saga.timers`` or ``saga.parked``.
``SAGA_TEST_RABBITMQCTL`` gives the command to reach the broker's ``rabbitmqctl`` when it is
not local, e.g. ``docker exec <container> rabbitmqctl``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from tests.conftest import unavailable

RABBITMQCTL = shlex.split(os.environ.get("SAGA_TEST_RABBITMQCTL", "rabbitmqctl"))


def rabbitmqctl(*arguments: str) -> str:
    """Run ``rabbitmqctl`` and return its standard output."""
    result = subprocess.run(
        [*RABBITMQCTL, "-q", *arguments], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(arguments)} failed: {result.stderr.strip()}")
    return result.stdout


def queue_arguments(vhost: str) -> dict[str, dict[str, Any]]:
    """Every queue of ``vhost`` with its arguments, as the broker reports them."""
    rows = json.loads(
        rabbitmqctl("list_queues", "-p", vhost, "name", "arguments", "--formatter", "json")
    )
    return {row["name"]: {name: value for name, _, value in row["arguments"]} for row in rows}


def ready_messages(vhost: str, queue: str) -> int:
    """Messages ready for delivery in ``queue`` (not counting unacknowledged ones)."""
    for line in rabbitmqctl("list_queues", "-p", vhost, "name", "messages_ready").splitlines():
        name, _, count = line.rpartition("\t")
        if name == queue:
            return int(count)
    raise LookupError(f"no queue {queue!r} in vhost {vhost!r}")


def with_vhost(url: str, vhost: str) -> str:
    """``url`` pointing at ``vhost`` instead."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))


@contextlib.contextmanager
def temporary_vhost(amqp_url: str) -> Iterator[str]:
    """A fresh virtual host the URL's user may use; deleted afterwards with all it holds."""
    if RABBITMQCTL[0] == "rabbitmqctl" and shutil.which("rabbitmqctl") is None:
        unavailable("rabbitmqctl", "not on PATH (set SAGA_TEST_RABBITMQCTL to reach it)")
    name = f"saga-test-{uuid.uuid4().hex[:10]}"
    user = urlsplit(amqp_url).username or "guest"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        yield name
    finally:
        rabbitmqctl("delete_vhost", name)
