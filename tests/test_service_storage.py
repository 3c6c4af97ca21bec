"""Per-tenant storage bounds on a real redis-server behind the real API (issue 27, item 2): jobs kept and bytes of
specs, finished jobs included; DELETE of a finished job; jobs cancelled while queued expire within the hour, not
after the 30-day retention."""

from __future__ import annotations

import pytest

from service.api.main import create_app
from service.blocking_jobstore import BlockingJobStore
from tests.services import ApiServer, api_settings

SPEC = {"method": "sre2l", "dataset": {"classes": [0, 1]}, "recover": {"ipc": 1, "iterations": 2}}


@pytest.fixture
def service(redis_server, tmp_path, request):
    settings = api_settings(redis_server.url, tmp_path, submit_rate=0, **getattr(request, "param", {}))
    server = ApiServer(create_app(settings)).start()
    with server.client("key-acme") as acme, server.client("key-globex") as globex:
        yield settings, acme, globex, BlockingJobStore.connect(redis_server.url, settings.redis_prefix)
    server.stop()


def submit(client, status: int = 202, **extra):
    answer = client.post("/v1/jobs", json={**SPEC, **extra})
    assert answer.status_code == status, answer.text
    return answer.json()["id"] if status == 202 else answer.json()["detail"]


def stored(store: BlockingJobStore, tenant: str) -> tuple[int, int]:
    return store.redis.zcard(store.keys.tenant_jobs(tenant)), int(store.redis.get(store.keys.tenant_bytes(tenant)) or 0)


@pytest.mark.parametrize("service", [{"max_jobs_kept": 3}], indirect=True)
def test_finished_jobs_count_towards_the_jobs_a_tenant_keeps_until_deleted(service):
    """A submit-and-cancel loop used to store jobs without bound (quotas counted only active ones)."""
    settings, acme, globex, store = service
    jobs = [submit(acme) for _ in range(3)]
    for job_id in jobs:
        assert acme.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    refused = submit(acme, status=429)
    assert "3 jobs stored, its limit is 3 (limits.max_jobs_kept in the API key file, else SCDD_MAX_JOBS_KEPT)" \
        in refused and "DELETE /v1/jobs/{id}" in refused
    submit(globex)  # the bound is per tenant
    assert acme.delete(f"/v1/jobs/{jobs[0]}").status_code == 204
    assert acme.get(f"/v1/jobs/{jobs[0]}").status_code == 404
    assert acme.delete(f"/v1/jobs/{jobs[0]}").status_code == 404
    assert globex.delete(f"/v1/jobs/{jobs[1]}").status_code == 404  # another tenant's job: not there for them
    assert store.redis.zscore(store.keys.expired, f"acme/{jobs[0]}") is not None  # its artifacts: the GC's
    active = submit(acme)
    answer = acme.delete(f"/v1/jobs/{active}")
    assert answer.status_code == 409 and "cancel it first" in answer.json()["detail"]
    assert stored(store, "acme")[0] == 3


@pytest.mark.parametrize("service", [{"max_stored_bytes": 65536, "max_body_bytes": 65536}], indirect=True)
def test_spec_bytes_a_tenant_keeps_are_bounded_and_freed_by_delete(service):
    settings, acme, _globex, store = service
    made = []
    while True:  # specs of equal length (two-digit seeds), about 1 KB each
        answer = acme.post("/v1/jobs", json={**SPEC, "seed": 10 + len(made)})
        if answer.status_code != 202:
            break
        made.append(answer.json()["id"])
        acme.post(f"/v1/jobs/{made[-1]}/cancel")
    assert answer.status_code == 429 and "SCDD_MAX_STORED_BYTES" in answer.json()["detail"], answer.text
    jobs, size = stored(store, "acme")
    assert jobs == len(made) and 0 < size <= 65536
    assert size == sum(store.redis.hstrlen(store.keys.job(job_id), "spec") for job_id in made)
    first = store.redis.hstrlen(store.keys.job(made[0]), "spec")
    assert acme.delete(f"/v1/jobs/{made[0]}").status_code == 204
    assert stored(store, "acme") == (jobs - 1, size - first)
    submit(acme, seed=99)


@pytest.mark.parametrize("service", [{"cancelled_queued_retention_s": 0}], indirect=True)
def test_a_job_cancelled_while_queued_expires_soon_whatever_the_retention(service):
    settings, acme, _globex, store = service
    cancelled, finished = submit(acme), submit(acme)
    assert acme.post(f"/v1/jobs/{cancelled}/cancel").json()["state"] == "cancelled"
    store.transition(finished, "dispatched", ("queued",))
    store.finish(finished, "succeeded", ("dispatched",))
    assert store.expire_finished(None) == 1  # retention off (0 days): only the cancelled-while-queued one goes
    assert acme.get(f"/v1/jobs/{cancelled}").status_code == 404
    assert acme.get(f"/v1/jobs/{finished}").json()["state"] == "succeeded"
    assert stored(store, "acme") == (1, store.redis.hstrlen(store.keys.job(finished), "spec"))
    assert store.expired_jobs() == [("acme", cancelled)]  # its artifacts: the GC's, as after retention


def test_a_resumed_job_cancelled_again_while_queued_expires_like_any(service):
    """Resume takes a job out of the short expiry (it is queued again), a new cancel puts it back."""
    settings, acme, _globex, store = service
    job_id = submit(acme)
    acme.post(f"/v1/jobs/{job_id}/cancel")
    assert store.redis.zscore(store.keys.expiring, job_id) is not None
    assert acme.post(f"/v1/jobs/{job_id}/resume").status_code == 202
    assert store.redis.zscore(store.keys.expiring, job_id) is None


def test_a_tenants_own_storage_bounds_in_the_key_file_win(redis_server, tmp_path):
    import yaml

    from service.auth import hash_key

    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"tenants": {
        "acme": {"keys_sha256": [hash_key("key-acme")], "limits": {"max_jobs_kept": 1}},
        "globex": {"keys_sha256": [hash_key("key-globex")]}}}))
    settings = api_settings(redis_server.url, tmp_path, submit_rate=0, api_keys=None, api_keys_file=str(keys))
    server = ApiServer(create_app(settings)).start()
    try:
        with server.client("key-acme") as acme, server.client("key-globex") as globex:
            submit(acme)
            assert "its limit is 1 (limits.max_jobs_kept" in submit(acme, status=429)
            submit(globex), submit(globex)  # the service's bound (2000) for the other tenant
    finally:
        server.stop()
