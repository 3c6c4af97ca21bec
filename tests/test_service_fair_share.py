"""Fair share of the run slots on a real redis-server (records.RESERVE, as the dispatcher calls it): round-robin
between tenants with queued jobs, a bound on GPUs held at once, and jobs too large for that bound refused at
submission. The dispatcher's end of it (jobs dispatched in that order on a real Ray head) is in
tests/test_service_e2e.py."""

from __future__ import annotations

import pytest

from service.api.main import create_app
from service.blocking_jobstore import BlockingJobStore
from tests.services import ApiServer, api_settings

SPEC = {"method": "sre2l", "dataset": {"classes": [0, 1]}, "recover": {"ipc": 1, "iterations": 2}}


@pytest.fixture
def service(redis_server, tmp_path):
    settings = api_settings(redis_server.url, tmp_path, max_active_jobs=8, max_gpus=4)
    server = ApiServer(create_app(settings)).start()
    with server.client("key-acme") as acme, server.client("key-globex") as globex:
        yield {"acme": acme, "globex": globex}, BlockingJobStore.connect(redis_server.url, settings.redis_prefix)
    server.stop()


def submit(client, **resources) -> str:
    answer = client.post("/v1/jobs", json={**SPEC, "resources": {"device": "cpu", **resources}})
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def dispatch_one(store: BlockingJobStore, waiting: list[tuple[str, str]], max_running: int, gpus: dict[str, int],
                 max_gpus: int = 0) -> str | None:
    """What a dispatcher does when a slot frees: try the waiting jobs oldest first; the first that gets a
    slot is dispatched (and leaves `waiting`)."""
    for job_id, tenant in sorted(waiting):
        taken, _why = store.reserve(job_id, tenant, gpus.get(job_id, 0), max_running, max_gpus)
        if taken:
            store.transition(job_id, "dispatched", ("queued",))
            waiting.remove((job_id, tenant))
            return job_id
    return None


def test_slots_go_round_robin_so_a_tenant_with_many_queued_jobs_cannot_starve_one_with_one(service):
    clients, store = service
    acme = [submit(clients["acme"]) for _ in range(6)]
    globex = [submit(clients["globex"])]
    waiting = [(job, "acme") for job in acme] + [(job, "globex") for job in globex]
    # two slots: acme's oldest, then globex's although five older acme jobs wait
    order = [dispatch_one(store, waiting, 2, {}), dispatch_one(store, waiting, 2, {})]
    assert order == [acme[0], globex[0]]
    assert dispatch_one(store, waiting, 2, {}) is None  # full
    assert store.reserve(acme[1], "acme", 0, 2)[1] == "full"
    for job in order:  # both end; the slots go to acme in its order
        store.finish(job, "succeeded", ("dispatched",))
    assert [dispatch_one(store, waiting, 2, {}) for _ in range(3)] == [acme[1], acme[2], None]
    assert store.active_count() == 2


def test_between_tenants_with_as_many_slots_the_one_served_longer_ago_goes_first(service):
    clients, store = service
    a1, a2 = submit(clients["acme"]), submit(clients["acme"])
    g1, g2 = submit(clients["globex"]), submit(clients["globex"])
    waiting = [(a1, "acme"), (a2, "acme"), (g1, "globex"), (g2, "globex")]
    assert [dispatch_one(store, waiting, 4, {}) for _ in range(4)] == [a1, g1, a2, g2]
    # acme was served before globex, each holds 2: when one of each ends, acme's next job goes first
    a3, g3 = submit(clients["acme"]), submit(clients["globex"])
    store.finish(a1, "succeeded", ("dispatched",))
    store.finish(g1, "succeeded", ("dispatched",))
    refused = store.reserve(g3, "globex", 0, 4)
    assert refused == (False, "owed:acme")
    assert store.reserve(a3, "acme", 0, 4) == (True, "reserved")
    assert store.reserve(g3, "globex", 0, 4) == (True, "reserved")


def test_gpus_held_at_once_stay_within_max_gpus_and_the_owed_tenant_is_waited_for(service):
    clients, store = service
    big = submit(clients["acme"], device="cuda", workers=3)
    assert store.reserve(big, "acme", 3, 10, 4) == (True, "reserved")
    two = submit(clients["globex"], device="cuda", workers=2)
    assert store.reserve(two, "globex", 2, 10, 4) == (False, "gpus")  # 3 + 2 > 4
    # globex holds fewer slots and waits: acme's job that would fit is held back for it (no overtaking)
    small = submit(clients["acme"], device="cuda", workers=1)
    assert store.reserve(small, "acme", 1, 10, 4) == (False, "owed:globex")
    cpu = submit(clients["acme"])
    assert store.reserve(cpu, "acme", 0, 10, 4) == (False, "owed:globex")
    store.finish(big, "succeeded", ("queued",))  # its GPUs free
    assert store.reserve(two, "globex", 2, 10, 4) == (True, "reserved")
    assert store.reserve(small, "acme", 1, 10, 4) == (True, "reserved")


def test_a_job_holding_more_gpus_than_the_service_runs_at_once_is_refused_at_submission(service):
    clients, _store = service
    answer = clients["acme"].post("/v1/jobs", json={**SPEC, "resources": {"device": "cuda", "workers": 5}})
    assert answer.status_code == 422
    assert "5 workers on device 'cuda' hold 5 GPUs" in answer.json()["message"]
    assert "SCDD_MAX_GPUS=4" in answer.json()["message"]
    # device auto counts as GPU work; cpu jobs hold none
    assert clients["acme"].post("/v1/jobs", json={**SPEC, "resources": {"workers": 5}}).status_code == 422
    assert clients["acme"].post("/v1/jobs", json={**SPEC, "resources": {"device": "cpu", "workers": 5}}).status_code == 202
