"""Optional peers measured the same way: a Celery chain and a DBOS workflow.

They are installed with ``pip install '.[bench]'``; a row whose library is missing is skipped
with a note.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from bench.context import Context

_LIBRARIES = {"celery": "celery", "dbos-sync": "dbos", "dbos-async": "dbos"}


def unavailable(name: str) -> str | None:
    """Why the peer ``name`` cannot run here, or ``None`` if it can."""
    library = _LIBRARIES[name]
    if importlib.util.find_spec(library) is None:
        return f"{library} is not installed (pip install '.[bench]')"
    return None


async def run(name: str, ctx: Context) -> dict[str, Any]:
    """Measure the peer ``name`` once."""
    if name == "celery":
        from bench.peers.celery_run import run_celery

        return await run_celery(ctx)
    from bench.peers.dbos_run import run_dbos

    return await run_dbos(ctx, name.removeprefix("dbos-"))
