"""A running job outlives a Redis outage (service/event_buffer.py, service/entrypoint.py), on a real redis-server with
its append-only file, stopped and started again on the same port, and a real Ray head: the job's driver buffers its
events while Redis is away (dropping the oldest progress events first and saying so in a `notice`), keeps going, and
writes its final record once Redis is back; a final record that never gets through makes the driver exit non-zero.
Also the redaction of credentials in URLs (service/redact.py)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import pytest
import redis

from service.api.main import create_app
from service.blocking_jobstore import BlockingJobStore
from service.redact import redact_text, redact_url
from service.settings import Settings
from tests.conftest import quick_resources
from tests.services import ApiServer, api_settings, wait_until

OUTAGE_S = 6.0  # longer than the 1.5 s the Redis client retries one command


def stream(store: BlockingJobStore, job_id: str) -> list[dict]:
    return [json.loads(fields["data"]) for _, fields in store.redis.xrange(store.keys.events(job_id))]


# -- the buffer on its own: the real Redis sink, Redis stopped


@pytest.fixture
def running_job(redis_server, tmp_path):
    """A job record made by the API, moved to running as a driver's claim does."""
    settings = api_settings(redis_server.url, tmp_path)
    server = ApiServer(create_app(settings)).start()
    with server.client("key-acme") as acme:
        answer = acme.post("/v1/jobs", json={"method": "sre2l", "dataset": {"classes": [0, 1]},
                                             "recover": {"ipc": 1, "iterations": 2}})
        assert answer.status_code == 202, answer.text
    server.stop()
    store = BlockingJobStore.connect(redis_server.url, settings.redis_prefix)
    job_id = answer.json()["id"]
    assert store.claim(job_id, 1) == (1, "queued")
    return store, job_id


def progress(done: int, total: int = 100, stage: str = "recover") -> dict:
    return {"type": "progress", "stage": stage, "loop": stage, "fraction": done / total, "job_fraction": 0.5,
            "done": done, "total": total, "unit": "iteration", "eta_s": 1.0, "ce": 1.0 / done, "seq": done,
            "time": round(time.time(), 3)}


def test_a_full_buffer_drops_the_oldest_progress_events_keeps_the_others_and_publish_never_waits(
        running_job, redis_server):
    from service.entrypoint import RedisEventSink
    from service.event_buffer import BufferedEventSink

    store, job_id = running_job
    sink = BufferedEventSink(RedisEventSink(store, job_id, curve_points=256), capacity=10, final_s=60)
    redis_server.stop()
    took = []

    def publish(event: dict) -> None:
        started = time.perf_counter()
        sink.publish(event)
        took.append(time.perf_counter() - started)

    publish({"type": "job_started", "job_id": job_id, "workers": 1})
    wait_until(lambda: sink.down_since is not None and sink.pending() == 0, 10,
               "the writer to hold job_started and find Redis away")
    publish({"type": "stage_started", "stage": "recover"})
    for done in range(1, 31):
        publish(progress(done))
    publish({"type": "stage_finished", "stage": "recover", "seconds": 1.0})
    for done in range(31, 36):
        publish(progress(done))
    assert sink.pending() == 10 and sink.dropped == 27  # 35 progress events, the newest 8 kept
    publish({"type": "job_finished", "job_id": job_id, "status": "succeeded", "error": None, "job_fraction": 1.0,
             "seconds": 9.0, "summary": None})
    assert sink.pending() == 10 and sink.dropped == 28  # the final event is kept: one more progress event goes
    assert max(took) < 0.05, f"publish took up to {max(took) * 1000:.0f} ms while Redis was away"
    redis_server.start()  # the same port and data (append-only file)
    assert sink.close() is True and sink.final_written is True
    events = stream(store, job_id)
    kinds = [event["type"] for event in events]
    assert kinds == ["job_started", "notice", "stage_started"] + ["progress"] * 2 + ["stage_finished"] + \
        ["progress"] * 5 + ["job_finished"]
    notice = events[1]
    assert notice["notice"] == "progress_dropped" and notice["dropped"] == 28 and notice["attempt"] == 1
    assert notice["message"].startswith("28 progress events of this job were dropped during a Redis outage of")
    assert [event["done"] for event in events if event["type"] == "progress"] == [29, 30, 31, 32, 33, 34, 35]
    record = store.get(job_id)
    assert record["state"] == "succeeded" and record["stage"] == "recover"
    # the curves were fed from every event, the dropped ones too: the ce curve starts at the first
    (curve,) = [json.loads(text) for text in store.curves(job_id).values()]
    assert [point["x"] for point in curve["points"]] == [float(done) for done in range(1, 36)]


def test_a_final_record_that_cannot_be_written_in_time_is_reported_not_lost_silently(running_job, redis_server,
                                                                                      caplog):
    from service.entrypoint import RedisEventSink
    from service.event_buffer import BufferedEventSink

    store, job_id = running_job
    sink = BufferedEventSink(RedisEventSink(store, job_id), capacity=10, final_s=2.0)
    redis_server.stop()
    started = time.perf_counter()
    sink.publish({"type": "job_finished", "job_id": job_id, "status": "succeeded", "error": None,
                  "job_fraction": 1.0, "seconds": 1.0, "summary": None})
    assert time.perf_counter() - started < 0.05
    with caplog.at_level(logging.WARNING, logger="scdd.service"):
        assert sink.close() is False
    assert sink.final_written is False and time.perf_counter() - started < 12
    assert "gave up writing this job's events to Redis within SCDD_FINAL_RECORD_RETRY_S (2 s)" in caplog.text
    assert "the final record among them" in caplog.text
    redis_server.start()
    assert store.get(job_id)["state"] == "running"  # for the dispatcher to end from the Ray job's status


def test_the_cancel_check_answers_not_cancelled_while_redis_is_away_and_sees_the_flag_after(running_job,
                                                                                            redis_server):
    from service.entrypoint import CancelCheck

    store, job_id = running_job
    check = CancelCheck.connect(Settings(redis_url=redis_server.url), job_id)
    assert check() is False
    redis_server.stop()
    started = time.perf_counter()
    assert check() is False and check() is False
    assert time.perf_counter() - started < 1  # fails fast: the job's last poll does not wait on a gone Redis
    redis_server.start()
    store.redis.hset(store.keys.job(job_id), "cancel_requested", "1")
    assert check() is True


# -- a whole job through the Ray entrypoint, Redis stopped mid-job


def job_spec(fmnist_root, teacher, iterations: int) -> dict:
    return {"method": "sre2l",
            "dataset": {"root": str(fmnist_root), "classes": [0, 1, 2], "train_limit": 50, "test_limit": 50},
            "teacher": {"checkpoint": str(teacher)},
            "recover": {"ipc": 3, "iterations": iterations, "batch_size": 2},
            "validate": {"enabled": False},
            "resources": quick_resources()}


@pytest.fixture
def job_service(redis_server, tmp_path, fmnist_root, fmnist_teacher_ckpt, ray_local):
    """The API (to make the job record) and the settings of the job's driver: a buffer of 10 events."""
    roots = os.pathsep.join([str(fmnist_root), str(fmnist_teacher_ckpt.parent)])
    settings = api_settings(redis_server.url, tmp_path, data_roots=roots, event_buffer=10, final_record_retry_s=60)
    server = ApiServer(create_app(settings)).start()
    with server.client("key-acme") as acme:
        yield settings, acme
    server.stop()


def start_driver(settings: Settings, job_id: str) -> tuple[threading.Thread, list]:
    from service.entrypoint import run

    result: list = []
    thread = threading.Thread(target=lambda: result.append(run(job_id, settings, 1)), daemon=True)
    thread.start()
    return thread, result


def test_a_job_goes_on_through_a_redis_outage_and_ends_succeeded_with_its_final_record(
        job_service, redis_server, fmnist_root, fmnist_teacher_ckpt):
    settings, acme = job_service
    job_id = acme.post("/v1/jobs", json=job_spec(fmnist_root, fmnist_teacher_ckpt, iterations=200)).json()["id"]
    store = BlockingJobStore.connect(redis_server.url, settings.redis_prefix)
    thread, result = start_driver(settings, job_id)
    wait_until(lambda: (store.get(job_id) or {}).get("stage") == "recover" and float(store.get(job_id).get(
        "progress") or 0) > 0.33, 60, "the job to be in its recover loop", interval=0.1)
    redis_server.stop()
    down = time.time()
    time.sleep(OUTAGE_S)
    redis_server.start()
    up = time.time()
    thread.join(120)
    assert result == [0]
    job = acme.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded" and job["error"] is None, job
    events = stream(store, job_id)
    assert events[-1]["type"] == "job_finished" and events[-1]["status"] == "succeeded"
    # it went on while Redis was away: events published then reached Redis after it, with their own times
    assert any(down < event["time"] < up for event in events if event["type"] == "progress")
    (notice,) = [event for event in events if event["type"] == "notice"]
    assert notice["dropped"] > 0 and "dropped during a Redis outage of" in notice["message"]
    started = [event["stage"] for event in events if event["type"] == "stage_started"]
    assert started == [event["stage"] for event in events if event["type"] == "stage_finished"] and \
        "recover" in started
    assert [event["seq"] for event in events if "seq" in event] == sorted({event["seq"] for event in events
                                                                          if "seq" in event})


def test_a_job_that_ends_while_redis_is_away_writes_its_final_record_when_redis_is_back(
        job_service, redis_server, fmnist_root, fmnist_teacher_ckpt):
    """Redis stopped mid-job and kept away past the job's end: the driver's last cancel check and its final record
    wait for Redis instead of failing the job."""
    settings, acme = job_service
    job_id = acme.post("/v1/jobs", json=job_spec(fmnist_root, fmnist_teacher_ckpt, iterations=40)).json()["id"]
    store = BlockingJobStore.connect(redis_server.url, settings.redis_prefix)
    thread, result = start_driver(settings, job_id)
    wait_until(lambda: (store.get(job_id) or {}).get("stage") == "recover", 60, "the job's recover stage",
               interval=0.05)
    redis_server.stop()
    output = f"{settings.artifacts}/acme/{job_id}"
    wait_until(lambda: os.path.exists(f"{output}/report.json"), 60, "the job to finish its work")
    time.sleep(2)  # the driver is waiting to write its final record
    assert thread.is_alive() and not result
    redis_server.start()
    thread.join(60)
    assert result == [0]
    job = acme.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded" and job["summary"], job
    assert stream(store, job_id)[-1]["type"] == "job_finished"


def test_a_driver_started_while_redis_is_away_waits_to_claim_its_job_and_runs_it(
        job_service, redis_server, fmnist_root, fmnist_teacher_ckpt):
    """A job dispatched just before an outage: Ray starts its driver while Redis is down. It used to fail at its claim
    (seen in bench/soak.py: two jobs of the well-behaved tenants failed so in a 60 s outage)."""
    settings, acme = job_service
    job_id = acme.post("/v1/jobs", json=job_spec(fmnist_root, fmnist_teacher_ckpt, iterations=4)).json()["id"]
    redis_server.stop()
    thread, result = start_driver(settings, job_id)
    time.sleep(OUTAGE_S / 2)
    assert thread.is_alive() and not result  # waiting for Redis, not failed
    redis_server.start()
    thread.join(120)
    assert result == [0]
    assert acme.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded"


def test_a_driver_whose_redis_never_comes_back_says_so_in_one_line(redis_server, tmp_path, capsys):
    """A Redis that is gone for good (or a wrong REDIS_URL on the Ray nodes): the driver gives up after
    SCDD_FINAL_RECORD_RETRY_S with a line naming the (redacted) URL and the fix, exit code 2, no traceback."""
    from service.entrypoint import run

    settings = api_settings(redis_server.url.replace("redis://", "redis://:pw@"), tmp_path, final_record_retry_s=1.5)
    redis_server.stop()
    assert run("j-00000000000000000000", settings, 1) == 2
    message = capsys.readouterr().err
    assert "did not answer within SCDD_FINAL_RECORD_RETRY_S (1.5 s)" in message and "redis://***@127.0.0.1" in message
    assert "Traceback" not in message and ":pw@" not in message


def test_a_claim_sent_again_by_the_same_driver_finds_its_own_claim(running_job):
    """The claim's answer lost in an outage: the driver's retry must not read its own claim as another's."""
    store, _claimed = running_job
    job_id = _claimed
    store.transition(job_id, "queued", ("running",))
    assert store.claim(job_id, 1, token="driver-a") == (1, "queued")
    assert store.claim(job_id, 1, token="driver-a") == (1, "running")  # its own, again
    assert store.claim(job_id, 1, token="driver-b") == (0, "running")  # another driver of the same attempt


def test_a_driver_whose_final_record_never_gets_through_exits_non_zero_and_says_why(
        job_service, redis_server, fmnist_root, fmnist_teacher_ckpt, capsys):
    settings, acme = job_service
    settings = settings.model_copy(update={"final_record_retry_s": 2.0,
                                           "redis_url": redis_server.url.replace("redis://", "redis://:s3cret@")})
    job_id = acme.post("/v1/jobs", json=job_spec(fmnist_root, fmnist_teacher_ckpt, iterations=40)).json()["id"]
    redis.Redis.from_url(redis_server.url).config_set("requirepass", "s3cret")  # (set by CONFIG only: gone on restart)
    authed = BlockingJobStore.connect(settings.redis_url, settings.redis_prefix)
    thread, result = start_driver(settings, job_id)
    wait_until(lambda: (authed.get(job_id) or {}).get("stage") == "recover", 60, "the job's recover stage",
               interval=0.05)
    redis_server.stop()
    thread.join(60)
    assert result == [3]  # FINAL_RECORD_LOST: the dispatcher ends the job from the Ray job's status
    message = capsys.readouterr().err
    assert f"scdd: job {job_id}: its final record could not be written to Redis at redis://***@127.0.0.1:" in message
    assert "within SCDD_FINAL_RECORD_RETRY_S (2 s)" in message and "s3cret" not in message
    redis_server.start()
    assert BlockingJobStore.connect(redis_server.url, settings.redis_prefix).get(job_id)["state"] == "running"


# -- credentials out of logs


def test_urls_lose_their_credentials_and_keep_where_they_point():
    assert redact_url("redis://:s3cret@redis.example.com:6379/0") == "redis://***@redis.example.com:6379/0"
    assert redact_url("rediss://default:s3cret@[::1]:6380/2") == "rediss://***@[::1]:6380/2"
    assert redact_url("redis://:pa/ss@host:6379/0") == "redis://***@host:6379/0"  # '/' in the password
    assert redact_url("unix:///run/redis.sock?db=0&password=s3cret") == "unix:///run/redis.sock?db=0&password=***"
    assert redact_url("s3://AKIA123:s3cret@bucket/prefix") == "s3://***@bucket/prefix"
    assert redact_url("https://b.s3.amazonaws.com/k?X-Amz-Credential=AK&X-Amz-Signature=abc&part=1") == \
        "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&part=1"
    for plain in ("redis://127.0.0.1:6379/0", "s3://bucket/path@v2/x", "/data/artifacts", "not a url"):
        assert redact_url(plain) == plain
    text = "no job j in Redis at redis://u:s3cret@h:1/0 (prefix scdd); artifacts 's3://k:s3cret@b/p'."
    assert redact_text(text) == "no job j in Redis at redis://***@h:1/0 (prefix scdd); artifacts 's3://***@b/p'."


def test_the_entrypoint_names_redis_without_its_password(redis_server, capsys):
    from service.entrypoint import run

    url = redis_server.url.replace("redis://", "redis://:s3cret@")
    redis.Redis.from_url(redis_server.url).config_set("requirepass", "s3cret")
    try:
        assert run("j-missing", Settings(redis_url=url, redis_prefix="redact-test")) == 2
    finally:
        redis.Redis.from_url(url).config_set("requirepass", "")
    message = capsys.readouterr().err
    assert "s3cret" not in message and redis_server.url.replace("redis://", "redis://***@") in message
    assert "check that REDIS_URL and SCDD_REDIS_PREFIX" in message
