"""The job driver's events, off its training loop: a bounded buffer that a background thread drains to Redis.

A job's driver (service/entrypoint.py) publishes its events from inside the training loops. Writing them to Redis
right there made a short Redis outage (a pod restart) fail the job: a few seconds of retries, then
`stage failed: ConnectionError`. Here `publish` only puts the event into a buffer and returns (it never waits for
Redis and never raises because of it); one writer thread writes the buffer to Redis in order, and while Redis is
away it keeps the event in hand and tries again with backoff (0.2 s doubling to 2 s).

- **Bounded.** The buffer holds `capacity` events (SCDD_EVENT_BUFFER). When it is full the oldest `progress`
  event goes; stage boundaries, errors, `job_started` and `job_finished` are never dropped (the buffer can go past
  `capacity` only by those, a handful per job). The drops are counted, and once Redis takes writes again one
  `notice` event says how many progress events were dropped (`notice: progress_dropped`, `dropped`, `message`),
  where they are missing from the stream.
- **Curves are not dropped.** The metric curves (service/curves.py) are fed on the publishing thread from every
  event, dropped ones included; what is to be written is kept per curve (the newest state of each) and written
  before the next event, so a job's curves are complete however much of its stream an outage cost.
- **The final record.** `job_finished` starts a deadline (`final_s`, SCDD_FINAL_RECORD_RETRY_S): the writer
  writes what is buffered and then the final record, retrying every Redis error until the deadline. `close`
  waits for that and says whether the final record was written; the driver exits non-zero when it was not.

An event the writer has written and whose answer was lost (the connection dropped in between) is written again:
such an event can be in the stream twice (the same `seq`). Errors that retrying cannot fix (a bug, a script
error) drop that one event with a log line, never the writer.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, Optional, Protocol

import redis

from service.redact import redact_text

log = logging.getLogger("scdd.service")

KEPT = frozenset({"job_started", "job_resumed", "stage_started", "stage_finished", "error", "job_finished",
                  "notice"})  # what is never dropped; everything else (progress) may be
# Redis answers that go away by themselves (a replica promoted, memory freed, a restart's load finished).
TRANSIENT_REPLIES = ("OOM", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS",
                     "EXECABORT", "BUSY")


def transient(exc: BaseException) -> bool:
    """Whether trying again later may succeed: Redis unreachable, slow, loading, full, or read-only for now."""
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError, TimeoutError)):
        return True
    if isinstance(exc, redis.ResponseError):
        return str(exc).lstrip().split(" ", 1)[0].upper() in TRANSIENT_REPLIES
    return False


class EventWriter(Protocol):
    """Where the buffer writes (service/entrypoint.py's RedisEventSink)."""

    def prepare(self, event: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """The event as it is to be stored, and the curve fields to write with it (no I/O)."""
        ...

    def write(self, event: Optional[dict[str, Any]], curves: dict[str, str]) -> None:
        """Write the curves and then the event (None: only the curves); raises what Redis raised."""
        ...


class BufferedEventSink:
    """An EventSink that never blocks on Redis: see the module docstring. Thread-safe; `close` once at the end."""

    def __init__(self, writer: EventWriter, capacity: int = 1000, final_s: float = 600.0,
                 backoff: tuple[float, float] = (0.2, 2.0), clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1:
            raise ValueError(f"an event buffer needs room for at least 1 event, not {capacity}")
        self.writer, self.capacity, self.final_s, self.backoff, self.clock = writer, capacity, final_s, backoff, clock
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._curves: dict[str, str] = {}
        self._progress = 0  # progress events in the queue
        self._cond = threading.Condition()
        self._closing = False
        self._deadline: Optional[float] = None  # give up on what is not written by then (set by job_finished/close)
        self._stop = threading.Event()  # set when close() stops waiting: the writer's waits end at once
        self._gave_up = False
        self._deadline_why = ""
        self.dropped = 0  # progress events dropped and not yet reported in a notice
        self.dropped_total = 0
        self.final_written: Optional[bool] = None  # None: no job_finished yet; then whether it reached Redis
        self.down_since: Optional[float] = None  # when writes started failing (None: Redis takes them)
        self._outage_started: Optional[float] = None  # the first failure of the outage a notice reports on
        self._thread = threading.Thread(target=self._run, name="scdd-event-writer", daemon=True)
        self._thread.start()

    # -- the publishing side (training loops, the job watcher): never waits for Redis

    def publish(self, event: dict[str, Any]) -> None:
        with self._cond:
            if self._closing:
                log.warning("event %s published after the job's events were closed; not written", event.get("type"))
                return
            event, curves = self.writer.prepare(event)
            self._curves.update(curves)
            if event["type"] == "job_finished":
                self._deadline = self.clock() + self.final_s
                self._deadline_why = f"within SCDD_FINAL_RECORD_RETRY_S ({self.final_s:g} s) after the job ended"
                self._closing = True  # nothing comes after the final record
            if len(self._queue) >= self.capacity and not self._drop_oldest_progress():
                if event["type"] not in KEPT:  # full of events that are kept: this progress event goes
                    self._count_drop()
                    self._cond.notify()
                    return
            self._queue.append(event)
            if event["type"] not in KEPT:
                self._progress += 1
            self._cond.notify()

    def _drop_oldest_progress(self) -> bool:
        if not self._progress:
            return False
        for index, queued in enumerate(self._queue):
            if queued["type"] not in KEPT:
                del self._queue[index]
                self._progress -= 1
                self._count_drop()
                return True
        return False

    def _count_drop(self) -> None:
        self.dropped += 1
        self.dropped_total += 1

    def pending(self) -> int:
        """Events buffered and not yet written (the one being written excluded)."""
        with self._cond:
            return len(self._queue)

    def close(self, timeout: Optional[float] = None) -> bool:
        """Wait until everything published is written, or the deadline passes: `final_s` after `job_finished` was
        published, else `timeout` from now (None: `final_s`). True when all of it reached Redis; False when the
        writer gave up (what it lost is logged)."""
        with self._cond:
            self._closing = True
            if self._deadline is None:
                wait = self.final_s if timeout is None else timeout
                self._deadline = self.clock() + wait
                self._deadline_why = f"within {wait:g} s after the job's driver stopped"
            deadline = self._deadline
            self._cond.notify()
        self._thread.join(max(0.0, deadline - self.clock()) + 5.0)  # + the writer's last try
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(5.0)
        with self._cond:
            return not self._queue and not self._curves and not self._thread.is_alive() and not self._gave_up

    # -- the writer thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._queue or self._curves or self.dropped or self._closing):
                    self._cond.wait()
                if not (self._queue or self._curves or self.dropped):
                    return  # closing and all written
                dropped, self.dropped = self.dropped, 0
                if dropped:
                    event = self._notice(dropped)
                else:
                    event = self._queue.popleft() if self._queue else None
                    if event is not None and event["type"] not in KEPT:
                        self._progress -= 1
                curves, self._curves = self._curves, {}
            if not self._write(event, curves):
                with self._cond:
                    self._gave_up = True
                    lost = len(self._queue)
                    if any(queued["type"] == "job_finished" for queued in self._queue):
                        self.final_written = False
                log.error("scdd: gave up writing this job's events to Redis %s; %d events not written%s. The "
                          "dispatcher ends the job from its Ray status (this driver exits non-zero). Keep Redis "
                          "reachable from the Ray nodes, or raise SCDD_FINAL_RECORD_RETRY_S", self._deadline_why,
                          lost, ", the final record among them" if self.final_written is False else "")
                return

    def _notice(self, dropped: int) -> dict[str, Any]:
        """The `notice` event for `dropped` progress events (called under the lock, from the writer)."""
        since = self._outage_started
        took = f" during a Redis outage of {self.clock() - since:.0f} s" if since is not None else \
            " while Redis was slow"
        event = {"type": "notice", "notice": "progress_dropped", "dropped": dropped,
                 "message": f"{dropped} progress events of this job were dropped{took} (the driver buffers "
                            f"{self.capacity} events: SCDD_EVENT_BUFFER); stage, error and final events and the "
                            "metric curves are complete",
                 "time": round(time.time(), 3)}
        event, curves = self.writer.prepare(event)
        self._curves.update(curves)
        return event

    def _write(self, event: Optional[dict[str, Any]], curves: dict[str, str]) -> bool:
        """Write `curves` then `event` (None: curves only), trying again while Redis is away. False: gave up (the
        deadline passed, or the final record met an error retrying cannot fix); True: written, or dropped for an
        error that retrying cannot fix."""
        final = event is not None and event["type"] == "job_finished"
        delay = self.backoff[0]
        while True:
            tried = self.clock()
            try:
                self.writer.write(event, curves)
            except Exception as exc:  # noqa: BLE001 -- the writer must outlive any error
                if not (transient(exc) or (final and isinstance(exc, redis.RedisError))):
                    log.error("scdd: could not write a %s event to Redis, dropping it: %s",
                              event["type"] if event else "curves", redact_text(f"{type(exc).__name__}: {exc}"))
                    if final:
                        self.final_written = False
                    return not final
                self._failed(exc, tried)
            else:
                self._recovered()
                if final:
                    self.final_written = True
                return True
            deadline, now = self._deadline, self.clock()
            if (deadline is not None and now >= deadline) or self._stop.is_set():
                if final:
                    self.final_written = False
                with self._cond:  # back where it was: what is left is what was lost
                    if event is not None:
                        self._queue.appendleft(event)
                    self._curves = {**curves, **self._curves}
                return False
            self._stop.wait(delay if deadline is None else min(delay, max(0.0, deadline - now)))
            delay = min(delay * 2, self.backoff[1])

    def _failed(self, exc: BaseException, tried: float) -> None:
        if self.down_since is None:
            self.down_since = tried
            if self._outage_started is None:
                self._outage_started = self.down_since
            log.warning("scdd: Redis does not take this job's events (%s); the job goes on, its events wait in a "
                        "buffer of %d (oldest progress dropped first) and are written when Redis is back",
                        redact_text(f"{type(exc).__name__}: {exc}"), self.capacity)

    def _recovered(self) -> None:
        if self.down_since is not None:
            log.warning("scdd: Redis takes this job's events again after %.1f s", self.clock() - self.down_since)
            self.down_since = None
        if not self.dropped:
            self._outage_started = None
