"""The chaos soak: ``python -m bench.soak --minutes 20`` (a program, not part of the test run).

Thousands of order sagas with mixed outcomes (declines, hangs that time out, transient errors
that are retried, refused compensations that rest stuck until an operator resolves them) run
over a private RabbitMQ node, a PostgreSQL store and participant services that record every
real effect in a ledger table, while the soak SIGKILLs orchestrator replicas every 15-30 s,
participants now and then and its broker node every few minutes, and sends malformed and
forged messages to every queue. Then it checks, and prints, that no saga was lost, every saga
is terminal and ended as its scenario says, every forward effect of a failed saga was
compensated exactly once in strict reverse order, no compensation ran twice, double effects
come only from killed processes of at-least-once services, the outbox and the queues drained,
only the hostile messages were parked (each with a reason), and no timer fired early (with
its lateness). The exit status is 1 when an invariant broke.

``--nodes 3`` runs it on a private three-node cluster, killing the nodes in turn.
``tests/e2e/test_soak.py`` runs a two-minute variant in CI. Modules: :mod:`~bench.soak.run` (the
run), :mod:`~bench.soak.services` (the ledger participants), :mod:`~bench.soak.scenarios`,
:mod:`~bench.soak.chaos` (faults and hostile messages), :mod:`~bench.soak.broker` and
:mod:`~bench.soak.checks` (the invariants).
"""
