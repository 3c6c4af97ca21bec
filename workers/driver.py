"""The job driver: one whole job on a Ray cluster, with progress events and cancellation.

`run_job(spec, sink, should_cancel)` runs squeeze -> distributed recover -> distributed validation
and baseline -> report through `scdd.pipeline.run_distillation`, on a `RayBackend` when
`resources.workers` > 1 (with 1 worker every stage runs in this process, as `scdd distill` does).

A watcher thread polls `should_cancel` (every `poll_s`) and, once it says yes, raises the job's
cancel flag: loops in this process stop at their next step, remote workers at their next check of
the job's `JobControl` actor (at most `RayOptions.check_s` later); recover worker groups and Ray Train runs
then release their actors and placement groups. The same thread forwards the workers' relayed
progress into the event stream. The job ends with status `succeeded`, `failed` (with the stage and
the cause) or `cancelled`; what was written stays in the output, the manifest marks an unfinished
image set `partial`.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import ray

from api_schema import JobSpec, JobSummary, Report
from scdd.backend import LocalBackend
from scdd.errors import JobCancelled, ScddError
from scdd.pipeline import run_distillation
from scdd.progress import CheckedProgress
from workers.backend import RayBackend, RayOptions
from workers.cluster import connect
from workers.control import JobControl
from workers.events import EventSink, JobEvents, ThrottledSink

log = logging.getLogger("scdd.workers")


def _never() -> bool:
    return False


class _Watcher(threading.Thread):
    """Polls `should_cancel`, raises the flags, and relays the workers' progress events."""

    def __init__(self, should_cancel: Callable[[], bool], control: Any, events: JobEvents, poll_s: float):
        super().__init__(name="scdd-job-watcher", daemon=True)
        self.should_cancel, self.control, self.events, self.poll_s = should_cancel, control, events, poll_s
        self.cancelled = threading.Event()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # e.g. the cancel source is briefly unreachable: keep watching
                log.exception("job watcher: polling failed; trying again")

    def poll(self) -> None:
        if not self.cancelled.is_set() and self.should_cancel():
            self.cancelled.set()
            self.control.cancel.remote()
        for event in ray.get(self.control.drain.remote()):
            self.events.publish_progress(event.pop("loop"), event.pop("fraction"), event.pop("done"),
                                         event.pop("total"), event.pop("unit"), event.pop("eta_s"), event)

    def check(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelled("cancelled on request")


@dataclass(frozen=True)
class JobOutcome:
    """How a job ended: `report` when it succeeded, `error` (the stage and the cause) when it failed."""

    status: Literal["succeeded", "failed", "cancelled"]
    error: Optional[str]
    job_fraction: float
    seconds: float
    report: Optional[Report]

    @property
    def summary(self) -> Optional[JobSummary]:
        return self.report.summary() if self.report is not None else None

    def finished_event(self, job_id: str) -> dict[str, Any]:
        """The `job_finished` event (JSON-able)."""
        summary = self.summary
        return {"type": "job_finished", "job_id": job_id, "status": self.status, "error": self.error,
                "job_fraction": self.job_fraction, "seconds": self.seconds,
                "summary": summary.model_dump() if summary is not None else None}


def run_job(spec: JobSpec, sink: EventSink, should_cancel: Callable[[], bool] = _never, *, poll_s: float = 0.2,
            options: RayOptions | None = None) -> JobOutcome:
    """Run `spec` to the end, publishing events to `sink`. `options` tune the Ray stages (tests inject
    faults there); None: `RayOptions.from_env()`, the defaults with $SCDD_PLACEMENT_TIMEOUT_S."""
    connect()
    started = time.perf_counter()
    events = JobEvents(ThrottledSink(sink))
    control = JobControl.create()
    watcher = _Watcher(should_cancel, control, events, poll_s)
    workers = spec.resources.workers
    events.sink.publish({"type": "job_started", "job_id": spec.job_id(), "workers": workers})
    status, report, error = "failed", None, None
    watcher.start()
    try:
        backend = RayBackend(spec, control, options or RayOptions.from_env()) if workers > 1 else LocalBackend()
        report = run_distillation(spec, CheckedProgress(events, watcher.check), backend, on_stage=events.stage)
        status = "succeeded"
    except JobCancelled:
        status = "cancelled"
    except ScddError as exc:
        error = f"{events.stage_name or 'setup'} stage failed: {exc}"
    except Exception as exc:  # a bug or an infrastructure failure: still end the job with its cause
        error = f"{events.stage_name or 'setup'} stage failed: {type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        watcher.stopped.set()
        watcher.join()
        watcher.poll()  # the last relayed events
        ray.kill(control)
    if error is not None:
        events.sink.publish({"type": "error", "stage": events.stage_name, "message": error})
    outcome = JobOutcome(status=status, error=error, job_fraction=1.0 if status == "succeeded" else events.job_fraction,
                         seconds=round(time.perf_counter() - started, 3), report=report)
    events.sink.publish(outcome.finished_event(spec.job_id()))
    return outcome
