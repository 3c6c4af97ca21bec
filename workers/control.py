"""One job's control channel on the Ray cluster: a cancel flag and an event relay in a small actor.

Remote workers (recover actors, Ray Train workers) cannot reach the driver's event sink or its
`should_cancel`, so they talk to a `JobControl` actor: `RemoteProgress` relays their progress events
(throttled) and checks the cancel flag at most every `interval_s`, raising `JobCancelled` to stop the
loop between two steps. The driver drains the relay and sets the flag (workers/driver.py).
"""

from __future__ import annotations

import time
from typing import Any

import ray

from scdd.errors import JobCancelled
from scdd.progress import Metric
from workers.events import plain


class JobControl:
    """The actor's class (created with `JobControl.create()`; needs no CPU)."""

    def __init__(self) -> None:
        self._cancelled = False
        self._events: list[dict[str, Any]] = []

    @staticmethod
    def create() -> "ray.actor.ActorHandle":
        return ray.remote(num_cpus=0)(JobControl).remote()

    def cancel(self) -> None:
        self._cancelled = True

    def cancelled(self) -> bool:
        return self._cancelled

    def publish(self, event: dict[str, Any]) -> None:
        self._events.append(event)

    def drain(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events


class RemoteCheck:
    """Raises JobCancelled once the job's flag is set; asks the actor at most every `interval_s`."""

    def __init__(self, control: Any, interval_s: float = 0.5) -> None:
        self.control, self.interval_s = control, interval_s
        self._asked = 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self._asked >= self.interval_s:
            self._asked = now
            if ray.get(self.control.cancelled.remote()):
                raise JobCancelled("cancelled on request")


class RemoteProgress:
    """A `scdd.progress.Progress` for a remote loop: relays progress to the job's control actor
    (rank 0 only, at most every `interval_s`) and checks for cancellation on every step."""

    def __init__(self, control: Any, rank: int = 0, interval_s: float = 0.5) -> None:
        self.control, self.rank, self.interval_s = control, rank, interval_s
        self.check = RemoteCheck(control, interval_s)
        self._loop, self._total, self._done, self._unit, self._started, self._sent = "", 1, 0, "", 0.0, 0.0

    def start(self, stage: str, total: int, unit: str) -> None:
        self.check()
        self._loop, self._total, self._done, self._unit = stage, max(total, 1), 0, unit
        self._started = time.monotonic()

    def advance(self, n: int = 1, **metrics: Metric) -> None:
        self.check()
        self._done = min(self._total, self._done + n)
        now = time.monotonic()
        if self.rank == 0 and (now - self._sent >= self.interval_s or self._done == self._total):
            self._sent = now
            fraction = self._done / self._total
            eta = (now - self._started) / fraction * (1 - fraction) if fraction > 0 else None
            self.control.publish.remote({"loop": self._loop, "fraction": fraction, "done": self._done,
                                         "total": self._total, "unit": self._unit, "eta_s": eta, **plain(metrics)})

    def finish(self) -> None:
        pass
