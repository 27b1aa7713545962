"""The example order saga redeployed as its authors would: v2 drops the confirmation step.

``v2_only`` is a deploy that forgot to keep v1 for the sagas in flight; ``both`` is the right
deploy (v2 for new sagas, v1 until the last v1 saga ends).
"""

from __future__ import annotations

from examples.order_fulfillment import order_fulfillment
from orchestrator.definition import App, Saga

v2 = Saga(
    order_fulfillment.name,
    steps=order_fulfillment.steps[:-1],
    data=order_fulfillment.data,
    version=2,
)
"""Version 2: reserve, charge, ship; no confirmation."""

v2_only = App([v2])
both = App([order_fulfillment, v2])
