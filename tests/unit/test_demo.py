"""The embedded demo: three orders, three outcomes, in the documented JSON shape."""

from __future__ import annotations

import io
import json

from orchestrator.demo import render_json, render_text, run_embedded


async def test_demo_runs_three_orders_and_prints_their_timelines() -> None:
    states = await run_embedded()
    out = io.StringIO()
    render_json(states, out)
    sagas = json.loads(out.getvalue())["sagas"]
    assert [(s["saga_id"], s["status"]) for s in sagas] == [
        ("order-1001", "completed"),
        ("order-1002", "failed"),
        ("order-1003", "failed"),
    ]
    for saga in sagas:
        assert saga["saga_type"] == "order_fulfillment"
        assert {"name", "status"} <= set(saga["steps"][0])
        assert all({"event", "at"} <= set(entry) for entry in saga["history"])
    declined = [e["event"] for e in sagas[1]["history"]]
    assert "SagaStepFailed" in declined
    compensations = [
        e["step"] for e in sagas[2]["history"] if e["event"] == "SagaCompensationStarted"
    ]
    assert compensations == ["create_shipment", "process_payment", "reserve_inventory"]
    text = io.StringIO()
    render_text(states, text)
    assert "order-1003  order_fulfillment  FAILED  (15m00s)" in text.getvalue()
    assert "SagaStepTimedOut" in text.getvalue()
