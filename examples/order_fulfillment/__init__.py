"""The order-fulfillment example: the saga (``app``) and its four participant services.

Run it for real with::

    saga orchestrator --app examples.order_fulfillment:app
    saga participant --app examples.order_fulfillment:inventory

and likewise ``:payment``, ``:shipping`` and ``:notification``.
"""

from examples.order_fulfillment.saga import app, order_fulfillment
from examples.order_fulfillment.services import inventory, notification, payment, shipping

__all__ = ["app", "inventory", "notification", "order_fulfillment", "payment", "shipping"]
