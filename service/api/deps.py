"""Typed dependencies of the routes: settings, the job store, the caller's tenant (and its read rate), the caller's
job."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.exceptions import OutOfMemoryError

from service.api.async_jobstore import AsyncJobStore
from service.auth import ApiKeys, Tenant
from service.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> AsyncJobStore:
    return request.app.state.store


async def take_read_token(request: Request, tenant: str) -> None:
    """One read of `tenant` against its token bucket in Redis (so every API process counts against the same
    SCDD_READ_RATE per minute, after bursts of SCDD_READ_BURST), or 429 with Retry-After naming the limit. An event
    stream takes one token when it opens, however many events it carries."""
    settings: Settings = request.app.state.settings
    if settings.read_rate <= 0:
        return
    store: AsyncJobStore = request.app.state.store
    try:
        taken, wait = await store.take_tokens(store.keys.read_rate(tenant), settings.read_rate / 60, settings.read_burst)
    except OutOfMemoryError:  # Redis is full and refuses the bucket's write: reads go on (every job stays readable)
        return
    if not taken:
        raise HTTPException(429, f"tenant {tenant!r} reads faster than its limit of {settings.read_rate:g} requests "
                                 f"per minute (bursts of {settings.read_burst}; SCDD_READ_RATE, SCDD_READ_BURST): "
                                 f"retry in {int(wait)} s, and poll less often (or follow GET /v1/jobs/{{id}}/events, "
                                 "one request for a job's whole progress)", headers={"Retry-After": str(int(wait))})


def tenant_of_key(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Tenant:
    """The tenant of the API key sent, or 401."""
    keys: ApiKeys = request.app.state.keys
    tenant = keys.tenant_for(credentials.credentials) if credentials else None
    if tenant is None:
        raise HTTPException(401, "missing or unknown API key: send 'Authorization: Bearer <key>'",
                            headers={"WWW-Authenticate": "Bearer"})
    return tenant


async def get_tenant(request: Request,
                     credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Tenant:
    """The caller's tenant (401 without a valid key); a read (GET) also takes a token of its read rate (429)."""
    tenant = tenant_of_key(request, credentials)
    if request.method == "GET":
        await take_read_token(request, tenant.name)
    return tenant


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[AsyncJobStore, Depends(get_store)]
TenantDep = Annotated[Tenant, Depends(get_tenant)]


async def get_job(store: StoreDep, tenant: TenantDep,
                  job_id: Annotated[str, Path(max_length=64, description="Job id, e.g. j-0192f0c1a2b3c4d5e6f7.")]) -> dict:
    """The caller's job record; another tenant's job is as absent as one that never existed."""
    record = await store.get(job_id, tenant.name)
    if record is None:
        raise HTTPException(404, f"no job {job_id!r}: list yours with GET /v1/jobs")
    return record


JobDep = Annotated[dict, Depends(get_job)]
