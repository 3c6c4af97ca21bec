"""Bounds on open event streams: per tenant and per API process.

Each open `GET /v1/jobs/{id}/events` holds a slot until it ends; past a bound the request gets 429 with
a message naming it. The blocking reads of the streams use their own Redis connection pool, sized to the
per-process bound, so open streams can never take the connections other requests need.
"""

from __future__ import annotations

from collections import Counter

from fastapi import HTTPException


class StreamSlots:
    def __init__(self, per_tenant: int, per_process: int):
        self.per_tenant, self.per_process = per_tenant, per_process
        self.open: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.open.values())

    def take(self, tenant: str) -> "Slot":
        """Hold a slot for `tenant` (give it back with `Slot.release`), or raise 429 naming the bound reached."""
        if self.open[tenant] >= self.per_tenant:
            raise HTTPException(429, f"tenant {tenant!r} has {self.open[tenant]} event streams open, its limit "
                                     f"(SCDD_MAX_STREAMS_PER_TENANT): close one, or poll GET /v1/jobs/{{id}}",
                                headers={"Retry-After": "5"})
        if self.total >= self.per_process:
            raise HTTPException(429, f"this API process has {self.total} event streams open, its limit "
                                     f"(SCDD_MAX_STREAMS_PER_PROCESS): retry shortly, or poll GET /v1/jobs/{{id}}",
                                headers={"Retry-After": "5"})
        self.open[tenant] += 1
        return Slot(self, tenant)

    def _give_back(self, tenant: str) -> None:
        self.open[tenant] -= 1
        if self.open[tenant] <= 0:
            del self.open[tenant]


class Slot:
    """One open stream's slot; `release` may be called any number of times (the stream's end, and the
    finalizer of a stream that never started both call it)."""

    def __init__(self, slots: StreamSlots, tenant: str):
        self.slots, self.tenant, self.released = slots, tenant, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.slots._give_back(self.tenant)
