"""Request and response models of the job service's HTTP API (the job spec itself is `JobSpec`)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from api_schema.report import JobSummary

JobState = Literal["queued", "dispatched", "running", "succeeded", "failed", "cancelled"]
JOB_STATES: tuple[str, ...] = ("queued", "dispatched", "running", "succeeded", "failed", "cancelled")
ACTIVE_STATES: frozenset[str] = frozenset({"queued", "dispatched", "running"})
FINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobOut(_Out):
    """A job as the API shows it."""

    id: str = Field(..., description="Job id (also the Ray job's submission id).")
    state: JobState = Field(..., description="queued -> dispatched -> running -> succeeded | failed | cancelled.")
    stage: Optional[str] = Field(None, description="Pipeline stage running now (or the last one).")
    progress: float = Field(0.0, ge=0, le=1, description="Fraction of the whole job done (never decreases).")
    created_at: float = Field(..., description="Unix time of submission.")
    updated_at: float = Field(..., description="Unix time of the last change.")
    dispatched_at: Optional[float] = Field(None, description="Unix time the job was handed to Ray.")
    started_at: Optional[float] = Field(None, description="Unix time the job's driver started.")
    finished_at: Optional[float] = Field(None, description="Unix time the job ended.")
    cancel_requested: bool = Field(False, description="A cancel was asked for.")
    attempt: int = Field(1, ge=1, description="1, then one more each time the job is resumed (POST .../resume).")
    error: Optional[str] = Field(None, description="Why the job failed (or how it was stopped).")
    summary: Optional[JobSummary] = Field(None, description="Report summary, once succeeded.")
    spec: dict[str, Any] = Field(..., description="The spec the job runs (with the output location the service chose).")


class JobList(_Out):
    jobs: list[JobOut] = Field(..., description="The caller's jobs, newest first.")
    next_cursor: Optional[str] = Field(None, description="Pass as `cursor` for the next page; null on the last page.")


class ResumeIn(BaseModel):
    """What may change when a job is resumed: only how many workers run it (its output, units and spec stay)."""

    model_config = ConfigDict(extra="forbid")

    workers: Optional[int] = Field(
        None, ge=1, le=4096, description="resources.workers of the resumed run; None keeps the job's. Another count "
        "is accepted exactly when it leaves the images the same (recover.iterations 0), else refused with 422 "
        "naming the count that can resume the job.")


class ArtifactOut(_Out):
    path: str = Field(..., description="Path relative to the job's artifact prefix, e.g. images/0/000.png.")
    size: int = Field(..., ge=0, description="Bytes.")


class ArtifactList(_Out):
    """One page of a job's files (state/, the run's resume records, is never listed), in path order."""

    files: list[ArtifactOut] = Field(..., description="The page's files under `prefix`.")
    folders: list[str] = Field([], description="With `delimiter=/`: the sub-folders of `prefix` on this page, each "
                               "once, ending in / (e.g. images/3/); what they hold is not in `files`.")
    next_cursor: Optional[str] = Field(None, description="Pass as `cursor` for the next page; null on the last page.")


class ArchiveLinkOut(_Out):
    """A download link for a job's zip that needs no Authorization header (for a browser's own download)."""

    url: str = Field(..., description="GET it before `expires_at`: /v1/jobs/{id}/archive?token=...")
    expires_at: float = Field(..., description="Unix time the link stops working; then ask for a new one.")


class CurvePointOut(_Out):
    x: float = Field(..., description="The loop's done count when the point was taken (steps, epochs, iterations: "
                     "the loop's unit).")
    t: float = Field(..., description="Unix time of the progress event.")
    values: dict[str, float] = Field(..., description="The event's float metrics, e.g. ce and bn (recover) or loss.")


class CurveOut(_Out):
    attempt: int = Field(..., ge=1, description="The run of the job the curve belongs to (a resumed job counts up).")
    stage: str = Field(..., description="Pipeline stage, e.g. squeeze, recover, validate.")
    loop: str = Field(..., description="The loop within the stage (a stage may run several).")
    points: list[CurvePointOut] = Field(..., description="Oldest first, spread over the whole loop; the last one is "
                                        "the latest progress event.")


class CurvesOut(_Out):
    """A job's metric curves, downsampled from its progress events: they cover the whole run, however long, while
    the event stream keeps only its latest events."""

    job_id: str
    max_points: int = Field(..., ge=2, description="The most points a curve keeps.")
    curves: list[CurveOut] = Field(..., description="By attempt, then by the time of the first point.")


class ErrorOut(_Out):
    """Every 4xx/5xx answer: what went wrong and what to do about it."""

    detail: Any = Field(..., description="A message, or for 422 a list of {loc, msg, type} per invalid field.")
    message: Optional[str] = Field(None, description="422: all field errors in one line (path: message; ...).")
