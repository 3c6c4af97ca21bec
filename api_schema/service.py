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
    error: Optional[str] = Field(None, description="Why the job failed (or how it was stopped).")
    summary: Optional[JobSummary] = Field(None, description="Report summary, once succeeded.")
    spec: dict[str, Any] = Field(..., description="The spec the job runs (with the output location the service chose).")


class JobList(_Out):
    jobs: list[JobOut] = Field(..., description="The caller's jobs, newest first.")
    next_cursor: Optional[str] = Field(None, description="Pass as `cursor` for the next page; null on the last page.")


class ArtifactOut(_Out):
    path: str = Field(..., description="Path relative to the job's artifact prefix, e.g. images/0/000.png.")
    size: int = Field(..., ge=0, description="Bytes.")


class ArtifactList(_Out):
    files: list[ArtifactOut]


class ErrorOut(_Out):
    """Every 4xx/5xx answer: what went wrong and what to do about it."""

    detail: Any = Field(..., description="A message, or for 422 a list of {loc, msg, type} per invalid field.")
    message: Optional[str] = Field(None, description="422: all field errors in one line (path: message; ...).")
