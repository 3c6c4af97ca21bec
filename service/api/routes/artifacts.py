"""List and download a job's artifacts."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from api_schema import ArtifactList, ArtifactOut, ErrorOut
from service.api.deps import JobDep
from service.artifacts import JobArtifacts, UnsafePath, zip_stream

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"])


def _artifacts(job: dict) -> JobArtifacts:
    return JobArtifacts(json.loads(job["spec"])["output"]["url"])


@router.get("/{job_id}/artifacts", response_model=ArtifactList, responses={401: {"model": ErrorOut}, 404: {"model": ErrorOut}})
async def list_artifacts(job: JobDep) -> ArtifactList:
    """Every file the job has written so far (images/<class>/<n>.png, manifest.json, report.json, ...)."""
    files = await run_in_threadpool(_artifacts(job).list)
    return ArtifactList(files=[ArtifactOut(path=path, size=size) for path, size in files])


@router.get("/{job_id}/archive", responses={200: {"content": {"application/zip": {}}}, 401: {"model": ErrorOut},
                                            404: {"model": ErrorOut}})
async def download_archive(job: JobDep) -> StreamingResponse:
    """Every file of the job as one zip archive (entries under `<job id>/`), streamed as it is made; 404 while the
    job has written nothing."""
    artifacts = _artifacts(job)
    files = await run_in_threadpool(artifacts.list)
    if not files:
        raise HTTPException(404, f"job {job['id']} has no artifacts yet: see GET /v1/jobs/{job['id']}")
    return StreamingResponse(zip_stream(artifacts, files, job["id"]), media_type="application/zip",
                             headers={"Content-Disposition": f'attachment; filename="{job["id"]}.zip"'})


@router.get("/{job_id}/artifacts/{path:path}", responses={200: {"content": {"application/octet-stream": {}}},
                                                         400: {"model": ErrorOut}, 401: {"model": ErrorOut},
                                                         404: {"model": ErrorOut}})
async def download_artifact(job: JobDep, path: Annotated[str, Path(description="A path from the listing.")]) -> StreamingResponse:
    """One file, streamed."""
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
