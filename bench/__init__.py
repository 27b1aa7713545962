"""The benchmark harness: ``python -m bench`` (a program, never a timed test).

One invocation measures, in interleaved repeats on the same machine, the raw aio-pika
request/reply ceiling and the saga orchestrator end to end as separate processes (the
``saga orchestrator`` daemon and the four example participant services) over RabbitMQ with
each saga store, plus optional peers (Celery, DBOS). It prints a table and writes the full
figures as JSON under ``bench/results/``. ``python -m bench --help`` lists the options.

The harness touches the project only through its command line, ``SAGA_*`` environment
variables, the wire contracts and the RabbitMQ names in :mod:`contracts.names`, so refactoring
the engine, the stores or the transport does not break it.
"""
