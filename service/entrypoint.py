"""The Ray job of one attempt of a service job: `python -m service.entrypoint JOB_ID ATTEMPT` (the dispatcher
submits it; ATTEMPT 1 when left out).

It loads the job's spec from Redis, claims the job (queued/dispatched -> running, once, and only for the
job's current attempt: a second start of the same job finds it running and stops, a late driver of an
earlier attempt finds a newer one and stops), runs `workers.driver.run_job` with a Redis
event sink and a cancel check that reads the job's cancel flag, and ends the job record together
with its `job_finished` event. The only module of `service` that imports the torch layers.

Once the job runs, Redis may go away for a while (a pod restart) without failing it: the events go through a
bounded buffer that a writer thread drains to Redis (service/event_buffer.py; progress events are dropped first
when it is full, and a `notice` event counts them), the cancel check answers "not cancelled" while it cannot read
the flag, and the final record is retried for SCDD_FINAL_RECORD_RETRY_S; the driver exits 3 when even that fails
(the dispatcher then ends the job from the Ray job's status).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from typing import Any, Callable, Optional, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from api_schema import JobSpec
from service.blocking_jobstore import BlockingJobStore
from service.curves import CurveRecorder
from service.event_buffer import BufferedEventSink, transient
from service.records import attempt_of
from service.redact import redact_text, redact_url
from service.settings import Settings
from workers.driver import run_job
from workers.events import FanOut, HumanSink

log = logging.getLogger("scdd.service")
T = TypeVar("T")


class RedisEventSink:
    """Appends each event to the job's stream and keeps the record's stage and progress current;
    `job_finished` ends the record (state, error, summary) in the same step as its event. The metrics of progress
    events also go into the job's curves (service/curves.py), which keep the whole run when the stream is trimmed:
    the curves of the record's current attempt, continued where an earlier process of that attempt left them."""

    def __init__(self, store: BlockingJobStore, job_id: str, curve_points: int = 256, attempt: int | None = None):
        """`attempt`: the attempt this driver runs (None: the record's current one); it stamps every event, so a
        resumed job's history tells its attempts apart."""
        self.store, self.job_id = store, job_id
        self.attempt = attempt if attempt is not None else attempt_of(store.get(job_id) or {})
        self.curves = CurveRecorder(self.attempt, curve_points, store.curves(job_id))

    def publish(self, event: dict[str, Any]) -> None:
        """Write the event now (raises what Redis raises); a running job publishes through `BufferedEventSink`."""
        self.write(*self.prepare(event))

    def prepare(self, event: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """The event stamped with its attempt, and the curves to write with it (no I/O: the curves are fed from every
        event, also those an outage drops before they reach Redis)."""
        event = {**event, "attempt": self.attempt}
        return event, self.curves.feed(event)  # before `job_finished`: a job's curves are complete once it has ended

    def write(self, event: Optional[dict[str, Any]], curves: dict[str, str]) -> None:
        """Write `curves`, then `event` (None: only the curves). Writing the same `job_finished` again (its answer
        was lost) finds the job ended and changes nothing."""
        if curves:
            self.store.write_curves(self.job_id, curves)
        if event is None:
            return
        kind = event["type"]
        if kind == "job_finished":
            moved, state = self.store.finish(
                self.job_id, event["status"], ("running",), event.get("error"), event,
                **({"summary": json.dumps(event["summary"])} if event.get("summary") else {}),
                progress=event["job_fraction"])
            if not moved and state != event["status"]:
                log.warning("job %s was %s already when its driver ended it %s; the record stays %s",
                            self.job_id, state, event["status"], state)
            return
        fields = {}
        if kind == "stage_started":
            fields["stage"] = event["stage"]
        elif kind == "progress":
            fields["progress"] = event["job_fraction"]
        self.store.append_event(self.job_id, event, **fields)


class CancelCheck:
    """`should_cancel` of a running job: whether its cancel flag is set in Redis. While Redis cannot be read it answers
    False (the job goes on; logged once per outage) instead of raising: the driver also polls it once more after the
    job's last stage, where an exception would end the job without its final record. A flag once seen stays seen.
    It reads through its own connection that fails fast (no retries, 5 s timeouts), so a Redis host that is gone
    does not hold up the job's end."""

    def __init__(self, store: BlockingJobStore, job_id: str):
        self.store, self.job_id = store, job_id
        self.requested = False
        self.failing = False

    @classmethod
    def connect(cls, settings: Settings, job_id: str) -> "CancelCheck":
        client = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=5,
                                      socket_connect_timeout=5, retry=Retry(NoBackoff(), 0))
        return cls(BlockingJobStore(client, settings.redis_prefix, settings.events_maxlen), job_id)

    def __call__(self) -> bool:
        if self.requested:
            return True
        try:
            self.requested = self.store.cancel_requested(self.job_id)
        except redis.RedisError as exc:
            if not self.failing:
                self.failing = True
                log.warning("job %s: cannot read its cancel flag from Redis (%s); the job goes on and the flag is "
                            "read again when Redis is back", self.job_id, redact_text(f"{type(exc).__name__}: {exc}"))
            return False
        if self.failing:
            self.failing = False
            log.warning("job %s: its cancel flag can be read from Redis again", self.job_id)
        return self.requested


FINAL_RECORD_LOST = 3  # the exit code of a driver whose final record never reached Redis


def until_redis_answers(what: str, call: Callable[[], T], seconds: float) -> T:
    """`call()`, tried again (0.5 s doubling to 5 s apart) while Redis is unreachable, loading or full, for up to
    `seconds`: a driver that Ray starts during a Redis outage waits for it rather than failing its job."""
    deadline, delay, warned = time.monotonic() + seconds, 0.5, False
    while True:
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 -- only what retrying can fix is retried
            if not transient(exc) or time.monotonic() + delay > deadline:
                raise
            if not warned:
                warned = True
                log.warning("cannot %s: Redis does not answer (%s); trying again for up to %g s "
                            "(SCDD_FINAL_RECORD_RETRY_S)", what, redact_text(f"{type(exc).__name__}: {exc}"), seconds)
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def run(job_id: str, settings: Settings, attempt: int = 1) -> int:
    store = BlockingJobStore.connect(settings.redis_url, settings.redis_prefix, settings.events_maxlen)
    token = uuid.uuid4().hex
    wait = settings.final_record_retry_s
    try:
        claimed, state = until_redis_answers("claim the job", lambda: store.claim(job_id, attempt, token), wait)
    except Exception as exc:  # noqa: BLE001 -- Redis never answered: say so in one line, not a traceback
        if not transient(exc):
            raise
        print(f"scdd: job {job_id}: Redis at {redact_url(settings.redis_url)} did not answer within "
              f"SCDD_FINAL_RECORD_RETRY_S ({wait:g} s), so the job could not be claimed: check that Redis is up and "
              f"that REDIS_URL of the Ray nodes is the service's", file=sys.stderr)
        return 2
    if claimed == -1:
        print(f"scdd: no job {job_id} in Redis at {redact_url(settings.redis_url)} (prefix {settings.redis_prefix}): "
              "check that REDIS_URL and SCDD_REDIS_PREFIX of the Ray job are the service's", file=sys.stderr)
        return 2
    if claimed == -2:
        print(f"scdd: job {job_id} is at attempt {state}, this driver belongs to attempt {attempt}; not starting",
              file=sys.stderr)
        return 1
    if claimed != 1:
        print(f"scdd: job {job_id} is {state}; not starting it again", file=sys.stderr)
        return 0 if state == "succeeded" else 1
    record = until_redis_answers("read the job", lambda: store.get(job_id), wait)
    spec = JobSpec.model_validate(json.loads(record["spec"]))  # as claimed (a resume may change it)
    sink = until_redis_answers("read the job's curves",
                               lambda: RedisEventSink(store, job_id, settings.curve_points, attempt), wait)
    events = BufferedEventSink(sink, settings.event_buffer, settings.final_record_retry_s)
    cancel = CancelCheck.connect(settings, job_id)
    try:
        outcome = run_job(spec, FanOut(events, HumanSink(sys.stdout)), should_cancel=cancel)
    finally:
        cancel.store.redis.close()
        written = events.close(timeout=min(30.0, settings.final_record_retry_s))  # the timeout: if run_job raised
    if not written:
        print(f"scdd: job {job_id}: its final record could not be written to Redis at "
              f"{redact_url(settings.redis_url)} within SCDD_FINAL_RECORD_RETRY_S "
              f"({settings.final_record_retry_s:g} s); exiting non-zero so the dispatcher ends the job from the Ray "
              "job's status. Check that Redis is up and reachable from the Ray nodes, or raise "
              "SCDD_FINAL_RECORD_RETRY_S", file=sys.stderr)
        return FINAL_RECORD_LOST
    if events.dropped_total:
        log.warning("job %s: %d progress events were dropped while Redis was away (SCDD_EVENT_BUFFER=%d)",
                    job_id, events.dropped_total, settings.event_buffer)
    return 0 if outcome.status == "succeeded" else 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2) or (len(args) == 2 and not args[1].isdigit()):
        print("usage: python -m service.entrypoint JOB_ID [ATTEMPT]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run(args[0], Settings(), int(args[1]) if len(args) == 2 else 1)


if __name__ == "__main__":
    sys.exit(main())
