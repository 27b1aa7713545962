"""``python -m bench.soak``: the chaos soak's command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from bench.soak.run import SoakConfig, report_json, run
from plumbing.logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    """Run the soak; 0 when every invariant held, 1 when one broke."""
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=20.0, help="load and faults (20)")
    parser.add_argument("--rate", type=float, default=3.0, help="sagas started a second (3)")
    parser.add_argument("--in-flight", type=int, default=80, help="unfinished sagas at most (80)")
    parser.add_argument("--replicas", type=int, default=2, help="orchestrator replicas (2)")
    parser.add_argument(
        "--nodes", type=int, choices=(1, 3), default=1, help="broker nodes: 1, or a cluster of 3"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="a database to create the run's own database from",
    )
    parser.add_argument("--workdir", type=Path, help="logs and broker data (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the database and broker data")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    # The broker is killed on purpose: the soak's own client would log every reconnection.
    # What matters is in the report; the daemons' logs are in the work directory.
    configure_logging("critical", json=False)
    config = SoakConfig(
        minutes=args.minutes,
        rate=args.rate,
        in_flight=args.in_flight,
        replicas=args.replicas,
        nodes=args.nodes,
        seed=args.seed,
        pg_admin_url=args.postgres,
        workdir=args.workdir,
        keep=args.keep,
    )
    report = asyncio.run(run(config))
    print(report.text())
    if args.json is not None:
        args.json.write_text(report_json(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
