"""A job's progress as Server-Sent Events."""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator
from typing import Annotated, Optional

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.responses import StreamingResponse

from api_schema import FINAL_STATES, ErrorOut
from service.api.deps import JobDep, TenantDep
from service.api.async_jobstore import STREAM_ID, AsyncJobStore
from service.api.event_hub import EventHub
from service.api.streams import Slot, StreamSlots

router = APIRouter(prefix="/v1/jobs", tags=["events"])

KEEPALIVE_MS = 10000  # a comment line this often on a quiet stream, so proxies and clients see it is alive


def _frame(entry_id: str, kind: str, data: str) -> str:
    return f"id: {entry_id}\nevent: {kind}\ndata: {data}\n\n"


async def _follow(hub: EventHub, store: AsyncJobStore, request: Request, job_id: str, after: str, idle_s: float,
                  slot: Slot) -> AsyncIterator[str]:
    try:
        yield "retry: 2000\n\n"
        async for frame in _frames(hub, store, request, job_id, after, idle_s):
            yield frame
    finally:
        slot.release()


async def _frames(hub: EventHub, store: AsyncJobStore, request: Request, job_id: str, after: str,
                  idle_s: float) -> AsyncIterator[str]:
    entries = hub.entries(job_id, after, idle_s)
    try:
        async for entry in entries:
            if entry is None:  # quiet for idle_s: has the job ended (its last events trimmed), or the client gone?
                if await store.state(job_id) in FINAL_STATES:
                    async for entry_id, kind, data in hub.rest(job_id, after):  # written before it ended
                        yield _frame(entry_id, kind, data)
                    return
                yield ": keep-alive\n\n"
                if await request.is_disconnected():
                    return
                continue
            after, kind, data = entry
            yield _frame(after, kind, data)
            if kind == "job_finished" and not await _resumed(hub, store, job_id, after):
                return
    finally:
        await entries.aclose()


async def _resumed(hub: EventHub, store: AsyncJobStore, job_id: str, after: str) -> bool:
    """Whether the job goes on past the `job_finished` at `after`: a resume followed it (entries after it), or is
    queued (its `job_resumed` about to arrive)."""
    return await hub.has_after(job_id, after) or await store.state(job_id) not in FINAL_STATES


@router.get("/{job_id}/events", responses={200: {"content": {"text/event-stream": {}}}, 401: {"model": ErrorOut},
                                           404: {"model": ErrorOut}, 400: {"model": ErrorOut},
                                           429: {"model": ErrorOut}})
async def job_events(job: JobDep, tenant: TenantDep, request: Request,
                     last_event_id: Annotated[Optional[str], Header(max_length=45)] = None) -> StreamingResponse:
    """Server-Sent Events: `job_started`, `stage_started`, `progress`, `stage_finished`, `error`, `job_finished`,
    `job_resumed` (each `data:` is the event as JSON, each `id:` its position). Send `Last-Event-ID` to resume after
    an event; the stream ends after the last attempt's `job_finished` (a resumed job's earlier ones pass); a quiet stream gets a `: keep-alive` comment every 10 s. Open streams are
    bounded per tenant and per API process (429); opening one is one read of the tenant's SCDD_READ_RATE, its
    events are not. A backlog is sent a page (200 events) at a time."""
    after = last_event_id or "0-0"
    if not STREAM_ID.match(after):
        raise HTTPException(400, f"Last-Event-ID {after!r} is not an event id (like 1732190000000-0): "
                                 "send the id of the last event you received")
    idle_s = getattr(request.app.state, "sse_keepalive_ms", KEEPALIVE_MS) / 1000
    slots: StreamSlots = request.app.state.stream_slots
    slot = slots.take(tenant.name)  # 429 past a bound
    stream = _follow(request.app.state.event_hub, request.app.state.store, request, job["id"], after, idle_s, slot)
    weakref.finalize(stream, slot.release)  # also when the client leaves before the stream starts
    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
