"""The FastAPI app: `create_app(settings)`; `uvicorn --factory service.api.main:create_app` reads the environment."""

from __future__ import annotations

from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Optional

import redis
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from service.api.archive_links import ArchiveSlots
from service.api.async_jobstore import AsyncJobStore
from service.api import console
from service.api.event_hub import EventHub
from service.api.streams import StreamSlots
from service.api.middleware import BodyLimit, Metrics, RequestMetrics
from service.api.routes import artifacts, curves, events, health, jobs
from service.auth import ApiKeys
from service.records import Keys
from service.settings import Settings

DESCRIPTION = """Distill image datasets into a few synthetic images per class (SC-DD, SRe2L).

Submit a job spec, follow its progress (poll or Server-Sent Events), cancel it, and download the
images (a torchvision ImageFolder), the manifest and the report. Every call but the health checks
needs `Authorization: Bearer <API key>`."""


def _version() -> str:
    try:
        return version("scdd")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _field_path(loc: tuple) -> str:
    parts = [str(part) for part in loc if part != "body"]
    return ".".join(parts) or "body"


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{"loc": list(error["loc"]), "msg": error["msg"], "type": error["type"]} for error in exc.errors()]
    message = "; ".join(f"{_field_path(tuple(error['loc']))}: {error['msg']}" for error in errors)
    return JSONResponse({"detail": errors, "message": message}, status_code=422)


async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"the job store (Redis) is unavailable: {type(exc).__name__}; try again shortly"},
                        status_code=503, headers={"Retry-After": "5"})


async def _store_full(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": "the job store (Redis) is full: it reached its maxmemory and refuses writes "
                                   "(nothing stored is evicted). Try again after finished jobs expire "
                                   "(SCDD_RETENTION_DAYS); operators: raise Redis maxmemory or lower the retention"},
                        status_code=503, headers={"Retry-After": "60"})


def create_app(settings: Optional[Settings] = None) -> FastAPI:
    settings = settings or Settings()
    keys = ApiKeys.load(settings.api_keys, settings.api_keys_file, settings.max_active_jobs, settings.default_limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client = aioredis.from_url(settings.redis_url, decode_responses=True, socket_timeout=30,
                                   retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 4),
                                   retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError])
        app.state.store = AsyncJobStore(client, settings.redis_prefix, settings.events_maxlen, settings.idempotency_ttl_s)
        # one blocking reader of job events for every open stream, on a connection of its own
        reader = aioredis.from_url(settings.redis_url, decode_responses=True, socket_timeout=30, max_connections=1)
        app.state.event_hub = EventHub(reader, client, Keys(settings.redis_prefix))
        app.state.event_hub.start()
        yield
        await app.state.event_hub.stop()
        await reader.aclose()
        await client.aclose()

    app = FastAPI(title="scdd job service", version=_version(), description=DESCRIPTION, lifespan=lifespan)
    app.state.settings, app.state.keys, app.state.metrics = settings, keys, Metrics()
    app.state.stream_slots = StreamSlots(settings.max_streams_per_tenant, settings.max_streams_per_process)
    app.state.archive_slots = ArchiveSlots(settings.max_archives_per_tenant)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for error in (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        app.add_exception_handler(error, _store_unavailable)
    app.add_exception_handler(redis.exceptions.OutOfMemoryError, _store_full)
    for module in (jobs, events, curves, artifacts, health):
        app.include_router(module.router)
    if settings.console:
        console.mount(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=app.state.metrics)
    return app
