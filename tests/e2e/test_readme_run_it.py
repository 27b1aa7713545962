"""The README's "Run it" block, pasted into a shell, runs two orders to their ends.

The block is read from README.md at test time (never copied here), written to a script and run
by ``bash`` exactly as it stands, with two exceptions that cannot be avoided on a machine whose
broker and database others use at the same time: the values of the block's own
``export SAGA_AMQP_URL=...`` and ``export SAGA_STORE_URL=...`` lines are replaced by a virtual
host and a database of this test's own. An environment variable could not do it, since the
block's ``export`` lines set them; every other line, ``SAGA_IDEMPOTENCY_URL=$SAGA_STORE_URL``
included, runs verbatim, with no other ``SAGA_*`` variable in the environment.

The shell starts in an empty directory whose ``.venv`` is the virtualenv running the tests, as
in a checkout where the README's install line made it: the block's first line activates it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import sys
from pathlib import Path

import pytest

from plumbing.daemons import ORCHESTRATOR_PORT
from tests.conftest import unavailable

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq, pytest.mark.postgres]

README = Path(__file__).resolve().parents[2] / "README.md"
OVERRIDDEN = ("SAGA_AMQP_URL", "SAGA_STORE_URL")
DAEMONS = ("orchestrator", "inventory", "payment", "shipping", "notification")


def run_it_block(readme: str) -> str:
    """The first ``sh`` block under the "## Run it" heading that starts daemons."""
    section = readme.split("\n## Run it\n", 1)[1].split("\n## ", 1)[0]
    for block in re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL):
        if "saga orchestrator" in block:
            return str(block)
    raise AssertionError("README.md's Run it section has no sh block that starts the daemons")


def pointed_at(block: str, values: dict[str, str]) -> str:
    """``block`` with the values of its ``export NAME=...`` lines for ``values`` replaced."""
    for name, value in values.items():
        line = re.compile(rf"^export {name}=\S+", flags=re.MULTILINE)
        block, replaced = line.subn(f"export {name}={shlex.quote(value)}", block)
        assert replaced == 1, f"the Run it block no longer exports {name} on one line"
    return block


def logged_events(log: Path) -> list[str]:
    """The events a daemon logged, in order (its log is JSON lines on stderr)."""
    lines = log.read_text().splitlines()
    return [str(json.loads(line)["event"]) for line in lines if line.startswith("{")]


def port_is_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port``."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


async def test_the_readme_run_it_block_completes_one_order_and_compensates_another(
    vhost_url: str, database_url: str, tmp_path: Path
) -> None:
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").is_file() or not (venv / "bin" / "saga").is_file():
        unavailable("a virtualenv with saga installed", f"{venv} has no bin/activate or bin/saga")
    # The block leaves the orchestrator on its default probe port; on a shared host that port
    # may be another run's, which says nothing about the README.
    assert port_is_free(ORCHESTRATOR_PORT), f"port {ORCHESTRATOR_PORT} is taken on this host"
    (tmp_path / ".venv").symlink_to(venv, target_is_directory=True)
    block = run_it_block(README.read_text())
    script = tmp_path / "run-it.sh"
    script.write_text(
        pointed_at(block, {"SAGA_AMQP_URL": vhost_url, "SAGA_STORE_URL": database_url})
    )
    env = {name: value for name, value in os.environ.items() if not name.startswith("SAGA_")}
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.pathsep.join(  # saga must come from the activation, not from our PATH
        part for part in env.get("PATH", "").split(os.pathsep) if Path(part) != venv / "bin"
    )
    shell = await asyncio.create_subprocess_exec(
        "bash",
        str(script),
        cwd=tmp_path,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # the daemons are its jobs: one process group to clean up
    )
    try:
        async with asyncio.timeout(240):
            out, err = await shell.communicate()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)  # only if something outlived the block
    stdout, stderr = out.decode(), err.decode()
    report = f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert shell.returncode == 0, report
    assert "Traceback" not in stderr, report

    assert "saga order-1 started (order_fulfillment v1)" in stdout, report
    assert "saga order-1 completed" in stdout, report
    assert "process_payment: " in stdout, report  # each step's result is printed
    assert "saga order-2 failed" in stdout, report
    assert "reason: step process_payment failed (PaymentDeclined)" in stdout, report
    # saga show order-2: the refusal, then the stock released.
    refused = stdout.index("SagaStepFailed             process_payment")
    released = stdout.index("SagaCompensationCompleted  reserve_inventory")
    assert refused < released, report

    # Five daemons on one host with the README's settings alone, each stopped by the block.
    for name in DAEMONS:
        log = tmp_path / f"{name}.log"
        assert "Traceback" not in log.read_text(), f"{name}.log:\n{log.read_text()}"
        expected = "orchestrator_stopped" if name == "orchestrator" else "participant_stopped"
        assert expected in logged_events(log), f"{name}.log:\n{log.read_text()}"
