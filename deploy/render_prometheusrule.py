"""Write deploy/k8s/prometheusrule.yaml from deploy/prometheus/alerts.yml.

alerts.yml is the one source of truth for the alert rules. Prometheus loads it as a rule file
(compose, systemd hosts); the Prometheus Operator gets the same groups wrapped in a
PrometheusRule. The groups are copied as text, comments included, so the manifest reads like
the rule file. tests/unit/test_deploy.py fails when the manifest is out of date.

    python deploy/render_prometheusrule.py           # rewrite the manifest
    python deploy/render_prometheusrule.py --check   # exit 1 when it is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
MANIFEST = DEPLOY / "k8s" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by deploy/render_prometheusrule.py: edit that
# file, then run the script. The rules are described and tested there (alerts.test.yml).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: saga-orchestrator
  labels:
    app.kubernetes.io/part-of: saga
spec:
"""


def render(alerts: str) -> str:
    """The PrometheusRule manifest whose spec is the rule file text ``alerts``."""
    lines = alerts.splitlines()
    # The file's opening comment talks about the file itself; it would mislead in the copy.
    while lines and (not lines[0].strip() or lines[0].startswith("#")):
        lines.pop(0)
    # Indenting every line alike keeps block scalars (the multi-line expressions) intact.
    body = "\n".join(f"  {line}" if line.strip() else "" for line in lines)
    return HEADER + body + "\n"


def main(argv: list[str] | None = None) -> int:
    """Rewrite the manifest, or with ``--check`` report whether it is current."""
    parser = argparse.ArgumentParser(description="Render the PrometheusRule from alerts.yml.")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the manifest differs; write nothing"
    )
    args = parser.parse_args(argv)
    expected = render(ALERTS.read_text(encoding="utf-8"))
    if args.check:
        current = MANIFEST.read_text(encoding="utf-8") if MANIFEST.exists() else ""
        if current != expected:
            sys.stderr.write(
                f"{MANIFEST} is out of date: run python deploy/render_prometheusrule.py\n"
            )
            return 1
        return 0
    MANIFEST.write_text(expected, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
