"""Typed dependencies of the routes: settings, the job store, the caller's tenant, the caller's job."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.async_jobstore import AsyncJobStore
from service.auth import ApiKeys, Tenant
from service.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> AsyncJobStore:
    return request.app.state.store


def get_tenant(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Tenant:
    keys: ApiKeys = request.app.state.keys
    tenant = keys.tenant_for(credentials.credentials) if credentials else None
    if tenant is None:
        raise HTTPException(401, "missing or unknown API key: send 'Authorization: Bearer <key>'",
                            headers={"WWW-Authenticate": "Bearer"})
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
