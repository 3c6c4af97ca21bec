"""The job API over HTTP (uvicorn on loopback) against a real redis-server; no Ray needed here:
jobs stay queued (the dispatcher tests are in test_service_e2e.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
import redis
import yaml

from service.api.main import create_app
from service.export import FOLDER, documents
from tests.services import ApiServer, api_settings, wait_until


@pytest.fixture
def api(redis_server, tmp_path):
    server = ApiServer(create_app(api_settings(redis_server.url, tmp_path))).start()
    yield server
    server.stop()


@pytest.fixture
def acme(api):
    with api.client("key-acme") as client:
        yield client


SPEC = {"method": "sre2l", "dataset": {"classes": [0, 1]}, "recover": {"ipc": 1, "iterations": 2}}


def submit(client: httpx.Client, spec: dict | None = None, **headers) -> httpx.Response:
    return client.post("/v1/jobs", json=spec or SPEC, headers=headers)


def test_submit_answers_202_with_location_and_the_job_reads_back(acme):
    answer = submit(acme)
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert answer.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] == "queued" and job["progress"] == 0 and not job["cancel_requested"]
    assert job["spec"]["recover"]["ipc"] == 1
    assert job["spec"]["output"]["url"].endswith(f"/artifacts/acme/{job['id']}")  # the service chose it
    assert acme.get(answer.headers["location"]).json() == job


def test_missing_or_unknown_key_is_401(api):
    with api.client() as anonymous, api.client("not-a-key") as wrong:
        for client in (anonymous, wrong):
            for method, path in (("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", "/v1/jobs/j-0"),
                                 ("POST", "/v1/jobs/j-0/cancel"), ("GET", "/v1/jobs/j-0/events"),
                                 ("GET", "/v1/jobs/j-0/artifacts"), ("GET", "/v1/jobs/j-0/archive")):
                answer = client.request(method, path, json=SPEC if method == "POST" else None)
                assert answer.status_code == 401, (method, path)
                assert answer.headers["www-authenticate"] == "Bearer"
                assert "API key" in answer.json()["detail"]


def test_another_tenants_job_is_not_found(api, acme):
    job = submit(acme).json()
    with api.client("key-globex") as globex:
        for method, path in (("GET", ""), ("POST", "/cancel"), ("GET", "/events"), ("GET", "/artifacts"),
                             ("GET", "/artifacts/manifest.json"), ("GET", "/archive")):
            answer = globex.request(method, f"/v1/jobs/{job['id']}{path}")
            assert answer.status_code == 404, path
            assert answer.json() == {"detail": f"no job {job['id']!r}: list yours with GET /v1/jobs"}
        assert globex.get("/v1/jobs").json()["jobs"] == []
    assert acme.get(f"/v1/jobs/{job['id']}").json()["state"] == "queued"  # untouched


def test_idempotency_key_returns_the_same_job_and_queues_it_once(acme, redis_server):
    first = submit(acme, **{"Idempotency-Key": "retry-1"})
    again = submit(acme, **{"Idempotency-Key": "retry-1"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    other = submit(acme, {**SPEC, "seed": 7}, **{"Idempotency-Key": "retry-1"})
    assert other.status_code == 409 and first.json()["id"] in other.json()["detail"]
    fresh = submit(acme, **{"Idempotency-Key": "retry-2"})
    assert fresh.json()["id"] != first.json()["id"]
    assert redis.Redis.from_url(redis_server.url).xlen("scdd:queue") == 2


def test_invalid_spec_is_422_with_field_paths(acme):
    answer = submit(acme, {"recover": {"ipc": 0, "lr": -1}, "bogus": 1})
    assert answer.status_code == 422
    body = answer.json()
    locs = {tuple(error["loc"]) for error in body["detail"]}
    assert {("body", "recover", "ipc"), ("body", "recover", "lr"), ("body", "bogus")} <= locs
    assert "recover.ipc: Input should be greater than or equal to 1" in body["message"]
    assert submit(acme, "not json at all").status_code == 422


def test_bad_recover_init_is_422_naming_the_field(acme):
    answer = submit(acme, {"recover": {"init": "bogus"}})
    assert answer.status_code == 422 and "recover.init" in answer.json()["message"]
    answer = submit(acme, {"recover": {"init": "selected", "ipc": 20, "select": {"candidates": 10}}})
    assert answer.status_code == 422
    assert "recover.select.candidates (10) must be >= recover.ipc (20)" in answer.json()["message"]
    accepted = submit(acme, {**SPEC, "recover": {"init": "herding", "ipc": 2},
                             "validate": {"preset": "long", "dd_ranking": True}})
    assert accepted.status_code == 202


def test_service_owned_and_outside_paths_are_422(acme, tmp_path):
    answer = submit(acme, {**SPEC, "output": {"url": "/tmp/elsewhere", "s3": {"region": "x"}},
                           "dataset": {"root": "/etc"}, "teacher": {"checkpoint": "/root/model.pt"}})
    assert answer.status_code == 422
    message = answer.json()["message"]
    for path in ("output.url: chosen by the service", "output.s3:", "dataset.root: '/etc' is outside",
                 "teacher.checkpoint: '/root/model.pt' is outside"):
        assert path in message
    inside = submit(acme, {**SPEC, "teacher": {"checkpoint": str(tmp_path / "teacher.pt")}})
    assert inside.status_code == 202  # under a data root
    # kind evaluate: the set it judges is a path it reads; an imagefolder job with no recover work needs no class count
    evaluate = {"kind": "evaluate", "dataset": {"name": "imagefolder", "root": str(tmp_path)},
                "validate": {"students": ["convnet", "resnet18_small"], "relabel_teacher": "supervised",
                             "relabel_checkpoint": str(tmp_path / "teacher.pt")}}
    outside = submit(acme, {**evaluate, "evaluate": {"images": "/etc"}})
    assert outside.status_code == 422 and "evaluate.images: '/etc' is outside" in outside.json()["message"]
    judged = submit(acme, {**evaluate, "evaluate": {"images": str(tmp_path / "set")}})
    assert judged.status_code == 202, judged.text
    assert judged.json()["spec"]["kind"] == "evaluate" and judged.json()["spec"]["evaluate"]["images"].endswith("set")


def test_a_bad_gvbsm_ensemble_member_is_422_in_one_line(acme, tmp_path):
    answer = submit(acme, {**SPEC, "method": "gvbsm", "teacher": {"ensemble": ["convnet", "convnet_in"]}})
    assert answer.status_code == 422
    assert "teacher.ensemble: convnet_in has no BatchNorm layer" in answer.json()["message"]
    answer = submit(acme, {**SPEC, "validate": {"relabel_teacher": "ensemble", "relabel_checkpoints": [
        str(tmp_path / "a.pt"), "/root/b.pt"]}})
    assert answer.status_code == 422
    assert "validate.relabel_checkpoints.1: '/root/b.pt' is outside" in answer.json()["message"]
    assert submit(acme, {**SPEC, "method": "gvbsm"}).status_code == 202


def test_a_new_job_never_overwrites_a_record_with_the_same_id(acme, monkeypatch):
    from service import records

    first = submit(acme).json()
    ids = iter([first["id"], first["id"], "j-000000000001feedf00d"])  # the id clashes twice, then is free
    monkeypatch.setattr(records, "new_job_id", lambda: next(ids))
    second = submit(acme, {**SPEC, "recover": {"ipc": 2, "iterations": 2}})
    assert second.status_code == 202 and second.json()["id"] == "j-000000000001feedf00d"
    assert acme.get(f"/v1/jobs/{first['id']}").json() == first  # untouched
    monkeypatch.setattr(records, "new_job_id", lambda: first["id"])
    clash = submit(acme)
    assert clash.status_code == 503 and "no free job id after 3 tries" in clash.json()["detail"]
    assert acme.get(f"/v1/jobs/{first['id']}").json() == first


def test_a_tenant_submitting_too_fast_gets_429_with_retry_after_and_others_do_not(redis_server, tmp_path):
    server = ApiServer(create_app(api_settings(redis_server.url, tmp_path, submit_rate=6, submit_burst=2,
                                               max_active_jobs=10))).start()
    try:
        with server.client("key-acme") as acme, server.client("key-globex") as globex:
            assert [submit(acme).status_code for _ in range(2)] == [202, 202]  # the burst
            refused = submit(acme)
            assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 10
            assert "submits faster than its limit of 6 jobs per minute (bursts of 2" in refused.json()["detail"]
            assert submit(globex).status_code == 202  # a bucket per tenant
            assert acme.get("/v1/jobs").status_code == 200  # reading is not limited
            assert len(acme.get("/v1/jobs").json()["jobs"]) == 2  # the refused one was not stored
    finally:
        server.stop()


def test_every_limit_of_a_tenant_refuses_with_a_message_naming_it(redis_server, tmp_path):
    settings = api_settings(redis_server.url, tmp_path, max_workers=2, max_image_iterations=1000, max_epochs=50,
                            job_timeout_s=120)
    server = ApiServer(create_app(settings)).start()
    try:
        with server.client("key-acme") as acme:
            def message(spec: dict) -> str:
                answer = submit(acme, {**SPEC, **spec})
                assert answer.status_code == 422, answer.text
                return answer.json()["message"]

            assert "resources.workers: 4 workers asked, over the limit of 2 per job for tenant 'acme' " \
                   "(limits.max_workers in the API key file, else SCDD_MAX_WORKERS)" in message({"resources": {"workers": 4}})
            assert "recover.iterations: 2,000 image-iterations asked (ipc 10 x 2 classes x 100 iterations), over the " \
                   "limit of 1,000" in message({"recover": {"ipc": 10, "iterations": 100}})
            assert "teacher.epochs: 60 epochs asked, over the limit of 50 per job" in message({"teacher": {"epochs": 60}})
            assert "validate.epochs: 300 epochs asked" in message({"validate": {"enabled": True}})  # the preset's
            both = message({"resources": {"workers": 3}, "teacher": {"probe": {"epochs": 51}}})
            assert "resources.workers" in both and "teacher.probe.epochs: 51 epochs asked" in both
            accepted = submit(acme, {**SPEC, "resources": {"workers": 2}, "validate": {"enabled": True, "epochs": 50}})
            assert accepted.status_code == 202
        record = redis.Redis.from_url(redis_server.url, decode_responses=True).hgetall(f"scdd:job:{accepted.json()['id']}")
        assert record["timeout_s"] == "120"  # the dispatcher stops it this long after dispatch
    finally:
        server.stop()


def test_the_key_file_sets_a_tenants_own_limits(tmp_path):
    from service.auth import ApiKeys, KeyConfigError, Limits, hash_key

    defaults = Limits(max_workers=8, max_image_iterations=10**8, max_epochs=1000, max_wall_clock_s=86400)
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"tenants": {
        "small": {"keys_sha256": [hash_key("k1")], "limits": {"max_workers": 1, "max_wall_clock_s": 600}},
        "plain": {"keys_sha256": [hash_key("k2")]}}}))
    keys = ApiKeys.load(None, str(keys_file), 4, defaults)
    assert keys.tenant_for("k1").limits == Limits(1, 10**8, 1000, 600)
    assert keys.tenant_for("k2").limits == defaults
    for bad in ({"max_workers": 0}, {"max_gpus": 2}, {"max_epochs": "many"}, {"max_workers": True}):
        keys_file.write_text(yaml.safe_dump({"tenants": {"small": {"keys_sha256": [hash_key("k1")], "limits": bad}}}))
        with pytest.raises(KeyConfigError, match="tenants.small.limits"):
            ApiKeys.load(None, str(keys_file), 4, defaults)


def test_the_longest_preset_is_what_admission_assumes_for_validate_epochs():
    from scdd.validate.protocol import PRESETS
    from service.budget import PRESET_EPOCHS_AT_MOST

    assert max(preset["epochs"] for preset in PRESETS.values()) == PRESET_EPOCHS_AT_MOST


def test_open_event_streams_are_bounded_per_tenant_and_process_while_the_api_answers(redis_server, tmp_path):
    import time
    from contextlib import ExitStack

    settings = api_settings(redis_server.url, tmp_path, max_streams_per_tenant=2, max_streams_per_process=3)
    app = create_app(settings)
    app.state.sse_keepalive_ms = 500  # closed streams notice sooner
    server = ApiServer(app).start()
    try:
        with ExitStack() as open_streams, server.client("key-acme") as acme, server.client("key-globex") as globex:
            acme_job, globex_job = submit(acme).json()["id"], submit(globex).json()["id"]

            def stream(key: str, job_id: str) -> httpx.Response:
                client = open_streams.enter_context(server.client(key))  # a connection of its own
                return open_streams.enter_context(client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=30))

            assert [stream("key-acme", acme_job).status_code for _ in range(2)] == [200, 200]  # queued: they wait
            refused = stream("key-acme", acme_job)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "5"
            refused.read()
            assert "tenant 'acme' has 2 event streams open, its limit (SCDD_MAX_STREAMS_PER_TENANT)" in refused.text
            assert stream("key-globex", globex_job).status_code == 200  # another tenant: its own bound
            full = stream("key-globex", globex_job)
            full.read()
            assert full.status_code == 429 and "this API process has 3 event streams open" in full.text
            for _ in range(20):  # the API keeps answering everyone else while the streams are open
                started = time.perf_counter()
                assert acme.get(f"/v1/jobs/{acme_job}").status_code == 200
                assert globex.get("/v1/jobs").status_code == 200
                assert time.perf_counter() - started < 1
        # every stream closed: their slots come back (at once, or at the stream's next keep-alive)
        def stream_accepted() -> bool:
            with server.client("key-acme") as again:
                with again.stream("GET", f"/v1/jobs/{acme_job}/events", timeout=30) as answer:
                    return answer.status_code == 200

        wait_until(stream_accepted, 15, "the slots of closed streams to come back", interval=0.5)
    finally:
        server.stop()


def test_object_store_paths_must_stay_inside_the_tenants_own_prefix():
    from api_schema import JobSpec
    from service.admission import AdmissionError, admit
    from service.auth import Tenant
    from service.settings import Settings

    settings = Settings(artifacts="s3://bucket/artifacts", data_roots="/usr/share/datasets")
    acme = Tenant("acme", 4, settings.default_limits)
    own = "s3://bucket/artifacts/acme/job-1/teacher/teacher.pt"
    assert admit(JobSpec.model_validate({"teacher": {"checkpoint": own}}), acme, "job-2", settings)
    for path in ("s3://bucket/artifacts/acme/../other/job/teacher.pt", "s3://bucket/artifacts/acme/./x/../../b/t.pt",
                 "s3://bucket/artifacts/acme//t.pt", "s3://bucket/artifacts/acme/%2e%2e/b/t.pt",
                 "s3://bucket/artifacts/acmeX/t.pt", "s3://bucket/artifacts/other/t.pt"):
        with pytest.raises(AdmissionError, match="is outside the folders this service reads from"):
            admit(JobSpec.model_validate({"teacher": {"checkpoint": path}}), acme, "job-2", settings)


def test_body_over_the_limit_is_413(acme):
    big = {**SPEC, "dataset": {"classes": ["c" * 100] * 100}}
    assert submit(acme, big).status_code == 413
    chunked = acme.post("/v1/jobs", content=iter([b"{" + b" " * 5000 + b"}"]), headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and "SCDD_MAX_BODY_BYTES" in chunked.json()["detail"]


def test_quota_of_active_jobs_is_429(acme):
    ids = [submit(acme).json()["id"] for _ in range(4)]
    refused = submit(acme)
    assert refused.status_code == 429 and "limit is 4" in refused.json()["detail"]
    assert acme.post(f"/v1/jobs/{ids[0]}/cancel").status_code == 202  # a cancelled job frees its place
    assert submit(acme).status_code == 202


def test_list_is_newest_first_with_cursor_pages_and_a_state_filter(acme):
    ids = [submit(acme).json()["id"] for _ in range(4)]
    acme.post(f"/v1/jobs/{ids[1]}/cancel")
    seen, cursor = [], None
    while True:
        page = acme.get("/v1/jobs", params={"limit": 3, **({"cursor": cursor} if cursor else {})}).json()
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    assert [job["id"] for job in acme.get("/v1/jobs", params={"state": "cancelled"}).json()["jobs"]] == [ids[1]]
    assert acme.get("/v1/jobs", params={"state": "exploded"}).status_code == 422
    assert acme.get("/v1/jobs", params={"cursor": "../x"}).status_code == 422


def sse_events(client: httpx.Client, job_id: str, last_event_id: str | None = None) -> list[tuple[str, str, dict]]:
    events = []
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=120) as answer:
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
        frame: dict[str, str] = {}
        for line in answer.iter_lines():
            if line.startswith(("id:", "event:", "data:")):
                name, _, value = line.partition(": ")
                frame[name] = value
            elif not line and "data" in frame:
                events.append((frame["id"], frame["event"], json.loads(frame["data"])))
                frame = {}
    return events


def test_cancel_a_queued_job_then_409_and_its_events_end(acme):
    job = submit(acme).json()
    answer = acme.post(f"/v1/jobs/{job['id']}/cancel")
    assert answer.status_code == 202 and answer.json()["state"] == "cancelled" and answer.json()["cancel_requested"]
    again = acme.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
    events = sse_events(acme, job["id"])
    assert [kind for _, kind, _ in events] == ["job_finished"] and events[0][2]["status"] == "cancelled"
    assert sse_events(acme, job["id"], last_event_id=events[-1][0]) == []  # resumed after the last: nothing new
    assert acme.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "yesterday"}).status_code == 400


def test_resume_queues_a_cancelled_job_again_as_its_next_attempt_by_the_worker_count_rule(acme, api, redis_server):
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    job = submit(acme, {**SPEC, "resources": {"workers": 2}}).json()
    assert acme.post(f"/v1/jobs/{job['id']}/resume").status_code == 409  # queued: nothing to resume
    acme.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.zscore("scdd:finished", job["id"]) is not None
    messages = r.xlen("scdd:queue")

    refused = acme.post(f"/v1/jobs/{job['id']}/resume", json={"workers": 1})  # iterations 2: the images depend on it
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"][0]["loc"] == ["body", "workers"]
    assert "only 2 workers can resume it" in refused.json()["message"]
    assert acme.post(f"/v1/jobs/{job['id']}/resume", json={"workers": 0}).status_code == 422
    assert acme.post(f"/v1/jobs/{job['id']}/resume", json={"gpus": 2}).status_code == 422  # only workers may change
    with api.client("key-globex") as globex:
        assert globex.post(f"/v1/jobs/{job['id']}/resume").status_code == 404

    resumed = acme.post(f"/v1/jobs/{job['id']}/resume")
    assert resumed.status_code == 202, resumed.text
    again = resumed.json()
    assert again["state"] == "queued" and again["attempt"] == 2 and again["error"] is None
    assert not again["cancel_requested"] and again["finished_at"] is None and again["spec"] == job["spec"]
    assert r.xlen("scdd:queue") == messages + 1 and r.zscore("scdd:finished", job["id"]) is None
    assert acme.get("/v1/jobs", params={"state": "queued"}).json()["jobs"][0]["id"] == job["id"]
    assert acme.post(f"/v1/jobs/{job['id']}/resume").status_code == 409  # queued again
    acme.post(f"/v1/jobs/{job['id']}/cancel")  # cancelled again while queued: its events end there
    events = sse_events(acme, job["id"])
    assert [kind for _, kind, _ in events] == ["job_finished", "job_resumed", "job_finished"]
    assert events[1][2]["attempt"] == 2 and events[1][2]["previous_state"] == "cancelled"


def test_a_job_without_recover_steps_resumes_on_another_worker_count_within_the_limits(acme):
    steps_free = {**SPEC, "recover": {"ipc": 1, "iterations": 0, "init": "real"}, "resources": {"workers": 2}}
    job = submit(acme, steps_free).json()
    acme.post(f"/v1/jobs/{job['id']}/cancel")
    over = acme.post(f"/v1/jobs/{job['id']}/resume", json={"workers": 9})  # max_workers 8
    assert over.status_code == 422 and "over the limit of 8" in over.json()["message"], over.text
    resumed = acme.post(f"/v1/jobs/{job['id']}/resume", json={"workers": 1})
    assert resumed.status_code == 202 and resumed.json()["spec"]["resources"]["workers"] == 1


def test_a_resume_over_the_active_job_quota_is_429(acme):
    ids = [submit(acme).json()["id"] for _ in range(4)]
    acme.post(f"/v1/jobs/{ids[0]}/cancel")
    submit(acme)  # the quota (4) is full again
    refused = acme.post(f"/v1/jobs/{ids[0]}/resume")
    assert refused.status_code == 429 and "limit is 4" in refused.json()["detail"]
    assert acme.get(f"/v1/jobs/{ids[0]}").json()["state"] == "cancelled"


@pytest.mark.parametrize("path", ["..%2F..%2F..%2Fetc%2Fpasswd", "%2e%2e/%2e%2e/secret", "images/../../globex/x",
                                  "%2Fetc%2Fpasswd", "images%5C..%5C..%5Cx", "%252e%252e/%252e%252e/x",
                                  "images//0.png", "images/%2E/0.png", "a%00b"])
def test_artifact_paths_outside_the_job_are_refused(acme, tmp_path, path):
    job = submit(acme).json()
    prefix = tmp_path / "artifacts" / "acme" / job["id"]
    (prefix / "images").mkdir(parents=True)
    (prefix / "images" / "0.png").write_bytes(b"png")
    (tmp_path / "artifacts" / "globex").mkdir()
    (tmp_path / "artifacts" / "globex" / "x").write_text("OTHER-TENANT-DATA")
    (tmp_path / "secret").write_text("SECRET-DATA")
    answer = acme.get(f"/v1/jobs/{job['id']}/artifacts/{path}")
    assert answer.status_code in (400, 404), (path, answer.status_code, answer.text)
    assert "-DATA" not in answer.text and "root:" not in answer.text


def test_artifacts_list_and_download_and_symlinks_out_are_not_followed(acme, tmp_path):
    job = submit(acme).json()
    prefix = tmp_path / "artifacts" / "acme" / job["id"]
    (prefix / "images" / "0").mkdir(parents=True)
    (prefix / "images" / "0" / "000.png").write_bytes(b"\x89PNG-bytes")
    (tmp_path / "secret").write_text("SECRET-DATA")
    (prefix / "leak").symlink_to(tmp_path / "secret")
    listing = acme.get(f"/v1/jobs/{job['id']}/artifacts").json()["files"]
    assert {"path": "images/0/000.png", "size": 10} in listing
    download = acme.get(f"/v1/jobs/{job['id']}/artifacts/images/0/000.png")
    assert download.status_code == 200 and download.content == b"\x89PNG-bytes"
    assert download.headers["content-type"] == "image/png"
    assert acme.get(f"/v1/jobs/{job['id']}/artifacts/leak").status_code == 404
    assert acme.get(f"/v1/jobs/{job['id']}/artifacts/missing.json").status_code == 404


def test_the_whole_set_downloads_as_one_zip_without_what_lies_outside_the_job(acme, tmp_path):
    import io
    import os
    import zipfile

    job = submit(acme).json()
    assert acme.get(f"/v1/jobs/{job['id']}/archive").status_code == 404  # nothing written yet
    prefix = tmp_path / "artifacts" / "acme" / job["id"]
    (prefix / "images" / "0").mkdir(parents=True)
    images = {f"images/0/{n:03d}.png": os.urandom(70000 + n) for n in range(3)}
    for rel, data in images.items():
        (prefix / rel).write_bytes(data)
    (prefix / "report.json").write_text('{"ok": true}')
    (tmp_path / "secret").write_text("SECRET-DATA")
    (prefix / "leak").symlink_to(tmp_path / "secret")
    answer = acme.get(f"/v1/jobs/{job['id']}/archive")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/zip"
    assert answer.headers["content-disposition"] == f'attachment; filename="{job["id"]}.zip"'
    archive = zipfile.ZipFile(io.BytesIO(answer.content))
    assert archive.testzip() is None
    expected = {f"{job['id']}/{rel}": data for rel, data in images.items()} | {f"{job['id']}/report.json": b'{"ok": true}'}
    assert {name: archive.read(name) for name in archive.namelist()} == expected


def test_health_readiness_and_metrics(api, acme, redis_server):
    with api.client() as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        ready = anonymous.get("/readyz")
        assert ready.status_code == 503 and ready.json() == {"status": "not ready", "redis": "ok", "ray": "not configured"}
        submit(acme)
        submit(acme)
        text = anonymous.get("/metrics").text
    assert 'scdd_jobs{state="queued"} 2.0' in text and "scdd_queue_depth 2.0" in text
    assert 'scdd_http_requests_total{method="POST",route="/v1/jobs",status="202"} 2.0' in text
    assert 'scdd_http_request_seconds_count{method="GET",route="/readyz"} 1.0' in text
    redis_server.stop()
    with api.client() as anonymous:
        down = anonymous.get("/readyz")
    assert down.status_code == 503 and down.json()["redis"] == "unreachable"  # the cause is in the log only
    assert str(redis_server.port) not in down.text


def test_exported_openapi_and_job_schema_are_current():
    for name, text in documents().items():
        assert (FOLDER / name).read_text() == text, f"api_schema/{name} is stale: run python -m service.export"


def test_the_api_process_never_imports_torch_or_ray():
    code = ("import sys; from service.api.main import create_app; create_app(); "
            "print(sorted(m for m in ('torch', 'ray', 'workers', 'scdd.pipeline') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_size_check_counts_an_imagefolders_classes_only_inside_the_data_roots(tmp_path):
    from api_schema import JobSpec
    from service.auth import Tenant
    from service.budget import over_budget
    from service.settings import Settings

    limits = Settings(max_image_iterations=100).default_limits
    acme = Tenant("acme", 4, limits)
    for name in ("cat", "dog", "eel"):
        (tmp_path / "train" / name).mkdir(parents=True)
    spec = JobSpec.model_validate({"dataset": {"name": "imagefolder", "root": str(tmp_path)},
                                   "recover": {"init": "noise", "ipc": 10, "iterations": 5}})
    (error,) = over_budget(spec, acme)
    assert "150 image-iterations asked (ipc 10 x 3 classes x 5 iterations)" in error[1]
    (unknown,) = over_budget(spec, acme, look_in_root=False)
    assert unknown[0] == ("body", "dataset", "classes") and "list them in dataset.classes" in unknown[1]
