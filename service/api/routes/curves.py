"""A job's metric curves: its progress metrics over the whole run, downsampled (service/curves.py)."""

from __future__ import annotations

from fastapi import APIRouter

from api_schema import CurvesOut, ErrorOut
from service.api.deps import JobDep, SettingsDep, StoreDep
from service.curves import curves_out

router = APIRouter(prefix="/v1/jobs", tags=["events"])


@router.get("/{job_id}/curves", response_model=CurvesOut,
            responses={401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 429: {"model": ErrorOut}})
async def job_curves(job: JobDep, store: StoreDep, settings: SettingsDep) -> CurvesOut:
    """The job's metric curves (losses such as ce and bn in recover, loss in training loops), one per attempt, stage
    and loop: at most `max_points` points each, spread over the whole run however long it is, the last one the
    latest progress event. The event stream keeps only a job's latest events; these keep its whole history (until
    the job expires). Empty until the job's first progress event with metrics."""
    return curves_out(job["id"], await store.curves(job["id"]), settings.curve_points)
