"""The plumbing both sides of a saga share, below the orchestrator and the participant SDK.

The dependency graph reads ``contracts <- plumbing <- {orchestrator, participants}``: what is
here (the transport seam and its RabbitMQ and in-memory brokers, the delay ladder and the
topology, the wire codec, clock, tracing, the error tree, settings, logging, the probe
endpoints, metric helpers and the store connection plumbing) imports nothing above it, so a
participant service never loads the saga engine.
"""
