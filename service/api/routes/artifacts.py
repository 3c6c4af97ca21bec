"""List and download a job's artifacts: paged listings, one file, the whole set as a zip, and signed links to it
(service/api/archive_links.py)."""

from __future__ import annotations

import contextlib
import json
import time
import weakref
from collections.abc import Generator
from typing import Annotated, Literal, Optional

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials

from api_schema import ArtifactList, ArtifactOut, ErrorOut
from api_schema.service import ArchiveLinkOut
from service.api.deps import JobDep, SettingsDep, StoreDep, TenantDep, _bearer, take_read_token, tenant_of_key
from service.api.archive_links import link_secret, sign_link, take_archive_bytes, verify_link
from service.api.streams import Slot
from service.archive import ArchivePlan, plan_archive, zip_stream
from service.artifacts import BadCursor, JobArtifacts, UnsafePath, check_prefix

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"])

ERRORS = {401: {"model": ErrorOut}, 404: {"model": ErrorOut}}
READ_ERRORS = {**ERRORS, 429: {"model": ErrorOut}}  # a GET past the tenant's SCDD_READ_RATE


def _artifacts(job: dict) -> JobArtifacts:
    return JobArtifacts(json.loads(job["spec"])["output"]["url"])


@router.get("/{job_id}/artifacts", response_model=ArtifactList, responses={**READ_ERRORS, 400: {"model": ErrorOut}})
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
    time in path order; the run's resume records (state/) are not among them, nor a name the single-file route
    refuses (an older output's class folder with % or \\), so every path listed downloads. Once the job has written
    its manifest, its images are listed from it."""
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
async def archive_caller(
    request: Request, credentials: Annotated[Optional[HTTPAuthorizationCredentials], Depends(_bearer)],
    token: Annotated[Optional[str], Query(description="From POST .../archive-link, instead of the Authorization "
                                          "header.")] = None,
) -> str:
    """The caller's tenant, from a link's token (for the job in the URL, read unvalidated: the token is checked
    against it) or else from the API key. A sub-dependency, so a caller without credentials gets 401 before any
    parameter of the route is validated, as on every other job route. Either way the download is one read of the
    tenant's SCDD_READ_RATE."""
    if token is not None:
        tenant = verify_link(await link_secret(request), token, str(request.path_params.get("job_id", "")), time.time())
    else:
        tenant = tenant_of_key(request, credentials).name
    await take_read_token(request, tenant)
    return tenant


async def archive_access(
    store: StoreDep, tenant: Annotated[str, Depends(archive_caller)],
    job_id: Annotated[str, Path(max_length=64, description="Job id, e.g. j-0192f0c1a2b3c4d5e6f7.")],
) -> tuple[dict, str]:
    """(the job, its tenant) for an archive download."""
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


def _refusal(job_id: str, plan: ArchivePlan, max_files: int) -> Optional[HTTPException]:
    """Why the zip cannot be sent whole (before a 200 is): nothing written yet (404), a name the API cannot serve
    (409: the zip would miss it), more files than SCDD_MAX_ARCHIVE_FILES (413); None when it can."""
    per_file = f"GET /v1/jobs/{job_id}/artifacts/{{path}} (paths from GET /v1/jobs/{job_id}/artifacts)"
    if plan.refused_count:
        shown = ", ".join(repr(path) for path in plan.refused)
        more = f" and {plan.refused_count - len(plan.refused)} more" if plan.refused_count > len(plan.refused) else ""
        return HTTPException(409, f"job {job_id}'s output holds {plan.refused_count} file(s) whose names the API cannot "
                                  f"serve ({shown}{more}: a class folder with % or \\ or a control character, written "
                                  "before scdd stored such classes under safe folder names), so a zip would miss "
                                  f"them: download the other files one by one with {per_file}, or run the job again "
                                  "into a new output")
    if plan.over:
        return HTTPException(413, f"job {job_id} has more than {max_files} files to archive, the limit of one zip "
                                  f"(SCDD_MAX_ARCHIVE_FILES): download them one by one with {per_file}, or a class "
                                  f"at a time with GET /v1/jobs/{job_id}/artifacts?prefix=images/<class>/")
    if not plan.files:
        return HTTPException(404, f"job {job_id} has no artifacts yet: see GET /v1/jobs/{job_id}")
    return None


@router.get("/{job_id}/archive", responses={200: {"content": {"application/zip": {}}}, **READ_ERRORS,
                                            409: {"model": ErrorOut}, 413: {"model": ErrorOut}})
async def download_archive(request: Request, settings: SettingsDep,
                           access: Annotated[tuple[dict, str], Depends(archive_access)]) -> StreamingResponse:
    """The job's images/, manifest.json, report.json, grid.png and teacher/ as one zip (entries under `<job id>/`,
    stored uncompressed: the images are PNGs), streamed as it is made. Authorised by the API key or by a link's
    `token`. Every file is checked before the answer starts: 404 while the job has written none of them; 409 when
    one has a name the API cannot serve; 413 past SCDD_MAX_ARCHIVE_FILES files; 429 past
    SCDD_MAX_ARCHIVES_PER_TENANT downloads at once or the tenant's SCDD_ARCHIVE_BYTES_PER_HOUR."""
    job, tenant = access
    slot = request.app.state.archive_slots.take(tenant)
    try:
        artifacts = _artifacts(job)
        plan = await run_in_threadpool(lambda: plan_archive(artifacts.archive_entries(), settings.max_archive_files))
        refusal = _refusal(job["id"], plan, settings.max_archive_files)
        if refusal is not None:
            raise refusal
        await take_archive_bytes(request, tenant, job["id"], plan.bytes)
        entries = await run_in_threadpool(artifacts.archive_entries)
    except BaseException:
        slot.release()
        raise
    return ArchiveResponse(zip_stream(artifacts, entries, job["id"], settings.max_archive_files), slot, job["id"])


@router.post("/{job_id}/archive-link", response_model=ArchiveLinkOut, responses=ERRORS)
async def archive_link(request: Request, job: JobDep, tenant: TenantDep, settings: SettingsDep) -> ArchiveLinkOut:
    """A link to the job's zip that works without the Authorization header for `SCDD_ARCHIVE_LINK_TTL_S` seconds
    (default 300), for this job and tenant only: a browser downloads it to disk itself."""
    expires = int(time.time()) + settings.archive_link_ttl_s
    token = sign_link(await link_secret(request), tenant.name, job["id"], expires)
    return ArchiveLinkOut(url=f"/v1/jobs/{job['id']}/archive?token={token}", expires_at=expires)


@router.get("/{job_id}/artifacts/{path:path}", responses={200: {"content": {"application/octet-stream": {}}},
                                                         400: {"model": ErrorOut}, **READ_ERRORS})
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
