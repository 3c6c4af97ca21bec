"""The job service for `--minutes` under three well-behaved tenants and one abusive one, on a real local stack.

Starts its own redis-server (AOF, maxmemory `--redis-maxmemory`, noeviction), a Ray head (2 CPUs, Jobs
API), the API under uvicorn (one process) and one dispatcher (SCDD_MAX_RUNNING=2, retention
`--retention-s`), all on loopback, and stops them at the end, also on errors.

- Well-behaved tenants (alpha, beta, gamma; the first `--tenants` of them), each in a loop: submit a tiny
  real job (sre2l, 2 Fashion-MNIST classes, 1 iteration), follow it on one event stream and poll it every
  2 s until it ends, list its artifacts and download its manifest, wait `--pause` s.
- The abuser (mallory), all at once: keeps as many real jobs queued as its quota lets it (to hold the run
  slots), submits and cancels as fast as it can (the submission rate limit answers, then its storage bound,
  `--max-jobs-kept`, finished jobs included, until retention deletes them), holds as many event streams as it
  may and keeps asking for more, and sends oversized, too large and malformed requests.
- In the middle, Redis goes away for `--outage-s` (stopped, then started again on its append-only file, as a
  Redis pod restart does): answers during the outage (and 10 s after) are counted apart, and every
  well-behaved job must still succeed (its driver buffers its events, the dispatcher waits for Redis).

Every 30 s it samples Redis (memory used, keys, queue length) and prints a row; at the end a summary:
every answer's status per tenant, well-behaved GET latency, the time well-behaved jobs waited for a
slot (created -> dispatched) against the abuser's, and whether Redis memory stayed flat (its growth
from the sample at the retention time plus a minute to the last).

    python bench/soak.py [--minutes 10] [--retention-s 60] [--pause 5] [--redis-maxmemory 64mb] [--outage-s 60]
                         [--max-jobs-kept 40] [--tenants 3]
    python bench/soak.py --smoke   # seconds: 6 s of load, a 3 s outage, real tiny jobs of alpha and mallory, storage
                                   # bound 10; every criterion judged but Redis memory flat ("not judged (smoke)")
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from api_load import (exit_on_sigterm, percentile, processes_naming, ray_jobs_ended,  # noqa: E402
                      start_api, stop_process, stop_ray_head, tiny_spec)
from benchlib import apply_smoke  # noqa: E402
from service.records import Keys  # noqa: E402
from service.serve import ensure_ray_token  # noqa: E402
from tests.services import DispatcherProcess, RayHead, RedisServer, stop_service_ray_jobs, wait_until  # noqa: E402

GOOD = ("alpha", "beta", "gamma")
ABUSER = "mallory"
KEYS = {tenant: f"{tenant}-{secrets.token_hex(16)}" for tenant in (*GOOD, ABUSER)}
FINAL = {"succeeded", "failed", "cancelled"}
# --smoke: seconds, the same stack, abuser and outage with one well-behaved tenant (one round of 2 jobs on the 2 run
# slots, not two); the storage bound low enough for the abuser to reach it
SMOKE = {"minutes": 0.1, "pause": 0.5, "outage_s": 3.0, "max_jobs_kept": 10, "tenants": 1}


class Tally:
    """Every answer's status per tenant and operation, GET latencies, and the jobs seen."""

    def __init__(self):
        self.statuses: dict[str, Counter] = defaultdict(Counter)
        self.get_latencies: list[float] = []
        self.jobs: dict[str, list[dict]] = defaultdict(list)
        self.waits: dict[str, dict[str, float]] = defaultdict(dict)  # tenant -> job -> created..dispatched, s
        self.errors: list[str] = []
        self.outage: list[float] = []  # [start, end] of the Redis outage once it began

    def in_outage(self) -> bool:
        """Within the outage or the 10 s after it (clients reconnect, the API's pool refills)."""
        return bool(self.outage) and time.time() <= (self.outage[1] if len(self.outage) > 1 else float("inf")) + 10

    def note_dispatches(self, client: redis.Redis) -> None:
        """Read the dispatch time of every job seen and not yet dispatched (before retention deletes its record)."""
        for tenant, jobs in self.jobs.items():
            for job in jobs:
                if job["id"] not in self.waits[tenant]:
                    record = client.hmget(Keys().job(job["id"]), "created_at", "dispatched_at")
                    if record[1]:
                        self.waits[tenant][job["id"]] = float(record[1]) - float(record[0])

    def answer(self, tenant: str, operation: str, response: httpx.Response) -> httpx.Response:
        self.statuses[tenant][f"{operation} {response.status_code}{' outage' if self.in_outage() else ''}"] += 1
        return response

    async def ask(self, tenant: str, operation: str, request) -> httpx.Response | None:
        """`await request` counted; a transport error (the API restarting its Redis pool, a reset) is counted as
        status ERR and gives None."""
        try:
            return self.answer(tenant, operation, await request)
        except httpx.HTTPError as exc:
            self.statuses[tenant][f"{operation} ERR{' outage' if self.in_outage() else ''}"] += 1
            if not self.in_outage():
                self.errors.append(f"{tenant}: {operation}: {type(exc).__name__}: {exc}")
            return None


def http(url: str, tenant: str, connections: int = 4) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEYS[tenant]}"},
                             timeout=httpx.Timeout(30, read=60),
                             limits=httpx.Limits(max_connections=connections))


# -- the well-behaved ------------------------------------------------------------------------------
async def follow_events(client: httpx.AsyncClient, job_id: str, tally: Tally, tenant: str) -> int:
    events = 0
    with contextlib.suppress(httpx.HTTPError):  # a stream cut by the outage: the job is polled on
        async with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            tally.answer(tenant, "events", response)
            if response.status_code != 200:
                return 0
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    events += 1
    return events


async def well_behaved(url: str, tenant: str, deadline: float, pause: float, tally: Tally) -> None:
    async with http(url, tenant) as client:
        while time.time() < deadline:
            answer = await tally.ask(tenant, "submit", client.post("/v1/jobs", json=tiny_spec()))
            if answer is None or answer.status_code != 202:
                if not tally.in_outage():
                    tally.errors.append(f"{tenant}: submit {answer.status_code if answer else 'ERR'} "
                                        f"{answer.text[:200] if answer else ''}")
                await asyncio.sleep(pause)
                continue
            job_id = answer.json()["id"]
            stream = asyncio.create_task(follow_events(client, job_id, tally, tenant))
            while True:
                started = time.perf_counter()
                answer = await tally.ask(tenant, "get", client.get(f"/v1/jobs/{job_id}"))
                if answer is not None and answer.status_code == 200:
                    tally.get_latencies.append(time.perf_counter() - started)
                    if answer.json()["state"] in FINAL:
                        break
                await asyncio.sleep(2)
            job = answer.json()
            job["events"] = await asyncio.wait_for(stream, 90)
            tally.jobs[tenant].append(job)
            if job["state"] != "succeeded":
                tally.errors.append(f"{tenant}: job {job_id} {job['state']}: {job.get('error')}")
            listing = await tally.ask(tenant, "artifacts", client.get(f"/v1/jobs/{job_id}/artifacts"))
            if listing is not None and listing.status_code == 200:
                await tally.ask(tenant, "download", client.get(f"/v1/jobs/{job_id}/artifacts/manifest.json"))
            await asyncio.sleep(pause)


# -- the abuser ------------------------------------------------------------------------------------
async def hog_slots(client: httpx.AsyncClient, deadline: float, tally: Tally) -> None:
    """As many real jobs queued as the quota allows, all the time."""
    while time.time() < deadline:
        answer = await tally.ask(ABUSER, "submit-hog", client.post("/v1/jobs", json=tiny_spec()))
        if answer is not None and answer.status_code == 202:
            tally.jobs[ABUSER].append(answer.json())
        else:
            await asyncio.sleep(1)


async def churn(client: httpx.AsyncClient, deadline: float, tally: Tally) -> None:
    """Submit and cancel as fast as the service lets it."""
    while time.time() < deadline:
        answer = await tally.ask(ABUSER, "submit-churn", client.post("/v1/jobs", json=tiny_spec()))
        if answer is not None and answer.status_code == 429 and "SCDD_MAX_JOBS_KEPT" in answer.text:
            tally.statuses[ABUSER]["submit-churn 429 at its storage bound"] += 1
        if answer is not None and answer.status_code == 202:
            await tally.ask(ABUSER, "cancel", client.post(f"/v1/jobs/{answer.json()['id']}/cancel"))
        else:
            await asyncio.sleep(0.05)


async def hold_streams(url: str, deadline: float, tally: Tally) -> None:
    """Open streams on one of its queued jobs (they stay open) and keep asking for more."""
    async with http(url, ABUSER, connections=64) as client:
        job_id = None
        while job_id is None and time.time() < deadline:
            listing = await tally.ask(ABUSER, "list", client.get("/v1/jobs", params={"limit": 1, "state": "queued"}))
            jobs = listing.json()["jobs"] if listing is not None and listing.status_code == 200 else []
            job_id = jobs[0]["id"] if jobs else None
            await asyncio.sleep(1)
        held: list[httpx.Response] = []
        while time.time() < deadline:
            response = await tally.ask(ABUSER, "events", client.send(
                client.build_request("GET", f"/v1/jobs/{job_id}/events"), stream=True))
            if response is None:
                await asyncio.sleep(0.2)
                continue
            if response.status_code == 200:
                held.append(response)
                if len(held) > 40:  # its job ended and the streams with it: let go of the oldest
                    await held.pop(0).aclose()
            else:
                await response.aclose()
                await asyncio.sleep(0.2)
        for response in held:
            await response.aclose()


async def garbage(client: httpx.AsyncClient, deadline: float, tally: Tally) -> None:
    big = {**tiny_spec(), "recover": {"ipc": 10000, "iterations": 1000000}}
    while time.time() < deadline:
        await tally.ask(ABUSER, "oversized-body", client.post("/v1/jobs", content=b"{" + b" " * 100000 + b"}",
                                                              headers={"Content-Type": "application/json"}))
        await tally.ask(ABUSER, "over-budget", client.post("/v1/jobs", json=big))
        await tally.ask(ABUSER, "bad-path", client.post("/v1/jobs", json={
            **tiny_spec(), "dataset": {"root": "/etc", "classes": [0, 1]}}))
        await tally.ask(ABUSER, "not-json", client.post("/v1/jobs", content=b"\xff\xfe",
                                                        headers={"Content-Type": "application/json"}))
        await asyncio.sleep(0.5)


async def abuser(url: str, deadline: float, tally: Tally) -> None:
    async with http(url, ABUSER, connections=16) as client:
        await asyncio.gather(hog_slots(client, deadline, tally), churn(client, deadline, tally),
                             hold_streams(url, deadline, tally), garbage(client, deadline, tally))


# -- Redis samples ---------------------------------------------------------------------------------
async def sample_redis(redis_url: str, started: float, deadline: float, samples: list[dict], tally: Tally) -> None:
    client, keys = redis.Redis.from_url(redis_url, decode_responses=True), Keys()
    print("| minute | Redis used MiB | keys | queue length | finished jobs kept | expired so far | mallory's jobs stored |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    while True:
        try:
            sample = {"minute": (time.time() - started) / 60, "used": int(client.info("memory")["used_memory"]),
                      "keys": client.dbsize(), "queue": client.xlen(keys.queue),
                      "finished": client.zcard(keys.finished), "expired": client.zcard(keys.expired),
                      "mallory_kept": client.zcard(keys.tenant_jobs(ABUSER))}
            samples.append(sample)
            print(f"| {sample['minute']:.1f} | {sample['used'] / 2**20:.2f} | {sample['keys']} | {sample['queue']} | "
                  f"{sample['finished']} | {sample['expired']} | {sample['mallory_kept']} |", flush=True)
        except redis.RedisError:
            print(f"| {(time.time() - started) / 60:.1f} | Redis down | | | | | |", flush=True)
        for _ in range(6):  # every 5 s: a job's record lives at least retention (60 s) after it ends
            with contextlib.suppress(redis.RedisError):
                tally.note_dispatches(client)
            if time.time() >= deadline:
                return
            await asyncio.sleep(min(5, max(0.0, deadline - time.time())))


async def outage(redis_server: RedisServer, at: float, seconds: float, tally: Tally) -> None:
    """Stop Redis at `at` (SIGTERM: it flushes its append-only file) and start it again `seconds` later."""
    await asyncio.sleep(max(0.0, at - time.time()))
    tally.outage.append(time.time())
    print(f"-- Redis stopped for {seconds:g} s --", flush=True)
    await asyncio.to_thread(redis_server.stop)
    await asyncio.sleep(seconds)
    await asyncio.to_thread(redis_server.start)
    tally.outage.append(time.time())
    print(f"-- Redis back after {tally.outage[1] - tally.outage[0]:.0f} s --", flush=True)


async def soak(url: str, redis_server: RedisServer, args: argparse.Namespace, tally: Tally,
               samples: list[dict]) -> None:
    started = time.time()
    deadline = started + 60 * args.minutes
    redis_url = redis_server.url
    outages = [outage(redis_server, started + 30 * args.minutes, args.outage_s, tally)] if args.outage_s else []
    await asyncio.gather(*outages, sample_redis(redis_url, started, deadline + 5, samples, tally),
                         abuser(url, deadline, tally),
                         *(well_behaved(url, tenant, deadline, args.pause, tally) for tenant in GOOD[:args.tenants]))


# -- the summary -----------------------------------------------------------------------------------
def summarise(tally: Tally, samples: list[dict], retention_s: float, maxmemory: int, smoke: bool = False,
              good: tuple[str, ...] = GOOD) -> bool:
    print("\nanswers per tenant (operation status: count; 'outage': during the Redis outage or 10 s after it):")
    for tenant in (*good, ABUSER):
        print(f"- {tenant}: " + ", ".join(f"{key}: {n}" for key, n in sorted(tally.statuses[tenant].items())))
    def status(key: str) -> str:
        return key.split()[1]

    def normal(key: str) -> bool:
        return not key.endswith(" outage")

    good_5xx = sum(n for tenant in good for key, n in tally.statuses[tenant].items()
                   if normal(key) and status(key) >= "500")
    good_4xx = sum(n for tenant in good for key, n in tally.statuses[tenant].items()
                   if normal(key) and status(key)[0] == "4")
    outage_answers = sum(n for tenant in good for key, n in tally.statuses[tenant].items() if not normal(key))
    abuser_5xx = sum(n for key, n in tally.statuses[ABUSER].items() if normal(key) and status(key) >= "500")
    good_jobs = [job for tenant in good for job in tally.jobs[tenant]]
    good_waits = [w for tenant in good for w in tally.waits[tenant].values()]
    abuser_waits = list(tally.waits[ABUSER].values())
    succeeded = sum(job["state"] == "succeeded" for job in good_jobs)
    ran = [job["finished_at"] - job["dispatched_at"] for job in good_jobs if job.get("dispatched_at")]
    print(f"\nwell-behaved jobs: {succeeded} of {len(good_jobs)} succeeded; waited for a slot (created -> dispatched) "
          f"p50 {percentile(good_waits, 0.5):.1f} s, p99 {percentile(good_waits, 0.99):.1f} s, max "
          f"{max(good_waits, default=float('nan')):.1f} s; ran (dispatched -> finished) p50 {percentile(ran, 0.5):.1f} s")
    print("jobs dispatched per tenant: " + ", ".join(f"{t} {len(tally.waits[t])}" for t in (*good, ABUSER)))
    print(f"abuser's slot-holding jobs: {len(tally.jobs[ABUSER])} admitted, {len(abuser_waits)} dispatched; waited p50 "
          f"{percentile(abuser_waits, 0.5):.1f} s, max {max(abuser_waits, default=float('nan')):.1f} s (behind its own "
          "queue: first in first out within a tenant)")
    print(f"well-behaved GET /v1/jobs/{{id}}: {len(tally.get_latencies)} requests, p50 "
          f"{1000 * percentile(tally.get_latencies, 0.5):.1f} ms, p99 {1000 * percentile(tally.get_latencies, 0.99):.1f} ms")
    print(f"5xx outside the outage: well-behaved {good_5xx}, abuser {abuser_5xx}; well-behaved 4xx: {good_4xx}; "
          f"well-behaved answers during the outage (counted apart): {outage_answers}")
    if tally.outage:
        print(f"Redis outage: {tally.outage[-1] - tally.outage[0]:.0f} s; well-behaved jobs failed: "
              f"{sum(job['state'] != 'succeeded' for job in good_jobs)}")
    peak = max((s["used"] for s in samples), default=0)
    under = not maxmemory or peak < maxmemory
    print(f"Redis peak {peak / 2**20:.2f} MiB of maxmemory {maxmemory / 2**20:.0f} MiB: "
          f"{'under' if under else 'REACHED'}; mallory's jobs stored at most "
          f"{max((s.get('mallory_kept', 0) for s in samples), default=0)}, refused at its storage bound "
          f"{tally.statuses[ABUSER]['submit-churn 429 at its storage bound']} times")
    settled = [s for s in samples if s["minute"] * 60 >= retention_s + 60]
    flat = True
    if smoke:
        print("Redis memory flat (retention + 1 min to the end): not judged (smoke)")
    elif len(settled) >= 2:
        growth = settled[-1]["used"] - settled[0]["used"]
        flat = growth < 0.25 * settled[0]["used"]
        print(f"Redis memory from minute {settled[0]['minute']:.1f} to {settled[-1]['minute']:.1f}: "
              f"{settled[0]['used'] / 2**20:.2f} -> {settled[-1]['used'] / 2**20:.2f} MiB ({growth / 2**20:+.2f} MiB); "
              f"peak {max(s['used'] for s in samples) / 2**20:.2f} MiB")
    for error in tally.errors[:20]:
        print(f"error: {error}")
    return good_5xx == 0 and good_4xx == 0 and succeeded == len(good_jobs) > 0 and flat and under


def stop_ray_jobs(jobs_url: str) -> None:
    """On every way out (an error, SIGTERM too), once the dispatcher is stopped: stop the jobs Ray still runs and wait
    until Ray has ended them; their drivers would outlive the head (retrying a Redis that is gone, for minutes)."""
    with contextlib.suppress(Exception):
        stopped = stop_service_ray_jobs(jobs_url, 0)
        wait_until(lambda: ray_jobs_ended(jobs_url, stopped), 30, "Ray to end the stopped jobs", interval=0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--retention-s", type=float, default=60, help="SCDD_RETENTION_DAYS, in seconds")
    parser.add_argument("--pause", type=float, default=5, help="seconds a well-behaved tenant waits between jobs")
    parser.add_argument("--redis-maxmemory", default="64mb")
    parser.add_argument("--outage-s", type=float, default=60, help="Redis stopped this long mid-run (0: no outage)")
    parser.add_argument("--max-jobs-kept", type=int, default=40,
                        help="SCDD_MAX_JOBS_KEPT: the abuser reaches it (20 active + a minute of churn at 60 a minute, kept for "
                        "the retention of 60 s) while a well-behaved tenant keeps at most a few")
    parser.add_argument("--tenants", type=int, default=len(GOOD), choices=range(1, len(GOOD) + 1),
                        help=f"well-behaved tenants, of {', '.join(GOOD)}")
    parser.add_argument("--smoke", action="store_true", help="seconds: " + ", ".join(
        f"--{dest.replace('_', '-')} {value:g}" for dest, value in SMOKE.items()) + " unless given; Redis memory "
        "flat is not judged")
    args = parser.parse_args()
    if args.smoke:
        apply_smoke(parser, args, SMOKE)
    exit_on_sigterm()
    os.chdir(ROOT)  # Ray job drivers run `python -m service.entrypoint` in the head's working folder
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    print(f"machine: {os.cpu_count()} CPUs; the clients, API, Redis, dispatcher and Ray share them. "
          f"{args.minutes:g} minutes, retention {args.retention_s:g} s, Redis maxmemory {args.redis_maxmemory}\n")
    tmp = Path(tempfile.mkdtemp(prefix="scdd-soak-"))
    ensure_ray_token(tmp)  # a fresh machine has none: one for this run's head, dispatcher and clients
    tally, samples = Tally(), []
    try:
        with contextlib.ExitStack() as stack:
            redis_server = RedisServer(tmp / "redis", maxmemory=args.redis_maxmemory).start()
            stack.callback(redis_server.stop)
            head = RayHead(cpus=2)
            stack.callback(stop_ray_head, head)
            head.start()
            settings = {"SCDD_API_KEYS": ",".join(f"{t}={k}" for t, k in KEYS.items()), "SCDD_MAX_ACTIVE_JOBS": "20",
                        "SCDD_SUBMIT_RATE": "60", "SCDD_SUBMIT_BURST": "10", "SCDD_MAX_STREAMS_PER_TENANT": "20",
                        "SCDD_READ_RATE": "3000", "SCDD_READ_BURST": "500",  # the defaults (api_load turns it off)
                        "SCDD_MAX_JOBS_KEPT": str(args.max_jobs_kept)}
            api, url = start_api(redis_server.url, head.jobs_url, tmp / "artifacts", tmp / "api.log", **settings)
            stack.callback(stop_process, api)
            stack.callback(stop_ray_jobs, head.jobs_url)
            dispatcher = DispatcherProcess({"REDIS_URL": redis_server.url, "RAY_ADDRESS": head.jobs_url,
                                            "SCDD_MAX_RUNNING": "2", "SCDD_POLL_S": "0.5", "SCDD_CANCEL_GRACE_S": "5",
                                            "SCDD_RETENTION_DAYS": f"{args.retention_s / 86400:.8f}"},
                                           tmp / "dispatcher.log").start()
            stack.callback(dispatcher.stop)
            asyncio.run(soak(url, redis_server, args, tally, samples))
            maxmemory = int(redis.Redis.from_url(redis_server.url).config_get("maxmemory")["maxmemory"])
            ok = summarise(tally, samples, args.retention_s, maxmemory, args.smoke, GOOD[:args.tenants])
            # the abuser's jobs still queued: cancel them, so Ray is idle before the stack stops
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEYS[ABUSER]}"}) as client:
                for job in tally.jobs[ABUSER]:
                    client.post(f"/v1/jobs/{job['id']}/cancel")
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: not processes_naming([job["id"] for job in tally.jobs[ABUSER]]), 60,
                           "the abuser's job drivers to exit", interval=0.5)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nverdict: {'PASS' if ok else 'FAIL'} (no 5xx or 4xx for the well-behaved outside the Redis outage, all "
          "their jobs succeeded through it, Redis memory "
          f"{'under maxmemory; flat: not judged (smoke)' if args.smoke else 'flat and under maxmemory'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
