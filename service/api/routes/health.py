"""Liveness, readiness and Prometheus metrics (no API key needed)."""

from __future__ import annotations

import logging

import httpx
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api_schema import JOB_STATES
from service.api.deps import SettingsDep, StoreDep

router = APIRouter(tags=["health"])
log = logging.getLogger("scdd.api")


@router.get("/healthz")
async def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


async def _ray_state(url: str | None) -> str:
    if not url:
        log.warning("readyz: RAY_ADDRESS is not set; set it to the Ray Jobs API (http://head:8265)")
        return "not configured"
    try:
        async with httpx.AsyncClient(timeout=2.0) as client:
            answer = await client.get(f"{url.rstrip('/')}/api/version")
    except httpx.HTTPError as exc:
        log.warning("readyz: the Ray Jobs API at %s is unreachable: %s: %s", url, type(exc).__name__, exc)
        return "unreachable"
    if answer.status_code >= 500:
        log.warning("readyz: the Ray Jobs API at %s answers %s", url, answer.status_code)
        return "unreachable"
    return "ok"


@router.get("/readyz", responses={503: {"description": "Redis or Ray is not reachable."}})
async def readyz(store: StoreDep, settings: SettingsDep) -> JSONResponse:
    """Redis answers PING and the Ray Jobs API answers. Anyone may ask, so the answer says only ok, unreachable or
    not configured; the cause (exception text, addresses) goes to the API's log for its operator."""
    try:
        await store.ping()
        redis_state = "ok"
    except Exception as exc:  # any failure of the connection means not ready
        log.warning("readyz: Redis is unreachable: %s: %s", type(exc).__name__, exc)
        redis_state = "unreachable"
    ray_state = await _ray_state(settings.ray_jobs_url)
    ready = redis_state == "ok" and ray_state == "ok"
    return JSONResponse({"status": "ready" if ready else "not ready", "redis": redis_state, "ray": ray_state},
                        status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, store: StoreDep) -> Response:
    """Prometheus text format: requests, latency, queue depth, jobs by state, Redis memory used and its limit."""
    registry = request.app.state.metrics
    counts = await store.counts()
    for state in JOB_STATES:
        registry.jobs.labels(state).set(counts.get(state, 0))
    registry.queue_depth.set(counts.get("queued", 0))
    used, limit = await store.memory()
    registry.redis_memory.set(used)
    registry.redis_maxmemory.set(limit)
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
