"""List and download a job's artifacts: paged listings, one file, the whole set as a zip, and signed links to it.

A browser cannot put an Authorization header on its own downloads, so the console asks for a short-lived link
(`POST .../archive-link`) and lets the browser download to disk from it, instead of holding the zip in memory.
The link's token is an HMAC-SHA256 over (tenant, job id, expiry) with a key every API replica shares: the
setting SCDD_LINK_SECRET, else a random one made once and kept in Redis (SET NX: the first replica wins).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import secrets
import threading
import time
import weakref
from collections import Counter
from collections.abc import Generator
from itertools import chain
from typing import Annotated, Literal, Optional

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials

from api_schema import ArtifactList, ArtifactOut, ErrorOut
from api_schema.service import ArchiveLinkOut
from service.api.deps import JobDep, SettingsDep, StoreDep, TenantDep, _bearer, get_tenant
from service.api.streams import Slot
from service.artifacts import BadCursor, JobArtifacts, UnsafePath, check_prefix, zip_stream

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"])

ERRORS = {401: {"model": ErrorOut}, 404: {"model": ErrorOut}}
NEW_LINK = "ask for a new one: POST /v1/jobs/{id}/archive-link (the console's Download all does)"


def _artifacts(job: dict) -> JobArtifacts:
    return JobArtifacts(json.loads(job["spec"])["output"]["url"])


@router.get("/{job_id}/artifacts", response_model=ArtifactList, responses={**ERRORS, 400: {"model": ErrorOut}})
async def list_artifacts(
    job: JobDep,
    prefix: Annotated[str, Query(max_length=1024, description="Only paths starting with this, e.g. images/3/ "
                                 "(a relative path, checked as one).")] = "",
    limit: Annotated[int, Query(ge=1, le=5000, description="Most files (and folders) on a page.")] = 1000,
    cursor: Annotated[Optional[str], Query(max_length=2048, description="`next_cursor` of the previous page.")] = None,
    delimiter: Annotated[Optional[Literal["/"]], Query(description="/: list the sub-folders of `prefix` once each "
                                                       "(in `folders`) instead of what they hold.")] = None,
) -> ArtifactList:
    """The job's files (images/<class>/<file>.png, manifest.json, report.json, grid.png, teacher/...), a page at a
    time in path order; the run's resume records (state/) are not among them. Once the job has written its
    manifest, its images are listed from it."""
    try:
        check_prefix(prefix)
    except UnsafePath:
        raise HTTPException(400, f"prefix {prefix!r} is not a plain relative path: use one like images/3/ "
                                 "(no leading /, no . or .. segments, no % or backslash)") from None
    try:
        page = await run_in_threadpool(_artifacts(job).page, prefix, cursor, limit, delimiter == "/")
    except BadCursor:
        raise HTTPException(400, "cursor is not one this route returned: pass the next_cursor of the previous "
                                 "page, or leave it out to start again") from None
    return ArtifactList(files=[ArtifactOut(path=path, size=size) for path, size in page.files],
                        folders=page.folders, next_cursor=page.next_cursor)


# -- the archive and its links ------------------------------------------------------------------------------
class ArchiveSlots:
    """Zip downloads open per tenant on this API process: each holds a client connection and reads the store for
    as long as the download takes, so one tenant cannot take all of the process's threads and bandwidth."""

    def __init__(self, per_tenant: int):
        self.per_tenant = per_tenant
        self.open: Counter[str] = Counter()
        self._lock = threading.Lock()  # released from the server's worker threads, taken on the event loop

    def take(self, tenant: str) -> Slot:
        with self._lock:
            if self.open[tenant] >= self.per_tenant:
                raise HTTPException(429, f"tenant {tenant!r} has {self.open[tenant]} archive downloads running, its "
                                         "limit (SCDD_MAX_ARCHIVES_PER_TENANT): wait for one to finish",
                                    headers={"Retry-After": "10"})
            self.open[tenant] += 1
        return Slot(self, tenant)

    def _give_back(self, tenant: str) -> None:
        with self._lock:
            self.open[tenant] -= 1
            if self.open[tenant] <= 0:
                del self.open[tenant]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_link(secret: bytes, tenant: str, job_id: str, expires: int) -> str:
    """`<payload>.<mac>`: the payload (tenant, expiry) travels in the token, the job id is the URL's."""
    payload = _b64(json.dumps([tenant, expires]).encode())
    mac = hmac.new(secret, f"{tenant}\n{job_id}\n{expires}".encode(), hashlib.sha256).digest()
    return f"{payload}.{_b64(mac)}"


def verify_link(secret: bytes, token: str, job_id: str, now: float) -> str:
    """The tenant a token was made for, or 403 saying to ask for a new link (forged, for another job, expired)."""
    try:
        payload, mac = token.split(".")
        tenant, expires = json.loads(_unb64(payload))
        want = hmac.new(secret, f"{tenant}\n{job_id}\n{int(expires)}".encode(), hashlib.sha256).digest()
        valid = hmac.compare_digest(want, _unb64(mac))
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        valid = False
    if not valid:
        raise HTTPException(403, f"this download link is not valid for job {job_id!r}: {NEW_LINK}")
    if expires < now:
        raise HTTPException(403, f"this download link expired {now - expires:.0f} s ago: {NEW_LINK}")
    return tenant


async def link_secret(request: Request) -> bytes:
    """The links' key: SCDD_LINK_SECRET, else the one in Redis (made by whichever replica asked first)."""
    settings = request.app.state.settings
    if settings.link_secret is not None:
        return settings.link_secret.get_secret_value().encode()
    store = request.app.state.store
    key = f"{store.keys.prefix}:link-secret"
    secret = await store.redis.get(key)
    if secret is None:
        await store.redis.set(key, secrets.token_hex(32), nx=True)
        secret = await store.redis.get(key)
    return secret.encode()


async def archive_access(
    request: Request, store: StoreDep,
    job_id: Annotated[str, Path(max_length=64, description="Job id, e.g. j-0192f0c1a2b3c4d5e6f7.")],
    credentials: Annotated[Optional[HTTPAuthorizationCredentials], Depends(_bearer)],
    token: Annotated[Optional[str], Query(max_length=1024, description="From POST .../archive-link, instead of "
                                          "the Authorization header.")] = None,
) -> tuple[dict, str]:
    """(the job, its tenant) from a link's token, else from the API key."""
    if token is not None:
        tenant = verify_link(await link_secret(request), token, job_id, time.time())
    else:
        tenant = get_tenant(request, credentials).name
    record = await store.get(job_id, tenant)
    if record is None:
        raise HTTPException(404, f"no job {job_id!r}: list yours with GET /v1/jobs")
    return record, tenant


class ArchiveResponse(StreamingResponse):
    """A zip download that gives its tenant's slot back, and closes its files, the moment it ends however it ends:
    when a client leaves mid-way Starlette stops iterating and leaves the generator to the garbage collector,
    which took seconds in the tests; a slot held that long would refuse the tenant's retry with 429."""

    def __init__(self, pieces: Generator[bytes, None, None], slot: Slot, job_id: str):
        super().__init__(pieces, media_type="application/zip",
                         headers={"Content-Disposition": f'attachment; filename="{job_id}.zip"'})
        self.pieces, self.slot = pieces, slot
        weakref.finalize(self, slot.release)  # a response that is never sent

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()
            with contextlib.suppress(ValueError):  # still running in a worker thread: the collector closes it
                self.pieces.close()


@router.get("/{job_id}/archive", responses={200: {"content": {"application/zip": {}}}, **ERRORS,
                                            403: {"model": ErrorOut}, 429: {"model": ErrorOut}})
async def download_archive(request: Request,
                           access: Annotated[tuple[dict, str], Depends(archive_access)]) -> StreamingResponse:
    """The job's images/, manifest.json, report.json, grid.png and teacher/ as one zip (entries under `<job id>/`,
    stored uncompressed: the images are PNGs), streamed as it is made; files whose names the API refuses are left
    out and named in SKIPPED.txt. Authorised by the API key or by a link's `token`. 404 while the job has written
    none of them; at most SCDD_MAX_ARCHIVES_PER_TENANT at once per tenant (429)."""
    job, tenant = access
    slot = request.app.state.archive_slots.take(tenant)
    try:
        artifacts = _artifacts(job)
        entries = await run_in_threadpool(artifacts.archive_entries)
        first = await run_in_threadpool(next, entries, None)
        if first is None:
            raise HTTPException(404, f"job {job['id']} has no artifacts yet: see GET /v1/jobs/{job['id']}")
    except BaseException:
        slot.release()
        raise
    return ArchiveResponse(zip_stream(artifacts, chain([first], entries), job["id"]), slot, job["id"])


@router.post("/{job_id}/archive-link", response_model=ArchiveLinkOut, responses=ERRORS)
async def archive_link(request: Request, job: JobDep, tenant: TenantDep, settings: SettingsDep) -> ArchiveLinkOut:
    """A link to the job's zip that works without the Authorization header for `SCDD_ARCHIVE_LINK_TTL_S` seconds
    (default 300), for this job and tenant only: a browser downloads it to disk itself."""
    expires = int(time.time()) + settings.archive_link_ttl_s
    token = sign_link(await link_secret(request), tenant.name, job["id"], expires)
    return ArchiveLinkOut(url=f"/v1/jobs/{job['id']}/archive?token={token}", expires_at=expires)


@router.get("/{job_id}/artifacts/{path:path}", responses={200: {"content": {"application/octet-stream": {}}},
                                                         400: {"model": ErrorOut}, **ERRORS})
async def download_artifact(job: JobDep, path: Annotated[str, Path(description="A path from the listing.")]) -> StreamingResponse:
    """One file, streamed (not the run's state/)."""
    artifacts = _artifacts(job)
    try:
        full = await run_in_threadpool(artifacts.locate, path)
    except UnsafePath:
        raise HTTPException(400, f"artifact path {path!r} is not a plain relative path inside the job: use a path "
                                 "from GET /v1/jobs/{id}/artifacts") from None
    if full is None:
        raise HTTPException(404, f"job {job['id']} has no artifact {path!r}: see GET /v1/jobs/{job['id']}/artifacts")
    size = await run_in_threadpool(artifacts.size, full)
    return StreamingResponse(artifacts.stream(full), media_type=JobArtifacts.media_type(path),
                             headers={"Content-Length": str(size)})
