"""The chaos soak's short variant: two minutes of load and faults, then every invariant.

``python -m bench.soak --minutes 20`` is the long run (its figures are in the README); this
runs the same program for two minutes of load (about 350 sagas, one broker kill at the first
third, several replica kills, hostile messages), which with start-up, settling and draining
the delay ladder takes four to five minutes. Every invariant of :mod:`bench.soak.checks` must
hold; the report is the failure message, and is kept in the test's properties (JUnit XML)
either way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bench.soak.run import SoakConfig, run
from tests.conftest import unavailable
from tests.support.rabbit_nodes import rabbitmq_scripts

pytestmark = [
    pytest.mark.slow,
    pytest.mark.rabbitmq,
    pytest.mark.postgres,
    # About 5 minutes idle; the settling and draining waits inside bound the rest.
    pytest.mark.timeout(2400),
]


async def test_a_short_chaos_soak_keeps_every_invariant(
    postgres_url: str, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    if rabbitmq_scripts() is None:
        unavailable("rabbitmq-server", "its scripts are not installed for a private node")
    report = await run(
        SoakConfig(minutes=2.0, pg_admin_url=postgres_url, workdir=tmp_path, seed=11)
    )
    record_property("soak_report", report.text())
    assert report.ok, report.text()
    assert report.figures["faults"].get("kill-broker", 0) >= 1
    assert report.figures["faults"].get("kill-orchestrator", 0) >= 3
    assert sum(report.figures["hostile_sent"].values()) > 0
    assert report.figures["sagas"] >= 100
