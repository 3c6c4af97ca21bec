"""Run slots, deliveries and the dispatcher under Redis errors, on a real redis-server (issue 27, items 1-4):
a slot is held only by a live job, whatever interleaves with the dispatcher's read and reserve; takeovers of a
message do not count towards dead-lettering; the dispatcher survives a full Redis and a Redis that comes back
empty. Ray is a real address nothing listens on: a submit fails there, which the tests read as 'the dispatcher
got this far'."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest
import redis

from service import records
from service.blocking_jobstore import BlockingJobStore
from service.dispatcher import Dispatcher, RayJobs
from service.records import GROUP
from service.serve import free_port
from service.settings import Settings
from tests.services import wait_until

SPEC = {"method": "sre2l", "dataset": {"classes": [0, 1]}, "recover": {"ipc": 1, "iterations": 2},
        "resources": {"device": "cpu"}}
LIVE = ("queued", "dispatched", "running")
FINAL = ("succeeded", "failed", "cancelled")


class Jobs:
    """The create, cancel and resume scripts as the API runs them, on the blocking client (no API process)."""

    def __init__(self, store: BlockingJobStore):
        self.store, self.keys = store, store.keys
        self._create = store.redis.register_script(records.CREATE)
        self._cancel = store.redis.register_script(records.CANCEL)
        self._resume = store.redis.register_script(records.RESUME)

    def create(self, tenant: str) -> str:
        k, job_id = self.keys, records.new_job_id()
        outcome, _ = self._create(
            keys=[k.job(job_id), k.idempotency(tenant, "-"), k.queue, k.tenant_jobs(tenant),
                  *(k.tenant_state(tenant, s) for s in LIVE), k.counts, k.tenants, k.tenant_bytes(tenant)],
            args=[job_id, tenant, f"{time.time():.3f}", json.dumps(SPEC), "h", 10**6, 60, "0", "0", 10**6, 10**9])
        assert outcome == "created"
        return job_id

    def cancel(self, job_id: str) -> str:
        outcome, _ = self._cancel(keys=[self.keys.job(job_id), self.keys.expiring],
                                  args=[self.keys.prefix, f"{time.time():.3f}", 1000, "{}", 3600])
        return outcome

    def resume(self, job_id: str, tenant: str) -> str:
        k = self.keys
        outcome, _ = self._resume(keys=[k.job(job_id), *(k.tenant_state(tenant, s) for s in LIVE), k.queue,
                                        k.tenant_bytes(tenant)],
                                  args=[k.prefix, f"{time.time():.3f}", 1000, "{}", 10**6, ""])
        return outcome


def states(store: BlockingJobStore, job_ids: list[str]) -> dict[str, str]:
    return {job_id: (store.get(job_id) or {}).get("state", "gone") for job_id in job_ids}


def test_a_cancel_between_the_dispatchers_read_and_its_reserve_leaves_no_slot(redis_server):
    """The reproduction from the issue: create, read, cancel, reserve. The slot used to stay with the cancelled job
    for good, so another tenant's job then found the service full."""
    store = BlockingJobStore.connect(redis_server.url)
    jobs = Jobs(store)
    acme = jobs.create("acme")
    record = store.get(acme)  # the dispatcher reads the job ...
    assert jobs.cancel(acme) == "cancelled"  # ... a cancel lands ...
    assert store.reserve(acme, record["tenant"], 0, 1) == (False, "final")  # ... then it reserves
    assert store.redis.hgetall(store.keys.slots) == {}
    globex = jobs.create("globex")
    assert store.reserve(globex, "globex", 0, 1) == (True, "reserved")


def test_the_sweep_frees_slots_of_final_and_missing_jobs(redis_server):
    """Slots a crash or an older version left behind are freed by the dispatcher's sweep, live ones are kept."""
    store = BlockingJobStore.connect(redis_server.url)
    jobs = Jobs(store)
    live, ended = jobs.create("acme"), jobs.create("acme")
    assert store.reserve(live, "acme", 0, 5)[0] and store.reserve(ended, "acme", 0, 5)[0]
    store.finish(ended, "failed", ("queued",), error="x")
    store.redis.hset(store.keys.slots, mapping={ended: "acme 0", "j-00000000000000000000": "acme 1"})  # leaked
    assert sorted(store.sweep_slots()) == sorted([ended, "j-00000000000000000000"])
    assert list(store.redis.hgetall(store.keys.slots)) == [live]


@pytest.mark.parametrize("block", range(3))
def test_slots_held_always_equal_the_live_jobs_through_any_interleaving(redis_server, block):
    """Property-style: 100 seeds per block, 3 blocks (300 in all), each a random interleaving of submit, a
    dispatcher's read, its reserve (from that possibly stale read) and dispatch, cancel, claim, finish, resume and
    dispatcher deaths (its reads forgotten, its reserved slots kept). After every step: every job dispatched or
    running holds a slot, and every slot is held by a live job. No sweep runs: RESERVE alone must keep this."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    for seed in range(block * 100, block * 100 + 100):
        rng = random.Random(seed)
        store = BlockingJobStore(client, prefix=f"prop{seed}")
        jobs, made, reads = Jobs(store), [], {0: {}, 1: {}}  # dispatcher -> job -> the record it read
        for step in range(40):
            op = rng.choice(["submit", "read", "reserve", "reserve", "cancel", "claim", "finish", "resume", "die"])
            dispatcher = rng.randrange(2)
            if op == "submit" or not made:
                made.append(jobs.create(rng.choice(["acme", "globex", "initech"])))
            elif op == "read":
                job_id = rng.choice(made)
                if (record := store.get(job_id)) and record["state"] in LIVE:
                    reads[dispatcher][job_id] = record
            elif op == "reserve" and reads[dispatcher]:
                job_id = rng.choice(sorted(reads[dispatcher]))
                record = reads[dispatcher].pop(job_id)
                taken, _why = store.reserve(job_id, record["tenant"], 0, 3)
                if taken and record["state"] == "queued":  # as Dispatcher.handle: submit, then mark dispatched
                    store.transition(job_id, "dispatched", ("queued",))
            elif op == "cancel":
                job_id = rng.choice(made)
                if jobs.cancel(job_id) == "requested" and rng.random() < 0.5:  # the driver stops: cancelled
                    store.finish(job_id, "cancelled", ("dispatched", "running"))
            elif op == "claim":  # the entrypoint's claim of a dispatched job
                store.transition(rng.choice(made), "running", ("dispatched",))
            elif op == "finish":
                store.finish(rng.choice(made), rng.choice(["succeeded", "failed"]), ("dispatched", "running"))
            elif op == "resume":
                job_id = rng.choice(made)
                jobs.resume(job_id, store.get(job_id)["tenant"])
            elif op == "die":
                reads[dispatcher] = {}
            now = states(store, made)
            slots = set(client.hkeys(store.keys.slots))
            running = {job for job, state in now.items() if state in ("dispatched", "running")}
            assert running <= slots, f"seed {seed} step {step} ({op}): jobs {running - slots} run without a slot"
            dead = {job for job in slots if now.get(job) not in LIVE}
            assert not dead, f"seed {seed} step {step} ({op}): slots held by ended jobs {dead}: {now}"
            assert len(slots) <= 3
        client.delete(*client.keys(f"prop{seed}:*"))


def dispatcher_settings(redis_url: str, **overrides) -> Settings:
    base = dict(redis_url=redis_url, ray_address=f"http://127.0.0.1:{free_port()}",  # nothing listens there
                max_running=1, poll_s=0.05, reclaim_after_s=0.01, retention_days=0)
    return Settings(**{**base, **overrides})


def test_takeovers_by_restarted_dispatchers_do_not_fail_a_queued_job(redis_server):
    """A job waiting for its slot through seven dispatcher restarts (each restart's XAUTOCLAIM counts a delivery)
    stays queued; it used to be failed as 'not dispatched' after the fifth."""
    settings = dispatcher_settings(redis_server.url)
    store = BlockingJobStore.connect(redis_server.url)
    jobs = Jobs(store)
    holder, waiting = jobs.create("acme"), jobs.create("acme")
    store.redis.xgroup_create(store.keys.queue, GROUP, id="$", mkstream=True)  # the holder's message: not read
    store.reserve(holder, "acme", 0, 1)
    store.transition(holder, "dispatched", ("queued",))  # holds the only slot, followed by nobody here
    store.redis.xadd(store.keys.queue, {"job": waiting})
    for restart in range(8):
        dispatcher = Dispatcher(settings, store, RayJobs(settings.ray_jobs_url), name=f"dispatcher-{restart}")
        dispatcher.tick()
        assert dispatcher.waiting == {waiting: dispatcher.waiting[waiting]}, dispatcher.waiting
        time.sleep(0.03)  # silent past reclaim_after_s: the next one takes the message over
    pending = store.redis.xpending_range(store.keys.queue, GROUP, min="-", max="+", count=10)
    assert pending[0]["times_delivered"] >= 7
    assert store.get(waiting)["state"] == "queued"
    assert store.redis.xlen(store.keys.dead) == 0


def run_in_thread(dispatcher: Dispatcher) -> threading.Thread:
    thread = threading.Thread(target=dispatcher.run, daemon=True)
    thread.start()
    return thread


def test_the_dispatcher_survives_a_full_redis_and_goes_on_when_memory_frees(redis_server):
    """Redis past its maxmemory (for real: a filler key) refuses every write with OOM; the dispatcher used to exit on
    the first. Now it keeps retrying and, once memory frees, takes the job (here: tries to submit it to Ray)."""
    settings = dispatcher_settings(redis_server.url)
    store = BlockingJobStore.connect(redis_server.url)
    job_id = Jobs(store).create("acme")
    used = int(store.redis.info("memory")["used_memory"])
    for i in range(16):  # 4 MiB of data, then a limit 1 MiB above what Redis held before it: full, for real
        store.redis.set(f"filler:{i}", "x" * 256 * 1024)
    store.redis.config_set("maxmemory", used + 1024 * 1024)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        store.redis.set("one-more", "x")
    dispatcher = Dispatcher(settings, store, RayJobs(settings.ray_jobs_url), name="d-oom")
    thread = run_in_thread(dispatcher)
    try:
        time.sleep(1.0)
        assert thread.is_alive(), "the dispatcher exited on Redis's OOM error"
        assert store.get(job_id).get("attempts", "0") == "0"  # nothing could be written meanwhile
        store.redis.delete(*store.redis.keys("filler:*"))
        wait_until(lambda: int(store.get(job_id).get("attempts") or 0) >= 1, 40, "a submit attempt after the OOM")
        assert thread.is_alive()
    finally:
        dispatcher.stopped.set()
        thread.join(40)


def test_the_dispatcher_recreates_its_consumer_group_when_redis_comes_back_empty(redis_server):
    settings = dispatcher_settings(redis_server.url)
    store = BlockingJobStore.connect(redis_server.url)
    dispatcher = Dispatcher(settings, store, RayJobs(settings.ray_jobs_url), name="d-empty")
    thread = run_in_thread(dispatcher)
    try:
        wait_until(lambda: store.redis.exists(store.keys.queue), 10, "the consumer group")
        store.redis.flushall()  # a Redis restarted without its data
        job_id = Jobs(store).create("acme")
        wait_until(lambda: int((store.get(job_id) or {}).get("attempts") or 0) >= 1, 40,
                   "the job read through a new consumer group")
        assert thread.is_alive()
    finally:
        dispatcher.stopped.set()
        thread.join(40)
