"""The Ray job of one service job: `python -m service.entrypoint JOB_ID` (the dispatcher submits it).

It loads the job's spec from Redis, claims the job (queued/dispatched -> running, once: a second
start of the same job id finds it running and stops), runs `workers.driver.run_job` with a Redis
event sink and a cancel check that reads the job's cancel flag, and ends the job record together
with its `job_finished` event. The only module of `service` that imports the torch layers.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from api_schema import JobSpec
from service.blocking_jobstore import BlockingJobStore
from service.settings import Settings
from workers.driver import run_job
from workers.events import FanOut, HumanSink

log = logging.getLogger("scdd.service")


class RedisEventSink:
    """Appends each event to the job's stream and keeps the record's stage and progress current;
    `job_finished` ends the record (state, error, summary) in the same step as its event."""

    def __init__(self, store: BlockingJobStore, job_id: str):
        self.store, self.job_id = store, job_id

    def publish(self, event: dict[str, Any]) -> None:
        kind = event["type"]
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


def run(job_id: str, settings: Settings) -> int:
    store = BlockingJobStore.connect(settings.redis_url, settings.redis_prefix, settings.events_maxlen)
    record = store.get(job_id)
    if record is None:
        print(f"scdd: no job {job_id} in Redis at {settings.redis_url} (prefix {settings.redis_prefix})", file=sys.stderr)
        return 2
    claimed, state = store.transition(job_id, "running", ("queued", "dispatched"), started_at=f"{time.time():.3f}")
    if not claimed:
        print(f"scdd: job {job_id} is {state}; not starting it again", file=sys.stderr)
        return 0 if state == "succeeded" else 1
    spec = JobSpec.model_validate(json.loads(record["spec"]))
    sink = FanOut(RedisEventSink(store, job_id), HumanSink(sys.stdout))
    outcome = run_job(spec, sink, should_cancel=lambda: store.cancel_requested(job_id))
    return 0 if outcome.status == "succeeded" else 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m service.entrypoint JOB_ID", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run(args[0], Settings())


if __name__ == "__main__":
    sys.exit(main())
