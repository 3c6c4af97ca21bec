"""Service settings, read from the environment once (`Settings()`), passed on as a typed object.

`REDIS_URL` and `RAY_ADDRESS` keep the names Redis and Ray users know; everything else is `SCDD_*`.
`RAY_ADDRESS` here is the Ray dashboard / Jobs API address (http://head:8265, as for `ray job submit`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal, Optional

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from service.auth import Limits


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SCDD_", frozen=True, extra="ignore", populate_by_name=True)

    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias=AliasChoices("REDIS_URL", "SCDD_REDIS_URL"),
                           description="Redis holding job records, the queue and events (use AOF persistence).")
    ray_address: Optional[str] = Field(None, validation_alias=AliasChoices("RAY_ADDRESS", "SCDD_RAY_ADDRESS"),
                                       description="Ray Jobs API address, e.g. http://127.0.0.1:8265.")
    redis_prefix: str = Field("scdd", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Prefix of every Redis key.")
    artifacts: str = Field("scdd-service/artifacts",
                           description="Artifact root (folder or s3://bucket/prefix); a job writes under <root>/<tenant>/<job id>.")
    teacher_cache: Optional[str] = Field(None, description="Teacher cache root (per tenant below it). None: <artifacts>/.teachers.")
    data_roots: str = Field("/usr/share/datasets",
                            description="Folders (os.pathsep-separated) a spec may read data and checkpoints from.")
    api_keys: Optional[str] = Field(None, description="tenant=key pairs, comma-separated (hashed on load).")
    api_keys_file: Optional[str] = Field(None, description="YAML/JSON file: tenants: {name: {keys_sha256: [...], max_active_jobs: N}}.")
    max_body_bytes: int = Field(65536, ge=1024, description="Larger request bodies are refused with 413.")
    max_active_jobs: int = Field(8, ge=1, description="Per-tenant limit of queued + dispatched + running jobs.")
    max_running: int = Field(2, ge=1, description="Cluster-wide limit of dispatched + running jobs.")
    max_gpus: int = Field(0, ge=0, description="Cluster-wide limit of GPUs held by dispatched + running jobs (a job "
                          "holds resources.workers GPUs unless its device is cpu); 0: only max_running bounds them. "
                          "A job asking for more is refused at submission.")
    events_maxlen: int = Field(10000, ge=100, description="Events kept per job (older ones are trimmed).")
    curve_points: int = Field(256, ge=8, le=100_000, description="Points kept per metric curve of a job (one per "
                              "attempt, stage and loop; downsampled over the whole run, GET /v1/jobs/{id}/curves). "
                              "Read by the job's driver.")
    idempotency_ttl_s: int = Field(86400, ge=60, description="How long an Idempotency-Key is remembered.")
    cancel_grace_s: float = Field(30.0, ge=0, description="Cooperative cancel time before the Ray job is stopped.")
    reclaim_after_s: float = Field(60.0, gt=0, description="A dispatcher silent this long loses its messages to another.")
    max_deliveries: int = Field(5, ge=1, description="Failed submits of a job to Ray before its message is "
                                "dead-lettered and the job fails (a dispatcher's takeover of a message is not counted).")
    poll_s: float = Field(1.0, gt=0, description="How often the dispatcher polls Ray and the queue.")
    max_workers: int = Field(8, ge=1, description="Workers (and so GPUs) one job may ask for; a tenant's own limit "
                             "in the key file wins.")
    max_image_iterations: int = Field(1_000_000_000, ge=1, description="Recover work one job may ask for: images "
                                      "(IPC x classes) x iterations (SRe2L's ImageNet recipe: 50 000 images x 4 000 "
                                      "= 2e8); a tenant's own limit wins.")
    max_epochs: int = Field(1000, ge=1, description="Epochs of any one training schedule of a job (teacher, SSL, "
                            "probe, student, full data); a tenant's own limit wins.")
    max_job_memory_gib: Optional[float] = Field(None, gt=0, description="Estimated peak memory (GiB) of any one "
                                                "process of a job (service/memory_estimate.py estimates it from the spec); a "
                                                "tenant's own limit wins. None: node_memory_gib bounds it.")
    job_timeout_s: float = Field(604800.0, ge=0, description="A job still running this long after dispatch is stopped "
                                 "and fails with 'timeout'; 0: no limit; a tenant's max_wall_clock_s wins.")
    max_streams_per_tenant: int = Field(20, ge=1, description="Event streams one tenant may hold open on one API "
                                        "process; more get 429.")
    max_streams_per_process: int = Field(1000, ge=1, description="Event streams one API process holds open at most "
                                         "(they share one Redis reader; each costs a task and a queue); more get 429.")
    max_archives_per_tenant: int = Field(2, ge=1, description="Zip downloads (GET /v1/jobs/{id}/archive) one tenant "
                                         "may have running at once on one API process; more get 429.")
    archive_link_ttl_s: int = Field(300, ge=10, le=86400, description="How long a download link from POST "
                                    "/v1/jobs/{id}/archive-link stays valid (seconds).")
    link_secret: Optional[SecretStr] = Field(None, description="Key that signs download links (HMAC-SHA256); every "
                                             "API replica needs the same. None: one is made once and kept in Redis "
                                             "(<redis_prefix>:link-secret).")
    submit_rate: float = Field(60.0, ge=0, description="Jobs a tenant may submit per minute, on average (token "
                               "bucket; 0: no limit); faster submissions get 429 with Retry-After.")
    submit_burst: int = Field(20, ge=1, description="Submissions a tenant may make at once before submit_rate applies.")
    retention_days: float = Field(30.0, ge=0, description="Finished jobs' records and events are deleted this long "
                                  "after they end (their artifacts when the GC runs: python -m service.gc); 0 keeps them.")
    max_jobs_kept: int = Field(2000, ge=1, description="Jobs one tenant may have stored in Redis, finished ones "
                               "included (until retention or DELETE /v1/jobs/{id} removes them); a submission past it "
                               "gets 429 naming the bound; the tenant's own max_jobs_kept in the key file wins.")
    max_stored_bytes: int = Field(64 * 1024 * 1024, ge=65536, description="Bytes of job specs one tenant may have "
                                  "stored in Redis, finished jobs included; a submission past it gets 429; the "
                                  "tenant's own max_stored_bytes in the key file wins.")
    cancelled_queued_retention_s: float = Field(3600.0, ge=0, description="A job cancelled before it was dispatched "
                                                "is deleted from Redis this long after (it never ran: nothing to "
                                                "keep for retention_days).")
    final_record_retry_s: float = Field(600.0, ge=0, description="How long a job's driver keeps trying to reach Redis "
                                        "while it is unreachable: to claim the job when Ray starts it, and to write "
                                        "its final record (state, error, summary) when it ends. Progress "
                                        "events go through a bounded buffer and are dropped, oldest progress first, "
                                        "while Redis is away. Read by the job's driver.")
    event_buffer: int = Field(1000, ge=10, le=100_000, description="Events a job's driver holds while Redis is slow or "
                              "away (progress events beyond it are dropped, stage and final events kept). Read by the "
                              "job's driver.")
    read_rate: float = Field(3000.0, ge=0, description="Read requests (GET) a tenant may make per minute, on average "
                             "(token bucket in Redis; 0: no limit); faster ones get 429 with Retry-After.")
    read_burst: int = Field(500, ge=1, description="Read requests a tenant may make at once before read_rate applies.")
    max_archive_files: int = Field(200_000, ge=1, description="Files one zip download may hold (the zip writer keeps "
                                   "an entry per file in memory); a larger output gets 413 naming the per-file route.")
    archive_bytes_per_hour: int = Field(50 * 1024**3, ge=1, description="Bytes of zip downloads one tenant may start "
                                        "per hour across all API processes (counted in Redis when a download "
                                        "starts); past it 429 with Retry-After.")
    node_cpus: Optional[int] = Field(None, ge=1, description="CPUs of the largest node a job's driver or worker can "
                                     "land on: resources.threads above it is refused at submission (the Ray job could "
                                     "never be placed). None: this machine's CPU count. The chart sets it from its "
                                     "worker groups.")
    node_memory_gib: Optional[float] = Field(None, gt=0, description="Memory (GiB) of the largest node a job's driver "
                                             "or worker can land on: a job whose estimated peak memory "
                                             "(service/memory_estimate.py) exceeds it is refused at submission. None: this "
                                             "machine's memory. The chart sets it from its worker groups.")
    console: bool = Field(True, description="Serve the web console at /ui/ (static files; its data comes through the "
                          "authenticated /v1 routes).")
    jobs_redis_url: Literal["pass", "cluster"] = Field(
        "pass", description="How a Ray job learns REDIS_URL: pass (the dispatcher puts it into the job's runtime_env, "
        "which anyone with the Ray Jobs API or dashboard can read) or cluster (the Ray nodes have REDIS_URL in their "
        "own environment, e.g. from a Kubernetes Secret: the chart's setting).")

    worker_device: Optional[Literal["cuda", "cpu"]] = Field(
        None, description="The device of the Ray cluster's workers, which decides resources.device auto: cuda (a "
        "GPU worker group exists, even while scaled to zero: auto jobs wait for GPUs) or cpu. Read by the job's "
        "driver on the Ray head (the chart sets it there from its worker groups; `scdd serve` for the head it "
        "starts); the dispatcher passes it on in the Ray job's environment when set. None: auto jobs on a joined "
        "cluster run on CPUs, with a warning.")
    placement_timeout_s: Optional[float] = Field(
        None, gt=0, description="Seconds a job's worker group (recover, each Ray Train stage) waits for the cluster "
        "to place its workers (a GPU node's cold start) before the stage fails with the fixes. Read by the job's "
        "driver (the chart sets it on the Ray pods; the dispatcher passes it on when set). None: 600.")

    max_restarts: Optional[int] = Field(
        None, ge=0, le=100, description="How often a job's stage re-forms its workers after losing one (a node gone, "
        "a process killed) before the job fails: per recover unit (going on from the last unit made) and per Ray "
        "Train stage (from its last checkpoint); each re-formed group waits up to the placement timeout for a "
        "replacement node. Read by the job's driver (the chart sets it on the Ray pods; the dispatcher passes it "
        "on when set). None: 3.")

    @field_validator("artifacts", "teacher_cache")
    @classmethod
    def _absolute_local_paths(cls, value: Optional[str]) -> Optional[str]:
        """Jobs run in other processes and folders: local roots are made absolute once, here."""
        if value is None or "://" in value:
            return value
        return os.path.abspath(os.path.expanduser(value))

    @property
    def ray_jobs_url(self) -> Optional[str]:
        if not self.ray_address:
            return None
        address = self.ray_address
        return address if "://" in address else f"http://{address}"

    @property
    def default_limits(self) -> "Limits":
        from service.auth import Limits

        return Limits(max_workers=self.max_workers, max_image_iterations=self.max_image_iterations,
                      max_epochs=self.max_epochs, max_wall_clock_s=self.job_timeout_s,
                      max_job_memory_gib=self.max_job_memory_gib, max_jobs_kept=self.max_jobs_kept,
                      max_stored_bytes=self.max_stored_bytes)

    @property
    def data_root_list(self) -> list[str]:
        return [os.path.realpath(root) for root in self.data_roots.split(os.pathsep) if root]

    @property
    def teacher_cache_root(self) -> str:
        return self.teacher_cache or f"{self.artifacts.rstrip('/')}/.teachers"
