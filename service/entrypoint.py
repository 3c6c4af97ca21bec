"""The Ray job of one attempt of a service job: `python -m service.entrypoint JOB_ID ATTEMPT` (the dispatcher
submits it; ATTEMPT 1 when left out).

It loads the job's spec from Redis, claims the job (queued/dispatched -> running, once, and only for the
job's current attempt: a second start of the same job finds it running and stops, a late driver of an
earlier attempt finds a newer one and stops), runs `workers.driver.run_job` with a Redis
event sink and a cancel check that reads the job's cancel flag, and ends the job record together
with its `job_finished` event. The only module of `service` that imports the torch layers.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from api_schema import JobSpec
from service.blocking_jobstore import BlockingJobStore
from service.curves import CurveRecorder
from service.records import attempt_of
from service.settings import Settings
from workers.driver import run_job
from workers.events import FanOut, HumanSink

log = logging.getLogger("scdd.service")


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
        event = {**event, "attempt": self.attempt}
        kind = event["type"]
        curves = self.curves.feed(event)  # before `job_finished`: a job's curves are complete once it has ended
        if curves:
            self.store.write_curves(self.job_id, curves)
        if kind == "job_finished":
            self.store.finish(self.job_id, event["status"], ("running",), event.get("error"), event,
                              **({"summary": json.dumps(event["summary"])} if event.get("summary") else {}),
                              progress=event["job_fraction"])
            return
        fields = {}
        if kind == "stage_started":
            fields["stage"] = event["stage"]
        elif kind == "progress":
            fields["progress"] = event["job_fraction"]
        self.store.append_event(self.job_id, event, **fields)


def run(job_id: str, settings: Settings, attempt: int = 1) -> int:
    store = BlockingJobStore.connect(settings.redis_url, settings.redis_prefix, settings.events_maxlen)
    claimed, state = store.claim(job_id, attempt)
    if claimed == -1:
        print(f"scdd: no job {job_id} in Redis at {settings.redis_url} (prefix {settings.redis_prefix})", file=sys.stderr)
        return 2
    if claimed == -2:
        print(f"scdd: job {job_id} is at attempt {state}, this driver belongs to attempt {attempt}; not starting",
              file=sys.stderr)
        return 1
    if claimed != 1:
        print(f"scdd: job {job_id} is {state}; not starting it again", file=sys.stderr)
        return 0 if state == "succeeded" else 1
    spec = JobSpec.model_validate(json.loads(store.get(job_id)["spec"]))  # as claimed (a resume may change it)
    sink = FanOut(RedisEventSink(store, job_id, settings.curve_points, attempt), HumanSink(sys.stdout))
    outcome = run_job(spec, sink, should_cancel=lambda: store.cancel_requested(job_id))
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
