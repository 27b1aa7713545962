"""The records this orchestrator wrote last, kept so that the next message skips the load.

A saga's messages usually come back to the replica that sent its last command, so the record
it wrote is still the stored one, and reading it back is a store round trip spent for nothing.
A kept copy can be stale (another replica, an operator or the sweep's hold wrote since), so it
is only ever a first guess: the runtime decides from it only when the decision writes, and the
write is a compare-and-set on the version, which a stale copy loses (the runtime then loads and
decides again). Holding a saga bumps its version for this reason.

Only active sagas are kept, at most ``capacity`` of them, the least recently written dropped
first: memory stays bounded however many sagas are in flight.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

from orchestrator.store import SagaRecord


class RecentRecords:
    """A bounded map of saga id to the record this process last wrote for it."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._records: OrderedDict[str, SagaRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def get(self, saga_id: str) -> SagaRecord | None:
        """The record last written for ``saga_id`` here, if it is still kept."""
        return self._records.get(saga_id)

    def remember(self, record: SagaRecord) -> None:
        """Keep the record just written (without its outbox: deciding never reads it)."""
        if self.capacity <= 0 or record.state.status.is_terminal:
            self._records.pop(record.saga_id, None)
            return
        self._records[record.saga_id] = replace(record, outbox=())
        self._records.move_to_end(record.saga_id)
        while len(self._records) > self.capacity:
            self._records.popitem(last=False)

    def forget(self, saga_id: str) -> None:
        """Drop the copy of a saga written by other means (or not written after all)."""
        self._records.pop(saga_id, None)
