"""The order-fulfillment example: the saga (``app``) and its four participant services.

Run it for real with::

    saga orchestrator --app examples.order_fulfillment:app
    saga participant --app examples.order_fulfillment:inventory

and likewise ``:payment``, ``:shipping`` and ``:notification``, with ``SAGA_AMQP_URL``,
``SAGA_STORE_URL`` and ``SAGA_IDEMPOTENCY_URL`` set (the README's "Run it" is the whole recipe).
An order's ``simulate`` field makes the services fail, hang, error or dawdle on purpose
(:mod:`examples.order_fulfillment.services`).
"""

from examples.order_fulfillment.saga import app, order_fulfillment
from examples.order_fulfillment.services import inventory, notification, payment, shipping

__all__ = ["app", "inventory", "notification", "order_fulfillment", "payment", "shipping"]
