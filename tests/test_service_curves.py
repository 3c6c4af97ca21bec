"""Metric curves that outlive the trimmed event stream (service/curves.py), on a real redis-server and uvicorn: the
stride-doubling downsampler keeps a bounded number of points over the whole run and the latest one; a long job fed
straight into the entrypoint's Redis sink (no Ray) keeps its start in GET /v1/jobs/{id}/curves while its stream is
trimmed; a second attempt gets curves of its own, a restarted driver continues its attempt's; retention deletes them."""

from __future__ import annotations

import time

import pytest

from service.api.main import create_app
from service.blocking_jobstore import BlockingJobStore
from service.curves import Curve, CurveRecorder
from service.entrypoint import RedisEventSink
from tests.services import ApiServer, api_settings

SPEC = {"method": "sre2l", "dataset": {"classes": [0, 1]}, "recover": {"ipc": 1, "iterations": 2}}
START = 1_700_000_000.0  # the synthetic job's first event; one event every 30 s: 3000 of them are a day


@pytest.fixture
def service(redis_server, tmp_path):
    settings = api_settings(redis_server.url, tmp_path)
    server = ApiServer(create_app(settings)).start()
    # a short stream, so a few thousand events trim it as 10 000 would trim a day-long job's
    store = BlockingJobStore.connect(redis_server.url, settings.redis_prefix, events_maxlen=300)
    with server.client("key-acme") as acme, server.client("key-globex") as globex:
        yield acme, globex, store
    server.stop()


def running_job(acme, store: BlockingJobStore) -> str:
    answer = acme.post("/v1/jobs", json=SPEC)
    assert answer.status_code == 202
    job_id = answer.json()["id"]
    store.transition(job_id, "dispatched", ("queued",))
    store.transition(job_id, "running", ("dispatched",))
    return job_id


def progress(stage: str, loop: str, done: int, total: int, at: float, **metrics) -> dict:
    """A progress event as the driver's ThrottledSink hands it on."""
    return {"type": "progress", "stage": stage, "loop": loop, "fraction": round(done / total, 4),
            "job_fraction": 0.5, "done": done, "total": total, "unit": "step", "eta_s": 12.5, **metrics,
            "seq": done, "time": round(at, 3)}


def feed_loop(sink, stage: str, loop: str, total: int, first_time: float, first: int = 1) -> float:
    """A loop's progress, with a bare step event (no metrics: nothing to draw) between each two with metrics."""
    at = first_time
    for done in range(first, total + 1):
        at = first_time + 30 * (done - first)
        sink.publish(progress(stage, loop, done, total, at, loss=1.0 / done, epoch=done // 10))
        if done < total:
            sink.publish(progress(stage, loop, done, total, at + 1))
    return at


def test_the_downsampler_keeps_at_most_max_points_over_the_whole_run_and_the_latest_point():
    for max_points in (8, 256):
        curve = Curve(max_points)
        for i in range(100_000):
            curve.add({"x": float(i)})
            if i < 3000:  # the bound and the latest point hold at every step
                assert len(curve.points) <= max_points and curve.points[-1]["x"] == i
        xs = [point["x"] for point in curve.points]
        assert len(xs) <= max_points and len(xs) > max_points // 2
        assert xs[0] == 0 and xs[-1] == 99_999
        gaps = {b - a for a, b in zip(xs, xs[1:-1])}
        assert gaps == {curve.stride}  # evenly spread ...
        assert xs[-2] > 99_999 - curve.stride and curve.stride <= 2 * 100_000 / (max_points - 1)  # ... to the end


def test_a_restored_curve_continues_exactly_as_one_that_never_stopped():
    whole = Curve(16)
    for i in range(1000):
        whole.add({"x": i})
    for stop in (1, 15, 16, 17, 31, 64, 333, 999):
        first = Curve(16)
        for i in range(stop):
            first.add({"x": i})
        resumed = Curve.restore(first.state(), 16)
        for i in range(stop, 1000):
            resumed.add({"x": i})
        assert resumed.state() == whole.state(), stop
    smaller = Curve.restore(whole.state(), 8)  # a lower SCDD_CURVE_POINTS thins what is stored
    assert len(smaller.points) <= 8 and smaller.points[0]["x"] == 0 and smaller.points[-1]["x"] == 999


def test_the_recorder_writes_a_changed_curve_at_most_once_a_second_and_everything_at_a_boundary():
    now = [100.0]
    recorder = CurveRecorder(attempt=1, max_points=32, stored={}, clock=lambda: now[0])
    assert list(recorder.feed(progress("squeeze", "teacher", 1, 50, START, loss=2.0))) == ["1/squeeze/teacher"]
    assert recorder.feed(progress("squeeze", "teacher", 2, 50, START, loss=1.5)) == {}  # within the second
    assert recorder.feed(progress("squeeze", "teacher", 3, 50, START)) == {}  # no metrics: no point
    now[0] += 1.0
    assert list(recorder.feed(progress("squeeze", "teacher", 4, 50, START, loss=1.2))) == ["1/squeeze/teacher"]
    assert recorder.feed(progress("squeeze", "teacher", 5, 50, START, loss=1.1)) == {}
    assert list(recorder.feed({"type": "stage_finished", "stage": "squeeze"})) == ["1/squeeze/teacher"]  # flushed
    assert recorder.feed({"type": "stage_started", "stage": "recover"}) == {}  # nothing changed since
    assert list(recorder.feed(progress("squeeze", "teacher", 50, 50, START, loss=0.5))) == ["1/squeeze/teacher"]
    nan = recorder.feed(progress("recover", "recover", 1, 9, START, ce=float("nan"), bn=0.25, round=0))
    assert '"values":{"bn":0.25}' in nan["1/recover/recover"]  # NaN has no JSON; ints are counters, not metrics


def test_a_long_job_keeps_bounded_curves_over_the_whole_run_while_its_stream_is_trimmed(service):
    acme, globex, store = service
    job_id = running_job(acme, store)
    sink = RedisEventSink(store, job_id, curve_points=64)
    writes = []
    write_curves = store.write_curves
    store.write_curves = lambda job, fields: writes.append(len(fields)) or write_curves(job, fields)
    started = time.monotonic()
    sink.publish({"type": "job_started", "job_id": job_id, "workers": 1, "seq": 0, "time": START})
    sink.publish({"type": "stage_started", "stage": "squeeze", "seq": 0, "time": START})
    end_squeeze = feed_loop(sink, "squeeze", "teacher", 2000, START)
    sink.publish({"type": "stage_finished", "stage": "squeeze", "seconds": 60000.0, "seq": 0, "time": end_squeeze})
    sink.publish({"type": "stage_started", "stage": "recover", "seq": 0, "time": end_squeeze})
    end = feed_loop(sink, "recover", "recover", 1000, end_squeeze + 30)
    sink.publish({"type": "job_finished", "job_id": job_id, "status": "succeeded", "job_fraction": 1.0,
                  "seconds": end - START, "seq": 0, "time": end})
    elapsed = time.monotonic() - started

    stream = store.redis.xrange(store.keys.events(job_id), count=1)
    assert store.redis.xlen(store.keys.events(job_id)) < 500  # trimmed: of some 6000 events ...
    assert '"teacher"' not in stream[0][1]["data"]  # ... none of the squeeze stage is left
    assert len(writes) <= 2 * (elapsed + 1) + 4  # at most about once a second per curve, and at the boundaries

    answer = acme.get(f"/v1/jobs/{job_id}/curves")
    assert answer.status_code == 200
    body = answer.json()
    assert body["job_id"] == job_id and body["max_points"] == 64
    assert [(c["attempt"], c["stage"], c["loop"]) for c in body["curves"]] == [(1, "squeeze", "teacher"),
                                                                                (1, "recover", "recover")]
    teacher, recover = body["curves"]
    loops = ((teacher, 2000, START, end_squeeze), (recover, 1000, end_squeeze + 30, end))
    for curve, total, first_time, last_time in loops:
        points = curve["points"]
        assert 32 < len(points) <= 64
        assert (points[0]["x"], points[0]["t"]) == (1, first_time)  # the start of the run ...
        assert (points[-1]["x"], points[-1]["t"]) == (total, last_time)  # ... and its very end
        assert [p["x"] for p in points] == sorted(p["x"] for p in points)
        assert max(b["x"] - a["x"] for a, b in zip(points, points[1:])) <= 2 * total / 63  # spread over all of it
        assert points[-1]["values"] == {"loss": 1.0 / total}  # float metrics only: not the epoch
    assert globex.get(f"/v1/jobs/{job_id}/curves").status_code == 404  # another tenant's job is not there
    assert acme.get("/v1/jobs/j-00000000000000000000/curves").status_code == 404


def test_a_second_attempt_gets_curves_of_its_own_and_a_restarted_driver_continues_its_attempts(service):
    acme, _, store = service
    job_id = running_job(acme, store)
    first = RedisEventSink(store, job_id, curve_points=16)
    feed_loop(first, "recover", "recover", 100, START)
    first.publish({"type": "error", "stage": "recover", "message": "worker lost", "seq": 0, "time": START + 3000})
    attempt_1 = acme.get(f"/v1/jobs/{job_id}/curves").json()["curves"]

    store.redis.hset(store.keys.job(job_id), "attempt", "2")  # as a resume does
    second = RedisEventSink(store, job_id, curve_points=16)
    feed_loop(second, "recover", "recover", 100, START + 10_000, first=41)  # it resumes from its stored units
    second.publish({"type": "stage_finished", "stage": "recover", "seconds": 1.0, "seq": 0, "time": START + 20_000})
    restarted = RedisEventSink(store, job_id, curve_points=16)  # the same attempt's driver, started again
    feed_loop(restarted, "validate", "student", 30, START + 30_000)
    feed_loop(restarted, "recover", "recover", 120, START + 40_000, first=101)
    restarted.publish({"type": "job_finished", "job_id": job_id, "status": "succeeded", "job_fraction": 1.0,
                       "seconds": 1.0, "seq": 0, "time": START + 50_000})

    curves = acme.get(f"/v1/jobs/{job_id}/curves").json()["curves"]
    assert [(c["attempt"], c["stage"], c["loop"]) for c in curves] == [
        (1, "recover", "recover"), (2, "recover", "recover"), (2, "validate", "student")]
    assert curves[0] == attempt_1[0]  # the first attempt's curve is left as it was
    points = curves[1]["points"]
    assert points[0]["x"] == 41 and points[-1]["x"] == 120  # continued across the restart, in one curve
    assert len(points) <= 16 and any(p["x"] > 100 for p in points[:-1]) and any(p["x"] < 60 for p in points)
    assert curves[2]["points"][-1]["x"] == 30


def test_retention_deletes_a_jobs_curves_with_it_and_a_late_driver_cannot_bring_them_back(service):
    acme, _, store = service
    job_id = running_job(acme, store)
    sink = RedisEventSink(store, job_id)
    feed_loop(sink, "squeeze", "teacher", 10, START)
    sink.publish({"type": "job_finished", "job_id": job_id, "status": "succeeded", "job_fraction": 1.0,
                  "seconds": 1.0, "seq": 0, "time": START + 300})
    assert store.redis.exists(store.keys.curves(job_id))
    assert store.expire_finished(retention_s=0) == 1
    assert not store.redis.exists(store.keys.job(job_id), store.keys.events(job_id), store.keys.curves(job_id))
    assert acme.get(f"/v1/jobs/{job_id}/curves").status_code == 404
    sink.publish({"type": "stage_finished", "stage": "squeeze", "seconds": 1.0, "seq": 0, "time": START + 400})
    sink.publish(progress("squeeze", "teacher", 10, 10, START + 500, loss=0.1))
    assert not store.redis.exists(store.keys.curves(job_id))  # no key that nothing would delete
