"""Submit, read, list and cancel jobs."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Optional

from fastapi import APIRouter, Body, Header, HTTPException, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from api_schema import ErrorOut, JobList, JobOut, JobSpec, JobState, ResumeIn
from service import records
from service.admission import AdmissionError, admit
from service.auth import Tenant
from service.budget import over_budget
from service.settings import Settings
from service.api.deps import JobDep, SettingsDep, StoreDep, TenantDep
from service.api.async_jobstore import JOB_ID

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

ID_ATTEMPTS = 3
ERRORS = {401: {"model": ErrorOut}, 404: {"model": ErrorOut}}
READ_ERRORS = {**ERRORS, 429: {"model": ErrorOut, "description": "Past the tenant's read rate (SCDD_READ_RATE): "
                                                                   "retry after Retry-After."}}
UNREADABLE = {"model": ErrorOut, "description": "The body is not text (not UTF-8), so not JSON either."}


@router.post("", status_code=202, response_model=JobOut,
             responses={**ERRORS, 400: UNREADABLE, 409: {"model": ErrorOut}, 413: {"model": ErrorOut},
                        422: {"model": ErrorOut}, 429: {"model": ErrorOut}, 503: {"model": ErrorOut}})
async def submit_job(spec: JobSpec, response: Response, tenant: TenantDep, store: StoreDep, settings: SettingsDep,
                     idempotency_key: Annotated[Optional[str], Header(min_length=1, max_length=255)] = None) -> JobOut:
    """Queue a distillation job. Retrying with the same `Idempotency-Key` returns the same job."""
    if settings.submit_rate > 0:
        allowed, wait = await store.take_submit_token(tenant.name, settings.submit_rate, settings.submit_burst)
        if not allowed:
            raise HTTPException(429, f"tenant {tenant.name!r} submits faster than its limit of {settings.submit_rate:g} "
                                     f"jobs per minute (bursts of {settings.submit_burst}; SCDD_SUBMIT_RATE, "
                                     f"SCDD_SUBMIT_BURST): retry in {wait} s", headers={"Retry-After": str(wait)})
    key_hash = hashlib.sha256(idempotency_key.encode()).hexdigest() if idempotency_key else None
    body_hash = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()
    kept, size = (tenant.limits.max_jobs_kept or settings.max_jobs_kept,  # what the tenant may keep stored
                  tenant.limits.max_stored_bytes or settings.max_stored_bytes)
    for _ in range(ID_ATTEMPTS):  # a new id is unique but for a clash of its 32 random bits in one millisecond
        job_id = records.new_job_id()
        try:
            effective = await run_in_threadpool(admit, spec, tenant, job_id, settings)  # reads checkpoint files
        except AdmissionError as exc:
            raise RequestValidationError([{"loc": loc, "msg": msg, "type": "value_error"}
                                          for loc, msg in exc.errors]) from None
        outcome, value = await store.create(job_id, tenant.name, effective, tenant.max_active_jobs, key_hash, body_hash,
                                            timeout_s=tenant.limits.max_wall_clock_s, max_jobs_kept=kept,
                                            max_stored_bytes=size)
        if outcome != "taken":
            break
    else:
        raise HTTPException(503, f"no free job id after {ID_ATTEMPTS} tries: submit again")
    if outcome == "quota":
        raise HTTPException(429, f"tenant {tenant.name!r} has {value} jobs queued or running, its limit is "
                                 f"{tenant.max_active_jobs}: wait for one to finish or cancel one")
    if outcome == "stored":
        what, stored = value.split(" ", 1)
        bound = (f"{stored} jobs stored, its limit is {kept} (limits.max_jobs_kept in the API key file, else "
                 f"SCDD_MAX_JOBS_KEPT)" if what == "jobs" else
                 f"{int(stored):,} bytes of job specs stored, and this one would pass its limit of {size:,} "
                 f"(limits.max_stored_bytes in the API key file, else SCDD_MAX_STORED_BYTES)")
        raise HTTPException(429, f"tenant {tenant.name!r} has {bound}, finished jobs included: delete finished jobs "
                                 f"you no longer need (DELETE /v1/jobs/{{id}}), or wait for retention to remove them")
    if outcome == "conflict":
        raise HTTPException(409, f"this Idempotency-Key was used for job {value} with a different spec: "
                                 "use a new key for a new job")
    record = await store.get(value, tenant.name)
    if record is None:  # the job behind a remembered key is gone
        raise HTTPException(409, "this Idempotency-Key belongs to a job that no longer exists: use a new key")
    response.headers["Location"] = f"/v1/jobs/{value}"
    if outcome == "existing":
        response.headers["Idempotent-Replayed"] = "true"
    return records.job_out(record)


@router.get("", response_model=JobList, responses={401: {"model": ErrorOut}, 422: {"model": ErrorOut},
                                                   429: READ_ERRORS[429]})
async def list_jobs(tenant: TenantDep, store: StoreDep,
                    state: Annotated[Optional[JobState], Query(description="Only jobs in this state.")] = None,
                    limit: Annotated[int, Query(ge=1, le=100)] = 20,
                    cursor: Annotated[Optional[str], Query(pattern=JOB_ID.pattern,
                                                           description="`next_cursor` of the previous page.")] = None,
                    ) -> JobList:
    """The caller's jobs, newest first."""
    found, next_cursor = await store.list(tenant.name, state, limit, cursor)
    return JobList(jobs=[records.job_out(record) for record in found], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses=READ_ERRORS)
async def get_job(job: JobDep) -> JobOut:
    """State, stage, progress, timestamps, error, and the report summary once done."""
    return records.job_out(job)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut, responses={**ERRORS, 409: {"model": ErrorOut}})
async def cancel_job(job: JobDep, store: StoreDep, tenant: TenantDep, settings: SettingsDep) -> JobOut:
    """Stop a job: a queued one at once (its record is deleted an hour later: it never ran); a running one at its
    next check, or by force after the grace period. Idempotent; a finished job answers 409."""
    outcome, state = await store.cancel(job["id"], settings.cancelled_queued_retention_s)
    if outcome == "final":
        raise HTTPException(409, f"job {job['id']} already {state}: nothing to cancel")
    return records.job_out(await store.get(job["id"], tenant.name) or job)


@router.delete("/{job_id}", status_code=204, responses={**ERRORS, 409: {"model": ErrorOut}})
async def delete_job(job: JobDep, store: StoreDep, tenant: TenantDep) -> Response:
    """Delete a finished job: its record, events and curves go now (they count towards the tenant's storage bound),
    its artifacts with the next run of the artifact GC. A queued or running job answers 409: cancel it first."""
    outcome, state = await store.delete(job["id"], tenant.name)
    if outcome == "active":
        raise HTTPException(409, f"job {job['id']} is {state}: cancel it first, then delete it once it has ended")
    if outcome == "missing":
        raise HTTPException(404, f"no job {job['id']!r}: list yours with GET /v1/jobs")
    return Response(status_code=204)


def _refuse(loc: tuple[str, ...], message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": loc, "msg": message, "type": "value_error"}])


def _resumed_spec(job: dict, workers: Optional[int], tenant: Tenant, settings: Settings) -> tuple[Optional[dict], int]:
    """The spec a resume runs (None: the job's own) and its worker count; RequestValidationError when the new worker
    count would change the images (`JobSpec.resume_refusal`) or exceeds the tenant's bounds. Blocking (a budget check
    may count the class folders of the dataset root): run in a thread."""
    spec = JobSpec.model_validate(json.loads(job["spec"]))
    if workers is None or workers == spec.resources.workers:
        return None, spec.resources.workers
    refusal = spec.resume_refusal(workers)
    if refusal is not None:
        raise _refuse(("body", "workers"), refusal)
    data = spec.to_dict()
    data["resources"]["workers"] = workers
    try:
        resumed = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise _refuse(("body", "workers"), "; ".join(e["msg"] for e in exc.errors())) from None
    errors = over_budget(resumed, tenant, settings=settings)
    if errors:
        raise RequestValidationError([{"loc": loc, "msg": msg, "type": "value_error"} for loc, msg in errors])
    return resumed.to_dict(), workers


@router.post("/{job_id}/resume", status_code=202, response_model=JobOut,
             responses={**ERRORS, 400: UNREADABLE, 409: {"model": ErrorOut}, 422: {"model": ErrorOut},
                        429: {"model": ErrorOut}})
async def resume_job(job: JobDep, store: StoreDep, tenant: TenantDep, settings: SettingsDep,
                     body: Annotated[Optional[ResumeIn], Body()] = None) -> JobOut:
    """Run a failed, cancelled or timed-out job again on its own output as its next `attempt`: the teacher, the
    recover units and the training checkpoints already made are kept, the rest is made. The event history goes on
    with a `job_resumed` event. `workers` may change only where it leaves the images the same (422 otherwise)."""
    state = job["state"]
    if state not in ("failed", "cancelled"):
        what = "it succeeded: nothing to resume" if state == "succeeded" else f"it is {state}: cancel it first, or wait"
        raise HTTPException(409, f"job {job['id']} cannot be resumed: {what}")
    spec, workers = await run_in_threadpool(_resumed_spec, job, body.workers if body else None, tenant, settings)
    event = {"type": "job_resumed", "job_id": job["id"], "workers": workers, "previous_state": state,
             "previous_error": job.get("error") or None}
    outcome, value = await store.resume(job["id"], tenant.name, tenant.max_active_jobs, spec, event)
    if outcome == "quota":
        raise HTTPException(429, f"tenant {tenant.name!r} has {value} jobs queued or running, its limit is "
                                 f"{tenant.max_active_jobs}: wait for one to finish or cancel one")
    if outcome != "queued":
        raise HTTPException(409, f"job {job['id']} cannot be resumed: it is {value or 'gone'} now")
    return records.job_out(await store.get(job["id"], tenant.name) or job)
