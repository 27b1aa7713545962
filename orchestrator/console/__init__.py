"""The operator console: an HTTP API over the saga store, the operator actions and the parked
messages, and the web page that uses it (``saga console``).

Its HTTP stack is aiohttp, an optional dependency (``pip install 'saga-orchestrator[console]'``):
one asyncio-native package that serves HTTP without an ASGI server beside it. The page is
plain HTML and JavaScript shipped in ``static/``, with no build step.
"""
