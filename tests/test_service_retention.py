"""Retention on a real redis-server: finished jobs expire from Redis after SCDD_RETENTION_DAYS, their
artifacts only when the GC runs, and nothing of a job that has not finished is touched; the queue stream
does not keep acknowledged messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.api.main import create_app
from service.blocking_jobstore import BlockingJobStore
from service.gc import collect
from service.job_queue import JobQueue
from tests.services import ApiServer, api_settings

SPEC = {"method": "sre2l", "dataset": {"classes": [0, 1]}, "recover": {"ipc": 1, "iterations": 2}}


@pytest.fixture
def service(redis_server, tmp_path):
    settings = api_settings(redis_server.url, tmp_path)
    server = ApiServer(create_app(settings)).start()
    with server.client("key-acme") as client:
        yield settings, client, BlockingJobStore.connect(redis_server.url, settings.redis_prefix)
    server.stop()


def submit(client) -> str:
    answer = client.post("/v1/jobs", json=SPEC)
    assert answer.status_code == 202
    return answer.json()["id"]


def finish(store: BlockingJobStore, job_id: str) -> None:
    store.transition(job_id, "dispatched", ("queued",))
    store.transition(job_id, "running", ("dispatched",))
    store.append_event(job_id, {"type": "progress", "fraction": 0.5})
    store.finish(job_id, "succeeded", ("running",))


def artifacts_of(settings, job_id: str):
    folder = Path(settings.artifacts) / "acme" / job_id
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "0.png").write_bytes(b"png")
    (folder / "report.json").write_text("{}")
    return folder


def test_a_finished_job_expires_from_redis_and_its_artifacts_go_only_with_the_gc(service):
    settings, client, store = service
    done, running = submit(client), submit(client)
    done_files, running_files = artifacts_of(settings, done), artifacts_of(settings, running)
    finish(store, done)
    store.transition(running, "dispatched", ("queued",))
    store.transition(running, "running", ("dispatched",))
    keys = store.keys

    assert store.expire_finished(retention_s=3600) == 0  # finished a moment ago: kept
    assert client.get(f"/v1/jobs/{done}").status_code == 200

    assert store.expire_finished(retention_s=0) == 1
    assert client.get(f"/v1/jobs/{done}").status_code == 404
    assert not store.redis.exists(keys.job(done), keys.events(done))
    assert [job["id"] for job in client.get("/v1/jobs").json()["jobs"]] == [running]
    assert client.get("/v1/jobs", params={"state": "succeeded"}).json()["jobs"] == []
    assert store.redis.hget(keys.counts, "succeeded") == "0" and store.redis.hget(keys.counts, "running") == "1"
    assert not store.redis.zscore(keys.finished, done)
    assert done_files.exists() and store.expired_jobs() == [("acme", done)]  # the artifacts wait for the GC

    assert collect(store, settings) == [f"{settings.artifacts}/acme/{done}"]
    assert not done_files.exists() and store.expired_jobs() == []
    assert running_files.exists() and (running_files / "report.json").exists()  # never a running job's folder
    assert client.get(f"/v1/jobs/{running}").json()["state"] == "running"
    assert store.expire_finished(retention_s=0) == 0 and collect(store, settings) == []


def test_the_gc_skips_names_it_did_not_make(service):
    settings, _, store = service
    store.redis.zadd(store.keys.expired, {"acme/../../etc": 1, "ACME/j-000000000000000000aa": 1})
    assert collect(store, settings) == []
    assert len(store.expired_jobs()) == 2  # left for an operator to look at, nothing deleted


def test_an_acknowledged_queue_message_is_deleted_from_the_stream(service):
    _, client, store = service
    queue = JobQueue(store.redis, store.keys, "test-dispatcher")
    queue.ensure_group()
    job_id = submit(client)
    assert store.redis.xlen(store.keys.queue) == 1
    ((message_id, read_id),) = queue.read(count=1, block_ms=100)
    assert read_id == job_id
    queue.ack(message_id)
    assert store.redis.xlen(store.keys.queue) == 0
    assert store.redis.xpending(store.keys.queue, "dispatchers")["pending"] == 0


def test_a_full_redis_refuses_new_jobs_with_503_and_keeps_every_earlier_one(tmp_path):
    """maxmemory with noeviction (as serve, compose and the chart run Redis): writes fail, reads go on."""
    import redis

    from tests.services import RedisServer

    server = RedisServer(tmp_path / "redis", maxmemory="4mb").start()
    api = ApiServer(create_app(api_settings(server.url, tmp_path))).start()
    try:
        with api.client("key-acme") as client:
            first = submit(client)
            filler = redis.Redis.from_url(server.url)
            for size in (65536, 4096, 256):  # fill Redis up to its limit, in ever smaller pieces
                with pytest.raises(redis.exceptions.OutOfMemoryError):
                    for i in range(100_000):
                        filler.set(f"filler:{size}:{i}", b"x" * size)
            refused = client.post("/v1/jobs", json=SPEC)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "60"
            assert "the job store (Redis) is full: it reached its maxmemory" in refused.json()["detail"]
            assert client.get(f"/v1/jobs/{first}").json()["state"] == "queued"  # nothing evicted
            assert [job["id"] for job in client.get("/v1/jobs").json()["jobs"]] == [first]
            metrics = client.get("/metrics").text
            assert "scdd_redis_maxmemory_bytes 4.194304e+06" in metrics
            used = float(next(line.split()[1] for line in metrics.splitlines()
                              if line.startswith("scdd_redis_used_memory_bytes ")))
            assert used > 3.5e6
    finally:
        api.stop()
        server.stop()
