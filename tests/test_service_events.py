"""Event streams fanned out from one reader per API process (service/api/event_hub.py), on a real
redis-server and uvicorn on loopback: every stream gets every event once and in order, however many are
open, through one Redis connection; a reader that falls behind catches up from Redis."""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack

import httpx
import pytest
import redis

from service.api import event_hub
from service.api.main import create_app
from service.blocking_jobstore import BlockingJobStore
from tests.services import ApiServer, api_settings, wait_until
from tests.test_service_api import sse_events

SPEC = {"method": "sre2l", "dataset": {"classes": [0, 1]}, "recover": {"ipc": 1, "iterations": 2}}


@pytest.fixture
def service(redis_server, tmp_path):
    settings = api_settings(redis_server.url, tmp_path, max_streams_per_tenant=100, max_streams_per_process=100)
    app = create_app(settings)
    app.state.sse_keepalive_ms = 500  # quiet streams check their job's state sooner
    server = ApiServer(app).start()
    with server.client("key-acme") as acme:
        yield server, acme, BlockingJobStore.connect(redis_server.url, settings.redis_prefix), redis_server
    server.stop()


def new_job(acme) -> str:
    answer = acme.post("/v1/jobs", json=SPEC)
    assert answer.status_code == 202
    return answer.json()["id"]


def run_job(store: BlockingJobStore, job_id: str, progress_events: int) -> None:
    store.transition(job_id, "dispatched", ("queued",))
    store.transition(job_id, "running", ("dispatched",), event={"type": "job_started", "job_id": job_id})
    for step in range(progress_events):
        store.append_event(job_id, {"type": "progress", "step": step})
    store.finish(job_id, "succeeded", ("running",))


def blocked_in_redis(server) -> int:
    """Connections waiting in a blocking command (XREAD BLOCK)."""
    return int(redis.Redis.from_url(server.url).info("clients")["blocked_clients"])


def test_many_open_streams_share_one_redis_reader_and_each_gets_every_event_once_in_order(service):
    server, acme, store, redis_server = service
    job_id = new_job(acme)
    store.append_event(job_id, {"type": "progress", "step": -1})  # before anyone follows: from the backlog
    results: list[list] = []
    lock = threading.Lock()

    def follow() -> None:
        with server.client("key-acme") as client:
            events = sse_events(client, job_id)
        with lock:
            results.append(events)

    threads = [threading.Thread(target=follow) for _ in range(40)]
    for thread in threads:
        thread.start()
    wait_until(lambda: sum(len(f.subscribers) for f in server.server.config.app.state.event_hub.jobs.values()) == 40,
               20, "40 streams to subscribe")
    # 40 streams, one connection waiting in Redis: the hub's (before, each stream held one in XREAD BLOCK)
    wait_until(lambda: blocked_in_redis(redis_server) == 1, 10, "the hub to block in XREAD")
    assert [blocked_in_redis(redis_server) for _ in range(20)] == [1] * 20
    run_job(store, job_id, 50)
    for thread in threads:
        thread.join(60)
    assert len(results) == 40
    kinds = ["progress"] + ["job_started"] + ["progress"] * 50 + ["job_finished"]
    for events in results:
        assert [kind for _, kind, _ in events] == kinds
        assert [e["step"] for _, kind, e in events if kind == "progress"] == list(range(-1, 50))
        ids = [entry_id for entry_id, _, _ in events]
        assert ids == sorted(ids, key=event_hub.stream_id) and len(set(ids)) == len(ids)
    assert server.server.config.app.state.event_hub.jobs == {}  # nobody follows the job any more
    # resuming mid-way gets exactly the rest
    middle = results[0][20][0]
    assert sse_events(acme, job_id, last_event_id=middle) == results[0][21:]


def test_a_follower_that_falls_behind_catches_up_from_redis_and_loses_nothing(redis_server, monkeypatch):
    import asyncio

    import redis.asyncio as aioredis

    from service.records import Keys

    monkeypatch.setattr(event_hub, "QUEUE_SIZE", 4)  # a queue that overflows at once
    keys, writer = Keys("lag-test"), redis.Redis.from_url(redis_server.url, decode_responses=True)

    def append(n: int) -> None:
        for step in range(n):
            writer.xadd(keys.events("j-1"), {"type": "progress", "data": str(step)})

    async def follow() -> tuple[list[str], bool]:
        reader = aioredis.from_url(redis_server.url, decode_responses=True)
        store = aioredis.from_url(redis_server.url, decode_responses=True)
        hub = event_hub.EventHub(reader, store, keys, block_ms=200)
        hub.start()
        entries = hub.entries("j-1", "0-0", idle_s=5)
        got = [await entries.__anext__() for _ in range(3)]  # two from the backlog, then "caught up"
        assert got[-1] is None
        (follower,) = hub.jobs["j-1"].subscribers
        await asyncio.to_thread(append, 300)  # it reads none of them meanwhile
        for _ in range(100):
            if follower.lagging:
                break
            await asyncio.sleep(0.05)
        lagged = follower.lagging
        while len(got) < 2 + 1 + 300:
            entry = await entries.__anext__()
            if entry is not None:
                got.append(entry)
        await entries.aclose()
        await hub.stop()
        await reader.aclose()
        await store.aclose()
        return [data for _, _, data in got[:2] + got[3:]], lagged

    append(2)
    data, lagged = asyncio.run(follow())
    assert lagged
    assert data == ["0", "1"] + [str(step) for step in range(300)]


def test_a_finished_job_whose_events_were_trimmed_ends_its_stream_at_once(service):
    server, acme, store, redis_server = service
    job_id = new_job(acme)
    run_job(store, job_id, 3)
    redis.Redis.from_url(redis_server.url).delete(store.keys.events(job_id))  # trimmed away
    started = time.perf_counter()
    assert sse_events(acme, job_id) == []
    assert time.perf_counter() - started < 2


def test_streams_of_many_jobs_each_get_their_own_jobs_events(service):
    server, acme, store, _redis = service
    jobs = [new_job(acme) for _ in range(3)]
    with ExitStack() as stack:
        clients = [stack.enter_context(server.client("key-acme")) for _ in jobs]
        found: dict[str, list] = {}

        def follow(client: httpx.Client, job_id: str) -> None:
            found[job_id] = sse_events(client, job_id)

        threads = [threading.Thread(target=follow, args=pair) for pair in zip(clients, jobs)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(server.server.config.app.state.event_hub.jobs) == 3, 20, "3 jobs followed")
        for n, job_id in enumerate(jobs):
            run_job(store, job_id, n + 1)
        for thread in threads:
            thread.join(30)
    for n, job_id in enumerate(jobs):
        assert [e.get("job_id", job_id) for _, _, e in found[job_id]] == [job_id] * (n + 3)
        assert [e["step"] for _, kind, e in found[job_id] if kind == "progress"] == list(range(n + 1))


def test_a_last_event_id_from_the_future_does_not_stop_the_events_of_other_streams(service):
    server, acme, store, _redis = service
    job_id = new_job(acme)
    found: dict[str, list] = {}

    def follow(name: str, last_event_id: str | None) -> None:
        with server.client("key-acme") as client:
            found[name] = sse_events(client, job_id, last_event_id=last_event_id)

    future = threading.Thread(target=follow, args=("future", "99999999999999-0"))
    future.start()
    wait_until(lambda: job_id in server.server.config.app.state.event_hub.jobs, 20, "the first stream")
    time.sleep(0.5)  # it has set where the hub reads from
    plain = threading.Thread(target=follow, args=("plain", None))
    plain.start()
    wait_until(lambda: len(server.server.config.app.state.event_hub.jobs[job_id].subscribers) == 2, 20, "both")
    run_job(store, job_id, 3)
    plain.join(30)
    assert [kind for _, kind, _ in found["plain"]] == ["job_started", "progress", "progress", "progress", "job_finished"]
    future.join(30)
    assert found["future"] == []  # everything is before the id it sent; it ends with the job
