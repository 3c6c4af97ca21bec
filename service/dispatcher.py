"""The dispatcher: takes jobs off the Redis queue and runs each as a Ray job, at most
SCDD_MAX_RUNNING at a time (and SCDD_MAX_GPUS GPUs, when set) across all dispatchers; follows them
until they end. Run slots are shared fairly: round-robin between the tenants with queued jobs, first
in first out within a tenant (records.RESERVE).

Delivery is at-least-once (a Redis Stream with the consumer group `dispatchers`); a run is
exactly-once because the Ray job's submission id is the job id and its attempt (records.submission_id:
Ray refuses a second submit of the same id, and the entrypoint claims the job record only once, only
for the current attempt). A resumed job (POST /v1/jobs/{id}/resume) is queued again as its next attempt,
submitted once the previous attempt's Ray job has ended. A message is acknowledged when its
job has ended, so a dispatcher's pending messages are the jobs it follows: it touches them every
tick (XCLAIM, idle 0), and another dispatcher takes over those of a dispatcher silent for
SCDD_RECLAIM_AFTER_S (XAUTOCLAIM). A job whose submission to Ray fails SCDD_MAX_DELIVERIES times goes to
the dead-letter stream and fails; takeovers are not counted (a job waiting its fair-share turn through
dispatcher restarts has done nothing wrong).

The dispatcher survives any Redis error (an outage, a full Redis refusing writes): it logs, waits and
tries again, and recreates its consumer group when Redis comes back empty. Every tick it also frees the
run slots of jobs that ended or vanished (records.SWEEP_SLOTS). What a tenant reads in a job's `error`
is a fixed message with the Ray job id; Ray's own message (driver logs, tracebacks) goes to the
dispatcher's log only, URLs redacted.

Run it: `python -m service.dispatcher` (`scdd serve` starts one).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Optional
from urllib.parse import urlsplit

import redis

from api_schema import FINAL_STATES
from service.blocking_jobstore import BlockingJobStore
from service.budget import gpus_of
from service.job_queue import JobQueue
from service.records import attempt_of, submission_id
from service.redact import redact_text
from service.settings import Settings

log = logging.getLogger("scdd.dispatcher")

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
READ_BATCH = 200
MAX_BACKOFF_S = 30.0


def runs_on_gpus(resources: dict, worker_device: Optional[str]) -> bool:
    """Whether a job's workers use GPUs on the service's (joined) Ray cluster: workers/cluster.py:decide_device's
    rule, here without importing the workers' layer. cuda*: yes; cpu: no; auto: the cluster's configured worker
    device (SCDD_WORKER_DEVICE) is cuda. A single-worker job computes in its driver, so its Ray job asks for the
    GPU itself and waits for a GPU node, rather than landing on a CPU one."""
    device = str(resources.get("device", "auto"))
    return device.startswith("cuda") or (device == "auto" and (worker_device or "").strip().lower().startswith("cuda"))


class RayJobs:
    """The Ray Jobs API, submitting idempotently by submission id."""

    def __init__(self, address: str, python: str = "python"):
        self.address, self.python = address, python
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.address)
        return self._client

    def submit(self, job_id: str, attempt: int, spec: dict, env: dict[str, str]) -> bool:
        """True when this call started the Ray job of the job's `attempt`, False when Ray already had it."""
        resources = spec.get("resources", {})
        single = resources.get("workers", 1) == 1
        submission = submission_id(job_id, attempt)
        try:
            self.client.submit_job(
                entrypoint=f"{self.python} -m service.entrypoint {job_id} {attempt}",
                submission_id=submission,
                runtime_env={"env_vars": env},
                entrypoint_num_cpus=(resources.get("threads") or 1) if single else 0,
                entrypoint_num_gpus=1 if single and runs_on_gpus(resources, env.get("SCDD_WORKER_DEVICE")) else 0,
                metadata={"scdd_job": job_id, "scdd_attempt": str(attempt)},
            )
            return True
        except Exception:
            if self.status(submission)[0] is not None:
                return False
            raise

    def status(self, submission: str) -> tuple[Optional[str], str]:
        """(PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED, message), or (None, '') when Ray has no such job."""
        try:
            info = self.client.get_job_info(submission)
        except RuntimeError as exc:
            if "does not exist" in str(exc) or "404" in str(exc):
                return None, ""
            raise
        return str(getattr(info.status, "value", info.status)), info.message or ""

    def stop(self, submission: str) -> None:
        self.client.stop_job(submission)


class Dispatcher:
    def __init__(self, settings: Settings, store: BlockingJobStore, ray_jobs: RayJobs, name: Optional[str] = None):
        self.settings, self.store, self.ray = settings, store, ray_jobs
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.queue = JobQueue(store.redis, store.keys, self.name)
        self.following: dict[str, str] = {}  # job id -> message id
        self.waiting: dict[str, str] = {}    # job ids read but not yet submitted (no free slot, Ray down)
        self.stopped = threading.Event()

    def run(self) -> None:
        self.start()
        failures = 0
        while not self.stopped.is_set():
            try:
                self.tick()
                failures = 0
            except Exception as exc:  # Redis away or full (OOM), Ray failing, a bug: never let the loop die
                failures += 1
                self.recover(exc, failures)

    def start(self) -> None:
        """Create the consumer group (waiting for Redis while it is unreachable) and log what this dispatcher does."""
        failures = 0
        while not self.stopped.is_set():
            try:
                self.queue.ensure_group()
                break
            except redis.RedisError as exc:
                failures += 1
                self.recover(exc, failures)
        log.info("dispatcher %s: queue %s, Ray Jobs API %s, at most %d jobs%s at once", self.name,
                 self.queue.keys.queue, self.ray.address, self.settings.max_running,
                 f" and {self.settings.max_gpus} GPUs" if self.settings.max_gpus else "")
        if self.settings.jobs_redis_url == "pass" and urlsplit(self.settings.redis_url).password:
            log.warning("REDIS_URL holds a password and goes into every Ray job's runtime_env, readable through the "
                        "Ray Jobs API and dashboard: give the Ray nodes REDIS_URL and set SCDD_JOBS_REDIS_URL=cluster")

    def recover(self, exc: Exception, failures: int) -> None:
        """After a failed tick: recreate the consumer group when Redis lost it (it came back empty), then wait, longer
        after each failure in a row (poll_s doubling, at most MAX_BACKOFF_S)."""
        if isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc):
            log.warning("the queue's consumer group is gone (Redis came back empty?); creating it again")
            try:
                self.queue.ensure_group()
            except redis.RedisError as again:
                log.warning("creating the consumer group failed (%s); retrying", redact_text(str(again)))
        elif isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            log.warning("Redis unreachable (%s); retrying", redact_text(str(exc)))
        elif isinstance(exc, redis.RedisError):
            log.warning("Redis refused a command (%s: %s); retrying", type(exc).__name__, redact_text(str(exc)))
        else:
            log.exception("dispatcher tick failed; retrying")
        self.stopped.wait(min(MAX_BACKOFF_S, self.settings.poll_s * 2 ** min(failures - 1, 10)))

    def tick(self) -> None:
        self.sweep()
        self.touch()
        self.reclaim()
        self.follow()
        self.read_new()
        self.dispatch_waiting()
        self.expire()

    def dispatch_waiting(self) -> None:
        """Try the jobs waiting for a slot, oldest first (job ids sort by creation), until the slots are full."""
        for job_id, message_id in sorted(self.waiting.items()):
            if self.handle(message_id, job_id) == "full":
                return

    def sweep(self) -> None:
        """Free the run slots of jobs that ended or vanished without freeing theirs (records.SWEEP_SLOTS)."""
        freed = self.store.sweep_slots()
        if freed:
            log.warning("freed the run slots of %d jobs no longer live: %s", len(freed), ", ".join(freed))

    def expire(self) -> None:
        """Retention: delete the records and events of jobs finished more than SCDD_RETENTION_DAYS ago (0: kept), and
        of jobs cancelled while queued once SCDD_CANCELLED_QUEUED_RETENTION_S has passed."""
        days = self.settings.retention_days
        gone = self.store.expire_finished(days * 86400 if days > 0 else None)
        if gone:
            log.info("expired %d finished jobs", gone)

    # -- the queue -------------------------------------------------------------------------------
    def touch(self) -> None:
        """Reset the idle time of the messages this dispatcher holds, so no other takes them."""
        self.queue.hold(list(self.following.values()) + list(self.waiting.values()))

    def reclaim(self) -> None:
        for message_id, job_id in self.queue.take_over(int(self.settings.reclaim_after_s * 1000)):
            log.info("took over job %s (message %s) from a silent dispatcher", job_id, message_id)
            self.handle(message_id, job_id)

    def read_new(self) -> None:
        """Take every new message (up to READ_BATCH a tick) into `waiting`: a fair choice needs to see the queued
        jobs of every tenant, not only the oldest. Waits up to poll_s when there is none (the tick's pace)."""
        for message_id, job_id in self.queue.read(READ_BATCH, int(self.settings.poll_s * 1000)):
            self.waiting[job_id] = message_id

    def ack(self, message_id: str, job_id: str) -> None:
        self.queue.ack(message_id)
        self.following.pop(job_id, None)
        self.waiting.pop(job_id, None)

    def dead_letter(self, message_id: str, job_id: str, reason: str, error: Optional[str] = None) -> None:
        """Dead-letter the message with `reason` (for operators) and fail its job with `error` (what the tenant reads;
        default: `not dispatched: <reason>`)."""
        log.error("job %s dead-lettered: %s", job_id, reason)
        self.queue.dead_letter(message_id, job_id, reason)
        if job_id:
            self.store.finish(job_id, "failed", ("queued", "dispatched", "running"),
                              error=error or f"not dispatched: {reason}")
        self.ack(message_id, job_id)

    # -- one job ---------------------------------------------------------------------------------
    def handle(self, message_id: str, job_id: str) -> str:
        """Dispatch (or keep following) the job of a message. Returns what became of it: 'done' (acknowledged or
        dead-lettered), 'following', 'retry' (submit failed) or why it waits: 'full', 'gpus', 'owed:<tenant>'."""
        record = self.store.get(job_id) if job_id else None
        if record is None:
            self.dead_letter(message_id, job_id, "the message names no job record")
            return "done"
        if record["state"] in FINAL_STATES:
            self.ack(message_id, job_id)
            return "done"
        attempts = int(record.get("attempts") or 0)
        limit = self.settings.max_deliveries
        if record["state"] == "queued" and attempts >= limit:
            submission = submission_id(job_id, attempt_of(record))
            self.dead_letter(message_id, job_id, f"{attempts} failed submits (limit {limit}); last error: "
                                                 f"{redact_text(record.get('last_error', 'none'))}",
                             error=f"not dispatched: submitting Ray job {submission} failed {attempts} times "
                                   f"(SCDD_MAX_DELIVERIES {limit}); the operator has the errors in the dispatcher's log")
            return "done"
        spec = json.loads(record["spec"])
        reserved, why = self.store.reserve(job_id, record["tenant"], gpus_of(spec.get("resources", {})),
                                           self.settings.max_running, self.settings.max_gpus)
        if why in ("final", "missing"):  # it ended (or went) between the read and the reserve: nothing to run
            self.ack(message_id, job_id)
            return "done"
        if not reserved:
            self.waiting[job_id] = message_id
            return why
        attempt = attempt_of(record)
        if record["state"] == "queued" and attempt > 1 and not self.previous_attempt_ended(job_id, attempt):
            self.waiting[job_id] = message_id  # its slot held: the previous attempt's driver is still stopping
            return "previous"
        if record["state"] == "queued":
            try:
                started = self.ray.submit(job_id, attempt, spec, self.job_env())
            except Exception as exc:  # Ray unreachable or refusing: count it, retry on a later tick
                self.store.record_submit_failure(job_id, f"{type(exc).__name__}: {redact_text(str(exc))[:500]}")
                log.warning("job %s: submitting to Ray failed (%s); will retry", job_id, redact_text(str(exc)))
                self.waiting[job_id] = message_id
                return "retry"
            self.store.transition(job_id, "dispatched", ("queued",), dispatched_at=f"{time.time():.3f}")
            log.info("job %s of %s %s Ray job %s", job_id, record["tenant"],
                     "submitted as" if started else "already was", submission_id(job_id, attempt))
        self.waiting.pop(job_id, None)
        self.following[job_id] = message_id
        return "following"

    def previous_attempt_ended(self, job_id: str, attempt: int) -> bool:
        """Whether the Ray job of the attempt before `attempt` has ended (or Ray has none), so the resumed attempt is
        the only driver writing the job's output. One still running (a forced stop in flight) is stopped again."""
        previous = submission_id(job_id, attempt - 1)
        status, _ = self.ray.status(previous)
        if status is None or status in TERMINAL:
            return True
        log.info("job %s attempt %d waits for the Ray job %s of its previous attempt to end (%s)", job_id, attempt,
                 previous, status)
        self.ray.stop(previous)
        return False

    def job_env(self) -> dict[str, str]:
        """The Ray job's environment: REDIS_URL only with SCDD_JOBS_REDIS_URL=pass (a runtime_env is readable by
        anyone with the Ray Jobs API or dashboard, so a password in it is exposed there)."""
        s = self.settings
        env = {"SCDD_REDIS_PREFIX": s.redis_prefix, "SCDD_EVENTS_MAXLEN": str(s.events_maxlen)}
        # the cluster's worker device, placement wait and restarts, when configured here (the chart sets both on the Ray
        # pods too): the driver decides resources.device auto and how long a stage waits for its workers by them
        if s.worker_device is not None:
            env["SCDD_WORKER_DEVICE"] = s.worker_device
        if s.placement_timeout_s is not None:
            env["SCDD_PLACEMENT_TIMEOUT_S"] = f"{s.placement_timeout_s:g}"
        if s.max_restarts is not None:
            env["SCDD_MAX_RESTARTS"] = str(s.max_restarts)
        for name in ("curve_points", "event_buffer", "final_record_retry_s"):  # read by the drivers: non-defaults
            value = getattr(s, name)
            if value != Settings.model_fields[name].default:
                env[f"SCDD_{name.upper()}"] = f"{value:g}" if isinstance(value, float) else str(value)
        return {"REDIS_URL": s.redis_url, **env} if s.jobs_redis_url == "pass" else env

    def follow(self) -> None:
        for job_id, message_id in list(self.following.items()):
            try:
                self.follow_one(job_id, message_id)
            except Exception as exc:  # Ray briefly unreachable: ask again next tick
                log.warning("job %s: reading its Ray status failed (%s)", job_id, exc)

    def timed_out(self, job_id: str, record: dict[str, str]) -> bool:
        """Stop and fail a job past its wall-clock limit (seconds after dispatch; the tenant's max_wall_clock_s,
        else SCDD_JOB_TIMEOUT_S, recorded when it was submitted). Its Ray job's resources go with it."""
        limit, since = float(record.get("timeout_s") or 0), float(record.get("dispatched_at") or 0)
        if not limit or not since or record["state"] in FINAL_STATES or time.time() - since <= limit:
            return False
        log.warning("job %s ran past its limit of %g s; stopping its Ray job", job_id, limit)
        self.ray.stop(submission_id(job_id, attempt_of(record)))
        self.store.finish(job_id, "failed", ("queued", "dispatched", "running"),
                          error=f"timeout: still running {limit:g} s after dispatch, its wall-clock limit "
                                f"(limits.max_wall_clock_s / SCDD_JOB_TIMEOUT_S)")
        return True

    def follow_one(self, job_id: str, message_id: str) -> None:
        record = self.store.get(job_id)
        if record is None:
            return self.ack(message_id, job_id)
        submission = submission_id(job_id, attempt_of(record))
        status, message = self.ray.status(submission)
        active = ("queued", "dispatched", "running")
        if status is None:
            if record["state"] in ("queued", "dispatched"):  # Ray lost it before it ran (cluster restart)
                self.store.transition(job_id, "queued", ("dispatched",))
                self.following.pop(job_id, None)
                self.waiting[job_id] = message_id
            else:
                self.store.finish(job_id, "failed", active,
                                  error=f"the Ray cluster lost its job {submission} (restarted?): resume the job")
                self.ack(message_id, job_id)
            return
        if status == "PENDING" and record["state"] in FINAL_STATES:
            # cancelled before its driver started; Ray may keep it pending after the stop (while it waits
            # for resources), and should it start later, the entrypoint refuses a finished job
            return self.ack(message_id, job_id)
        if status in TERMINAL:
            if record["state"] not in FINAL_STATES:
                if status == "STOPPED" and record.get("cancel_requested") == "1":
                    self.store.finish(job_id, "cancelled", active, error="stopped on request")
                elif status == "SUCCEEDED":
                    self.store.finish(job_id, "failed", active, error="the job's driver exited without a result")
                else:  # Ray's message is the driver log's tail (tracebacks, paths, addresses): for operators only
                    log.warning("job %s: Ray job %s %s: %s", job_id, submission, status.lower(),
                                redact_text(message[-2000:]))
                    self.store.finish(job_id, "failed", active,
                                      error=f"the job's driver {status.lower()} (Ray job {submission}) without ending "
                                            f"the job; the operator can read why with `ray job logs {submission}`")
            return self.ack(message_id, job_id)
        if self.timed_out(job_id, record):
            return
        requested = float(record.get("cancel_requested_at") or 0)
        if not requested or record["state"] in FINAL_STATES:
            return
        if status == "PENDING":  # its driver has not started, so it cannot see the flag: stop it now
            self.ray.stop(submission)
            self.store.finish(job_id, "cancelled", active, error="cancelled before its driver started")
        elif time.time() - requested > self.settings.cancel_grace_s:
            log.warning("job %s did not stop within %.0f s of the cancel; stopping its Ray job", job_id,
                        self.settings.cancel_grace_s)
            self.ray.stop(submission)
            self.store.finish(job_id, "cancelled", active,
                              error=f"stopped by force {self.settings.cancel_grace_s:.0f} s after the cancel request")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings()
    if not settings.ray_jobs_url:
        print("scdd dispatcher: set RAY_ADDRESS to the Ray Jobs API, e.g. http://127.0.0.1:8265", file=sys.stderr)
        return 2
    store = BlockingJobStore.connect(settings.redis_url, settings.redis_prefix, settings.events_maxlen)
    dispatcher = Dispatcher(settings, store, RayJobs(settings.ray_jobs_url, os.environ.get("SCDD_JOB_PYTHON", "python")))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: dispatcher.stopped.set())
    dispatcher.run()
    log.info("dispatcher %s stopped; its jobs go on in Ray and another dispatcher takes them over", dispatcher.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
