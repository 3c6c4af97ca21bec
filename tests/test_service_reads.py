"""What reading costs the API, on a real redis-server and uvicorn on loopback: an event stream catches up on a long
backlog one page at a time (its memory is a page, not the backlog); zip downloads are bounded in files and in bytes
per tenant and hour (across API processes); reads (GET) are rate-limited per tenant (across API processes), an event
stream counting once when it opens."""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
import zipfile
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import redis

from service.api import event_hub
from service.api.main import create_app
from service.blocking_jobstore import BlockingJobStore
from tests.services import ApiServer, api_settings
from tests.test_service_api import sse_events
from tests.test_service_artifacts import fabricate_job
from tests.test_service_events import SPEC, new_job

PAD = 20_000  # bytes of padding per event: a page of them is 4 MB, about what the sockets on loopback hold


def xrange_calls(url: str) -> int:
    """XRANGE commands Redis has run since its start (INFO commandstats)."""
    return int(redis.Redis.from_url(url).info("commandstats").get("cmdstat_xrange", {}).get("calls", 0))


def add_events(store: BlockingJobStore, job_id: str, steps: range, pad: int = 0) -> None:
    """Progress events as the driver writes them (fields type and data), in one round trip."""
    with store.redis.pipeline(transaction=False) as pipe:
        for step in steps:
            event = {"type": "progress", "step": step, **({"pad": "x" * pad} if pad else {})}
            pipe.xadd(store.keys.events(job_id), {"type": "progress", "data": json.dumps(event)})
        pipe.execute()


@pytest.fixture
def api(redis_server, tmp_path):
    server = ApiServer(create_app(api_settings(redis_server.url, tmp_path))).start()  # the default read rate
    with server.client("key-acme") as acme:
        yield server, acme, BlockingJobStore.connect(redis_server.url), redis_server
    server.stop()


def test_a_stream_catches_up_on_a_backlog_page_by_page_in_order_and_holds_one_page(api):
    """1 500 events of 20 KB (8 pages of XRANGE): a client that takes one event and stops reading has made the API read
    what the sockets hold plus one page, here 2 pages (before: the whole backlog, 30 MB, before the first event was
    sent);
    then it gets every event once, in order, and Last-Event-ID resumes exactly after an event, whether the rest ends
    inside a page or on its end."""
    server, acme, store, redis_server = api
    job_id = new_job(acme)
    store.transition(job_id, "dispatched", ("queued",))
    store.transition(job_id, "running", ("dispatched",), event={"type": "job_started", "job_id": job_id})
    total = 1500
    add_events(store, job_id, range(total), pad=PAD)
    pages = -(-(total + 1) // event_hub.PAGE)
    before = xrange_calls(redis_server.url)
    with server.client("key-acme") as slow:
        with slow.stream("GET", f"/v1/jobs/{job_id}/events") as answer:
            assert answer.status_code == 200
            lines = answer.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert json.loads(first.partition(": ")[2])["type"] == "job_started"
            time.sleep(1)  # the API sends what the sockets take, then waits for the client
            read_while_stalled = xrange_calls(redis_server.url) - before
    print(f"\n{total} events of {PAD // 1000} KB ({pages} pages): {read_while_stalled} XRANGE page(s) read while the "
          f"client had taken one event")
    assert 1 <= read_while_stalled <= pages // 2, read_while_stalled  # before: all 8 pages

    store.finish(job_id, "succeeded", ("running",))
    before = xrange_calls(redis_server.url)
    events = sse_events(acme, job_id)
    assert [kind for _, kind, _ in events] == ["job_started"] + ["progress"] * total + ["job_finished"]
    assert [e["step"] for _, kind, e in events if kind == "progress"] == list(range(total))
    ids = [entry_id for entry_id, _, _ in events]
    assert ids == sorted(ids, key=event_hub.stream_id) and len(set(ids)) == len(ids)
    assert xrange_calls(redis_server.url) - before <= pages + 2  # one XRANGE a page (and has_after's check)
    for rest in (1, event_hub.PAGE - 1, event_hub.PAGE, event_hub.PAGE + 1, 2 * event_hub.PAGE):  # across pages' ends
        cut = len(ids) - 1 - rest
        assert sse_events(acme, job_id, last_event_id=ids[cut]) == events[cut + 1:], rest


def test_the_hub_reads_the_next_page_only_when_the_stream_has_taken_the_last(redis_server):
    """The event hub itself (no HTTP between): after each entry a stream has taken, the entries read from Redis are at
    most one page more than those taken."""
    import redis.asyncio as aioredis

    from service.records import Keys

    keys, writer = Keys("page-test"), redis.Redis.from_url(redis_server.url, decode_responses=True)
    total = 5 * event_hub.PAGE + 30
    with writer.pipeline(transaction=False) as pipe:
        for step in range(total):
            pipe.xadd(keys.events("j-1"), {"type": "progress", "data": str(step)})
        pipe.execute()

    async def follow() -> tuple[list[str], list[int]]:
        reader = aioredis.from_url(redis_server.url, decode_responses=True)
        store = aioredis.from_url(redis_server.url, decode_responses=True)
        hub = event_hub.EventHub(reader, store, keys, block_ms=200)
        hub.start()
        entries = hub.entries("j-1", "0-0", idle_s=5)
        got, ahead = [], []
        start = xrange_calls(redis_server.url)
        while len(got) < total:
            entry = await entries.__anext__()
            got.append(entry[2])
            calls = xrange_calls(redis_server.url) - start
            ahead.append(min(calls * event_hub.PAGE, total) - len(got))  # read from Redis, not yet taken
        await entries.aclose()
        await hub.stop()
        await reader.aclose()
        await store.aclose()
        return got, ahead

    got, ahead = asyncio.run(follow())
    assert got == [str(step) for step in range(total)]
    assert max(ahead) < event_hub.PAGE, max(ahead)  # before: the whole backlog (5 pages) was read at the first entry


def image_bytes(prefix: Path) -> int:
    """The bytes of a fabricated job's archived files (not state/)."""
    return sum(path.stat().st_size for path in prefix.rglob("*") if path.is_file()
               and path.relative_to(prefix).parts[0] != "state")


def test_archives_are_bounded_in_files_and_in_bytes_per_tenant_and_hour_across_processes(redis_server, tmp_path):
    prefix_of = lambda job_id: tmp_path / "artifacts" / "acme" / job_id  # noqa: E731
    bounds = dict(max_archive_files=12, read_rate=0)
    with ExitStack() as stack:
        first = stack.enter_context(ApiContext(api_settings(redis_server.url, tmp_path, **bounds)))
        acme = stack.enter_context(first.client("key-acme"))
        job_id = new_job(acme)
        fabricate_job(prefix_of(job_id), classes=3, ipc=3)  # 9 images + manifest, report, grid, teacher: 13 files
        size = image_bytes(prefix_of(job_id))
        refused = acme.get(f"/v1/jobs/{job_id}/archive")
        assert refused.status_code == 413, refused.status_code  # before: 200 and the zip
        detail = refused.json()["detail"]
        assert "more than 12 files" in detail and "SCDD_MAX_ARCHIVE_FILES" in detail
        assert f"GET /v1/jobs/{job_id}/artifacts/{{path}}" in detail  # the fix: one file at a time
        assert acme.get(f"/v1/jobs/{job_id}/artifacts/images/n00000000/0_0000.png").status_code == 200

        # bytes: 2.5 archives an hour, counted in Redis; two API processes share the allowance
        hourly = dict(archive_bytes_per_hour=int(size * 2.5), read_rate=0)
        a = stack.enter_context(ApiContext(api_settings(redis_server.url, tmp_path, **hourly)))
        b = stack.enter_context(ApiContext(api_settings(redis_server.url, tmp_path, **hourly)))
        on_a, on_b = stack.enter_context(a.client("key-acme")), stack.enter_context(b.client("key-acme"))
        started = time.time()
        for client in (on_a, on_b):
            answer = client.get(f"/v1/jobs/{job_id}/archive")
            assert answer.status_code == 200, answer.text
            archive = zipfile.ZipFile(io.BytesIO(answer.content))
            assert archive.testzip() is None and len(archive.namelist()) == 13
        refused = on_a.get(f"/v1/jobs/{job_id}/archive")
        assert refused.status_code == 429, refused.text
        assert "SCDD_ARCHIVE_BYTES_PER_HOUR" in refused.json()["detail"]
        wait = int(refused.headers["retry-after"])
        refill = size * 2.5 / 3600  # bytes a second
        assert abs(wait - (size * 0.5 / refill - (time.time() - started))) <= 2, wait  # half an archive to refill: 720 s
        with b.client("key-globex") as globex:  # another tenant's allowance is its own
            theirs = globex.post("/v1/jobs", json=SPEC).json()["id"]
            fabricate_job(tmp_path / "artifacts" / "globex" / theirs, classes=3, ipc=3)
            assert globex.get(f"/v1/jobs/{theirs}/archive").status_code == 200

        # an archive larger than an hour's allowance: 413, as waiting would never help
        big_id = new_job(on_a)
        fabricate_job(prefix_of(big_id), classes=3, ipc=3)
        (prefix_of(big_id) / "teacher" / "teacher.pt").write_bytes(os.urandom(int(size * 3)))
        refused = on_a.get(f"/v1/jobs/{big_id}/archive")
        assert refused.status_code == 413 and "more than a tenant may download as zips in an hour" in refused.text
        assert "SCDD_ARCHIVE_BYTES_PER_HOUR" in refused.json()["detail"]


class ApiContext:
    """An ApiServer as a context manager."""

    def __init__(self, settings):
        self.server = ApiServer(create_app(settings))

    def __enter__(self) -> ApiServer:
        return self.server.start()

    def __exit__(self, *exc) -> None:
        self.server.stop()


def test_reads_are_rate_limited_per_tenant_across_processes_and_a_stream_counts_once(redis_server, tmp_path):
    settings = api_settings(redis_server.url, tmp_path, read_rate=1, read_burst=4)  # 1 a minute after 4 at once
    store = BlockingJobStore.connect(redis_server.url)
    with ApiContext(settings) as first, ApiContext(settings) as second, first.client("key-acme") as acme, \
            second.client("key-acme") as acme_there, first.client("key-globex") as globex:
        job_id = new_job(acme)  # a POST: not a read
        store.transition(job_id, "dispatched", ("queued",))
        store.transition(job_id, "running", ("dispatched",), event={"type": "job_started", "job_id": job_id})
        add_events(store, job_id, range(30))
        store.finish(job_id, "succeeded", ("running",))
        events = sse_events(acme, job_id)  # one read, however many events it carries
        assert len(events) == 32
        assert acme.get(f"/v1/jobs/{job_id}").status_code == 200
        assert acme.get("/v1/jobs").status_code == 200
        assert acme_there.get(f"/v1/jobs/{job_id}/curves").status_code == 200  # the bucket is in Redis: shared
        refused = acme.get(f"/v1/jobs/{job_id}")
        assert refused.status_code == 429, refused.text
        detail = refused.json()["detail"]
        assert "SCDD_READ_RATE" in detail and "1 requests per minute" in detail and "bursts of 4" in detail
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert acme_there.get(f"/v1/jobs/{job_id}/events").status_code == 429  # a stream is a read too
        assert acme.post(f"/v1/jobs/{job_id}/cancel").status_code == 409  # writes are not reads (it has ended)
        assert globex.get("/v1/jobs").status_code == 200  # another tenant's bucket is its own
        assert httpx.get(f"{first.url}/healthz").status_code == 200  # health checks are not tenants' reads
        assert httpx.get(f"{first.url}/v1/jobs").status_code == 401  # no key: refused before it counts
