"""The whole service on real components: redis-server (AOF), a Ray head with the Jobs API, the API
under uvicorn on loopback, and dispatcher processes submitting Ray jobs that run the job driver."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import redis
from torchvision.datasets import ImageFolder

from service.api.main import create_app
from service.settings import Settings
from tests.conftest import cpus_free_soon, quick_resources
from tests.services import ApiServer, DispatcherProcess, RedisServer, wait_until
from tests.test_service_api import sse_events

pytestmark = pytest.mark.slow
KEY = "key-acme"
OTHER_KEY = "key-globex"


@pytest.fixture
def stack(tmp_path, ray_local, ray_head, fmnist_root, fmnist_teacher_ckpt):
    """Redis + API + a dispatcher factory; everything a job reads lies under the data roots."""
    redis_server = RedisServer(tmp_path / "redis").start()
    settings = Settings(redis_url=redis_server.url, ray_address=ray_head.jobs_url, api_keys=f"acme={KEY},globex={OTHER_KEY}",
                        api_keys_file=None, artifacts=str(tmp_path / "artifacts"),
                        data_roots=os.pathsep.join([str(fmnist_root), str(fmnist_teacher_ckpt.parent)]),
                        node_cpus=4)  # more than the Ray head's 2: a test asks for a driver Ray holds pending
    api = ApiServer(create_app(settings)).start()
    env = {"REDIS_URL": redis_server.url, "RAY_ADDRESS": ray_head.jobs_url, "SCDD_MAX_RUNNING": "1",
           "SCDD_POLL_S": "0.2", "SCDD_RECLAIM_AFTER_S": "2", "SCDD_CANCEL_GRACE_S": "20"}
    dispatchers: list[DispatcherProcess] = []

    class Stack:
        pass

    stack = Stack()
    stack.redis, stack.api, stack.settings, stack.tmp = redis_server, api, settings, tmp_path
    stack.client = api.client(KEY)

    def dispatcher(**overrides: str) -> DispatcherProcess:
        process = DispatcherProcess({**env, **overrides}, tmp_path / f"dispatcher{len(dispatchers)}.log").start()
        dispatchers.append(process)
        return process

    stack.dispatcher = dispatcher
    yield stack
    for process in dispatchers:
        process.stop()
    stack.client.close()
    api.stop()
    redis_server.stop()
    assert cpus_free_soon(ray_local, 30) == 2  # no job left anything running


def spec(fmnist_root: Path, teacher: Path, iterations: int = 6, **resources) -> dict:
    return {
        "method": "sre2l",
        "dataset": {"root": str(fmnist_root), "classes": [0, 1, 2], "train_limit": 50},
        "teacher": {"checkpoint": str(teacher)},
        "recover": {"ipc": 3, "iterations": iterations, "batch_size": 2},
        "validate": {"enabled": False},
        "resources": {**quick_resources(), **resources},
    }


def wait_state(client, job_id: str, states: set[str], seconds: float = 240) -> dict:
    return wait_until(lambda: (job := client.get(f"/v1/jobs/{job_id}").json())["state"] in states and job,
                      seconds, f"job {job_id} to reach {states}", interval=0.2)


def ray_jobs_named(ray_head, job_id: str) -> list:
    from ray.job_submission import JobSubmissionClient

    return [job for job in JobSubmissionClient(ray_head.jobs_url).list_jobs() if job.submission_id == job_id]


def test_submit_stream_events_succeed_and_download_an_imagefolder(stack, fmnist_root, fmnist_teacher_ckpt, ray_head):
    stack.dispatcher()
    job = stack.client.post("/v1/jobs", json=spec(fmnist_root, fmnist_teacher_ckpt)).json()
    events = sse_events(stack.client, job["id"])
    kinds = [kind for _, kind, _ in events]
    assert kinds[0] == "job_started" and kinds[-1] == "job_finished", kinds
    assert events[-1][2]["status"] == "succeeded", events[-1][2]
    assert {"load", "squeeze", "recover", "write"} <= {data["stage"] for _, kind, data in events if kind == "stage_started"}
    fractions = [data["job_fraction"] for _, kind, data in events if kind == "progress"]
    assert fractions == sorted(fractions) and fractions
    # resume from the middle: exactly the rest comes again
    middle = len(events) // 2
    assert sse_events(stack.client, job["id"], last_event_id=events[middle][0]) == events[middle + 1:]

    done = stack.client.get(f"/v1/jobs/{job['id']}").json()
    assert done["state"] == "succeeded" and done["progress"] == 1.0 and done["summary"]["images"] == 9
    assert done["dispatched_at"] <= done["started_at"] <= done["finished_at"]
    assert len(ray_jobs_named(ray_head, job["id"])) == 1

    files = {f["path"]: f["size"] for f in stack.client.get(f"/v1/jobs/{job['id']}/artifacts").json()["files"]}
    assert {"manifest.json", "report.json", "grid.png"} <= set(files)
    out = stack.tmp / "download"
    for path in files:
        answer = stack.client.get(f"/v1/jobs/{job['id']}/artifacts/{path}")
        assert answer.status_code == 200 and len(answer.content) == files[path]
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(answer.content)
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["images"]:
        assert hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
    dataset = ImageFolder(str(out / "images"))
    assert len(dataset) == 9 and len(dataset.classes) == 3


def images_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in (folder / "images").rglob("*.png")}


def test_a_job_cancelled_mid_recover_releases_its_workers_and_resumes_to_the_same_images(
        stack, fmnist_root, fmnist_teacher_ckpt, ray_local, ray_head):
    """Cancel mid-recover (cooperative, within the grace; the workers freed), then POST .../resume: the next attempt
    runs on the same output, makes only the units still missing, and its images are byte-identical to an
    uninterrupted run's. Another worker count is refused (the images depend on it with iterations > 0). The
    uninterrupted run also loses its dispatcher (kill -9) while it runs: another takes it over and it runs once."""
    first_dispatcher = stack.dispatcher()
    job_spec = spec(fmnist_root, fmnist_teacher_ckpt, iterations=80, workers=2, threads=1)
    job_spec["recover"]["ipc"] = 4  # 4 units (a round each: 3 classes in 2 slices)
    job = stack.client.post("/v1/jobs", json=job_spec).json()
    out = stack.tmp / "artifacts" / "acme" / job["id"]
    units = out / "state" / "units"
    wait_until(lambda: units.is_dir() and any(units.iterdir()), 180, "a first recover unit")
    answer = stack.client.post(f"/v1/jobs/{job['id']}/cancel")
    assert answer.status_code == 202 and answer.json()["cancel_requested"]
    asked = time.time()
    done = wait_state(stack.client, job["id"], {"succeeded", "failed", "cancelled"}, 60)
    assert done["state"] == "cancelled" and time.time() - asked < 20, done  # cooperatively, within the grace
    assert cpus_free_soon(ray_local, 30) == 2
    assert stack.client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409
    made = {p.name: p.stat().st_mtime_ns for p in units.iterdir()}
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "images").rglob("*.png")}
    assert 1 <= len(made) < 4, made

    refused = stack.client.post(f"/v1/jobs/{job['id']}/resume", json={"workers": 1})
    assert refused.status_code == 422 and "only 2 workers can resume it" in refused.json()["message"], refused.json()
    resumed = stack.client.post(f"/v1/jobs/{job['id']}/resume")
    assert resumed.status_code == 202 and resumed.json()["attempt"] == 2 and resumed.json()["state"] == "queued"
    assert stack.client.post(f"/v1/jobs/{job['id']}/resume").status_code == 409  # queued already
    done = wait_state(stack.client, job["id"], {"succeeded", "failed", "cancelled"})
    assert done["state"] == "succeeded" and done["attempt"] == 2 and done["error"] is None, done
    report = json.loads((out / "report.json").read_text())
    assert report["recover"]["units_resumed"] == len(made) and report["recover"]["units_run"] == 4 - len(made)
    assert {p.name: p.stat().st_mtime_ns for p in units.iterdir() if p.name in made} == made  # each unit made once
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == state for p, state in before.items())
    kinds = [kind for _, kind, _ in sse_events(stack.client, job["id"])]  # both attempts, in order
    assert kinds.count("job_started") == 2 and kinds.count("job_finished") == 2 and kinds[-1] == "job_finished"
    assert kinds.index("job_resumed") == kinds.index("job_finished") + 1, kinds

    assert len(ray_jobs_named(ray_head, job["id"])) == len(ray_jobs_named(ray_head, f"{job['id']}-a2")) == 1

    whole = stack.client.post("/v1/jobs", json=job_spec).json()  # the same spec, uninterrupted
    wait_state(stack.client, whole["id"], {"running"}, 120)
    first_dispatcher.kill()
    stack.dispatcher()
    assert wait_state(stack.client, whole["id"], {"succeeded", "failed", "cancelled"})["state"] == "succeeded"
    assert images_of(out) == images_of(stack.tmp / "artifacts" / "acme" / whole["id"]) and len(images_of(out)) == 12
    assert [kind for _, kind, _ in sse_events(stack.client, whole["id"])].count("job_started") == 1
    assert len(ray_jobs_named(ray_head, whole["id"])) == 1
    r = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    # the new dispatcher acknowledges it once Ray reports the driver process ended
    wait_until(lambda: r.xpending("scdd:queue", "dispatchers")["pending"] == 0, 30, "the message to be acknowledged")
    assert r.hlen("scdd:slots") == 0


def test_a_job_resumed_on_another_worker_count_before_a_redis_restart_still_runs(stack, fmnist_root,
                                                                                 fmnist_teacher_ckpt):
    """recover.iterations 0: the images do not depend on the worker count, so a resume may change it. The resumed
    job is queued only in Redis's append-only file when Redis restarts (no dispatcher yet): it still runs."""
    job_spec = spec(fmnist_root, fmnist_teacher_ckpt, iterations=0, workers=2, threads=1)
    job_spec["recover"]["init"] = "real"
    job = stack.client.post("/v1/jobs", json=job_spec).json()
    assert stack.client.post(f"/v1/jobs/{job['id']}/cancel").json()["state"] == "cancelled"  # still queued
    resumed = stack.client.post(f"/v1/jobs/{job['id']}/resume", json={"workers": 1})
    assert resumed.status_code == 202 and resumed.json()["spec"]["resources"]["workers"] == 1
    stack.redis.restart()
    again = stack.client.get(f"/v1/jobs/{job['id']}").json()
    assert (again["state"], again["attempt"]) == ("queued", 2)
    stack.dispatcher()
    done = wait_state(stack.client, job["id"], {"succeeded", "failed", "cancelled"})
    assert done["state"] == "succeeded" and done["summary"]["images"] == 9, done
    assert stack.client.post(f"/v1/jobs/{job['id']}/resume").status_code == 409  # it succeeded


def test_a_job_that_cannot_be_submitted_is_dead_lettered(stack, fmnist_root, fmnist_teacher_ckpt):
    stack.dispatcher(RAY_ADDRESS="http://127.0.0.1:9", SCDD_MAX_DELIVERIES="2")  # nothing listens there
    job = stack.client.post("/v1/jobs", json=spec(fmnist_root, fmnist_teacher_ckpt)).json()
    done = wait_state(stack.client, job["id"], {"failed"}, 60)
    assert done["error"].startswith("not dispatched: ") and "failed 2 times" in done["error"]
    assert "127.0.0.1" not in done["error"]  # the submit errors (addresses) are the operator's, in its log
    dead = redis.Redis.from_url(stack.redis.url, decode_responses=True).xrange("scdd:queue:dead")
    assert [entry["job"] for _, entry in dead] == [job["id"]]
    assert [kind for _, kind, _ in sse_events(stack.client, job["id"])] == ["job_finished"]


def test_a_failed_drivers_log_reaches_the_operator_redacted_and_the_tenant_a_fixed_message(stack, fmnist_root,
                                                                                           fmnist_teacher_ckpt):
    """Ray's message of a failed job is the tail of its driver log (tracebacks, paths, addresses, here a Redis URL
    with its password); it used to be copied into the job's `error`. The driver here is a shell that prints such a
    log and exits 3 before it could end the job itself."""
    leak = "Traceback (most recent call last): redis://:hunter2@10.1.2.3:6379/0 /srv/secret/path"
    process = stack.dispatcher(SCDD_JOB_PYTHON=f"sh -c 'echo \"{leak}\"; exit 3' --")
    job = stack.client.post("/v1/jobs", json=spec(fmnist_root, fmnist_teacher_ckpt)).json()
    done = wait_state(stack.client, job["id"], {"failed", "succeeded"}, 120)
    assert done["error"] == (f"the job's driver failed (Ray job {job['id']}) without ending the job; the operator can "
                             f"read why with `ray job logs {job['id']}`"), done["error"]
    process.stop()
    log = process.log.read_text()
    assert "10.1.2.3:6379" in log and "hunter2" not in log  # the operator's copy, password redacted


def test_a_job_ignoring_its_cancel_is_stopped_after_the_grace_period(stack, fmnist_root, fmnist_teacher_ckpt, ray_head):
    stack.dispatcher(SCDD_CANCEL_GRACE_S="0")
    job = stack.client.post("/v1/jobs", json=spec(fmnist_root, fmnist_teacher_ckpt, iterations=3000)).json()
    wait_state(stack.client, job["id"], {"running"}, 120)
    stack.client.post(f"/v1/jobs/{job['id']}/cancel")
    done = wait_state(stack.client, job["id"], {"cancelled", "failed", "succeeded"}, 60)
    assert done["state"] == "cancelled" and "stopped by force" in done["error"]
    wait_until(lambda: ray_jobs_named(ray_head, job["id"])[0].status in ("STOPPED", "FAILED"), 60, "Ray to stop it")


def test_cancelling_a_job_ray_has_not_started_stops_it_at_once(stack, fmnist_root, fmnist_teacher_ckpt, ray_head):
    stack.dispatcher()  # grace 20 s: this must not wait for it
    job = stack.client.post("/v1/jobs", json=spec(fmnist_root, fmnist_teacher_ckpt, threads=3)).json()
    wait_state(stack.client, job["id"], {"dispatched"}, 60)  # its driver wants 3 CPUs of 2: Ray holds it pending
    assert ray_jobs_named(ray_head, job["id"])[0].status == "PENDING"
    stack.client.post(f"/v1/jobs/{job['id']}/cancel")
    done = wait_state(stack.client, job["id"], {"cancelled", "failed", "succeeded"}, 10)
    assert done["state"] == "cancelled" and done["error"] == "cancelled before its driver started"
    r = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    wait_until(lambda: r.xpending("scdd:queue", "dispatchers")["pending"] == 0, 10, "the message to be acknowledged")
    assert ray_jobs_named(ray_head, job["id"])[0].status in ("PENDING", "STOPPED")  # never ran


def test_a_jobs_runtime_env_holds_the_redis_url_only_when_the_cluster_lacks_it(redis_server):
    """Anyone with the Ray Jobs API or dashboard reads a job's runtime_env: with SCDD_JOBS_REDIS_URL=cluster (the
    chart, whose Ray pods get REDIS_URL from the Secret) the URL and its password stay out of it."""
    from service.blocking_jobstore import BlockingJobStore
    from service.dispatcher import Dispatcher

    store = BlockingJobStore.connect(redis_server.url, "env-test")
    url = redis_server.url.replace("redis://", "redis://:secret@")
    passed = Dispatcher(Settings(redis_url=url, redis_prefix="env-test"), store, ray_jobs=None).job_env()
    assert passed == {"REDIS_URL": url, "SCDD_REDIS_PREFIX": "env-test", "SCDD_EVENTS_MAXLEN": "10000"}
    kept = Dispatcher(Settings(redis_url=url, redis_prefix="env-test", jobs_redis_url="cluster"), store,
                      ray_jobs=None).job_env()
    assert kept == {"SCDD_REDIS_PREFIX": "env-test", "SCDD_EVENTS_MAXLEN": "10000"}
    faults = Dispatcher(Settings(redis_url=url, redis_prefix="env-test", jobs_redis_url="cluster",
                                 placement_timeout_s=1800, max_restarts=8, curve_points=64, event_buffer=50,
                                 final_record_retry_s=1200), store, ray_jobs=None).job_env()
    assert faults == {**kept, "SCDD_PLACEMENT_TIMEOUT_S": "1800", "SCDD_MAX_RESTARTS": "8", "SCDD_CURVE_POINTS": "64",
                      "SCDD_EVENT_BUFFER": "50", "SCDD_FINAL_RECORD_RETRY_S": "1200"}


def test_only_the_current_attempts_driver_claims_a_job(redis_server):
    """A Ray job of an earlier attempt that Ray starts late (it was pending when the job was cancelled and resumed)
    finds a newer attempt and does not run; the current attempt's driver claims the job once."""
    from service import records
    from service.blocking_jobstore import BlockingJobStore
    from service.entrypoint import run

    store = BlockingJobStore.connect(redis_server.url, "claim-test")
    job_id = records.new_job_id()
    store.redis.hset(store.keys.job(job_id), mapping={"id": job_id, "tenant": "acme", "state": "queued",
                                                      "attempt": "2", "spec": "{}"})
    settings = Settings(redis_url=redis_server.url, redis_prefix="claim-test")
    assert run(job_id, settings, attempt=1) == 1 and store.get(job_id)["state"] == "queued"
    assert store.claim(job_id, 2) == (1, "queued") and store.get(job_id)["state"] == "running"
    assert store.claim(job_id, 2) == (0, "running")  # once
    assert records.submission_id(job_id, 1) == job_id and records.submission_id(job_id, 2) == f"{job_id}-a2"


def test_a_job_past_its_wall_clock_limit_fails_with_timeout_and_frees_its_workers(stack, fmnist_root,
                                                                                  fmnist_teacher_ckpt, ray_local):
    job = stack.client.post("/v1/jobs", json=spec(fmnist_root, fmnist_teacher_ckpt, iterations=3000,
                                                   workers=2, threads=1)).json()
    # the limit the API recorded from the tenant (tested in test_service_api), shortened for the test
    redis.Redis.from_url(stack.redis.url).hset(f"scdd:job:{job['id']}", "timeout_s", "15")
    stack.dispatcher()
    done = wait_state(stack.client, job["id"], {"succeeded", "failed", "cancelled"}, 120)
    assert done["state"] == "failed" and done["error"].startswith("timeout: still running 15 s after dispatch"), done
    assert done["finished_at"] - done["dispatched_at"] < 30
    assert cpus_free_soon(ray_local, 30) == 2  # its Ray job was stopped


def test_a_freed_slot_goes_to_the_tenant_with_one_queued_job_before_one_with_many(stack, fmnist_root,
                                                                                 fmnist_teacher_ckpt, ray_local):
    """One slot (SCDD_MAX_RUNNING=1): acme's running job ends; of acme's two queued jobs (older) and globex's
    one, globex's is dispatched next."""
    stack.dispatcher()
    first = stack.client.post("/v1/jobs", json=spec(fmnist_root, fmnist_teacher_ckpt, iterations=3000)).json()
    wait_state(stack.client, first["id"], {"running"}, 120)
    acme_queued = [stack.client.post("/v1/jobs", json=spec(fmnist_root, fmnist_teacher_ckpt)).json()["id"]
                   for _ in range(2)]
    with stack.api.client(OTHER_KEY) as globex:
        theirs = globex.post("/v1/jobs", json=spec(fmnist_root, fmnist_teacher_ckpt)).json()["id"]
        time.sleep(1)  # the dispatcher has read all three
        assert stack.client.post(f"/v1/jobs/{first['id']}/cancel").status_code == 202
        wait_state(globex, theirs, {"dispatched", "running", "succeeded"}, 60)
        assert [stack.client.get(f"/v1/jobs/{job}").json()["state"] for job in acme_queued] == ["queued", "queued"]
        for client, job in [(globex, theirs)] + [(stack.client, job) for job in acme_queued]:
            client.post(f"/v1/jobs/{job}/cancel")
        wait_state(globex, theirs, {"succeeded", "cancelled"}, 60)
