"""The job API under concurrent load, and the dispatcher's dispatch rate, on a real local stack.

Starts its own stack on free loopback ports: redis-server (AOF, fsync always), a Ray head (2 CPUs,
Jobs API), the API under uvicorn in a separate process (one worker, access log off) and, for the
dispatch part, a dispatcher process. Everything it started is stopped at the end, also on errors.

1. Load. `--concurrency` clients (asyncio tasks, one httpx connection each) share `--requests`
   requests per operation: POST /v1/jobs (a tiny valid spec; every job stays queued, no dispatcher
   runs yet), GET /v1/jobs/{id} (the jobs just made, in random order), and POST
   /v1/jobs/{id}/cancel (cancels them all). Latency is measured per request at the client, from
   sending to the whole answer read; req/s is the requests over the wall time of the phase. The
   client runs on the same machine as the server, so both share its CPUs.
2. Dispatch. A dispatcher starts with SCDD_MAX_RUNNING = `--dispatch-jobs`, its consumer group
   at the end of the queue (the load phase's cancelled jobs are not in its way). One warm-up job
   is dispatched and cancelled (the first Ray submit imports the Ray client), then `--dispatch-jobs`
   tiny jobs are submitted at once; each job's record gives `dispatched_at - created_at`, and
   the rate is jobs over (last dispatched_at - first created_at). Then every job is cancelled, and
   the script waits until Ray reports each Ray job ended before it stops the stack.

    python bench/api_load.py [--requests 2000] [--concurrency 100] [--dispatch-jobs 8]
    python bench/api_load.py --smoke   # seconds, both phases: 40 requests, 8 clients, 2 dispatch jobs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.records import GROUP, Keys
from service.serve import ensure_ray_token
from tests.services import DispatcherProcess, RayHead, RedisServer, free_port, wait_until

from benchlib import apply_smoke  # bench/benchlib.py

KEY = os.environ.get("SCDD_BENCH_KEY") or f"bench-{secrets.token_hex(16)}"  # a child process gets its parent's
FINAL = {"succeeded", "failed", "cancelled"}
RAY_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
SMOKE = {"requests": 40, "concurrency": 8, "dispatch_jobs": 2}  # --smoke: seconds, the same code paths


def tiny_spec() -> dict:
    """A job that does next to nothing: sre2l on 2 Fashion-MNIST classes, 20 images, 1 epoch, 1 step."""
    return {
        "method": "sre2l",
        "dataset": {"root": FASHION_MNIST, "classes": [0, 1], "train_limit": 20},
        "teacher": {"epochs": 1},
        "recover": {"ipc": 1, "iterations": 1},
        "validate": {"enabled": False},
        "resources": {"device": "cpu", "amp": "off", "compile": "off", "channels_last": "off"},
    }


# -- the stack -------------------------------------------------------------------------------------
def stop_process(process: subprocess.Popen, seconds: float = 20) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def start_api(redis_url: str, jobs_url: str, artifacts: Path, log: Path,
              **settings: str) -> tuple[subprocess.Popen, str]:
    """The API under uvicorn (one process) with tenant `bench` (KEY); `settings` are SCDD_* variables that
    replace this benchmark's (no job quota, no submit or read rate limit: one tenant here is the load of many)."""
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "RAY_ADDRESS": jobs_url, "SCDD_API_KEYS": f"bench={KEY}",
           "SCDD_ARTIFACTS": str(artifacts), "SCDD_MAX_ACTIVE_JOBS": str(10**9), "SCDD_SUBMIT_RATE": "0",
           "SCDD_READ_RATE": "0", **settings}
    env.pop("SCDD_API_KEYS_FILE", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "service.api.main:create_app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--no-access-log", "--backlog", "4096"],
        cwd=ROOT, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"the API exited with code {process.returncode}; see {log}")
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 30, "the API")
    except BaseException:
        stop_process(process)
        raise
    return process, url


def start_dispatcher_at_queue_end(redis_url: str, jobs_url: str, max_running: int, log: Path) -> DispatcherProcess:
    """The consumer group starts after every message already queued (the load phase's cancelled jobs)."""
    client = redis.Redis.from_url(redis_url)
    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: a group exists already
        client.xgroup_create(Keys().queue, GROUP, id="$", mkstream=True)
    env = {"REDIS_URL": redis_url, "RAY_ADDRESS": jobs_url, "SCDD_MAX_RUNNING": str(max_running),
           "SCDD_CANCEL_GRACE_S": "2"}
    return DispatcherProcess(env, log).start()


def stop_ray_head(head: RayHead) -> None:
    """SIGTERM to `ray start --block`, then make sure nothing of its process group is left."""
    if head.process is None:
        return
    group = head.process.pid
    head.stop()
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not process_group_alive(group), 20, "the Ray head's processes to exit", interval=0.2)
    if process_group_alive(group):
        print(f"warning: processes of the Ray head's group {group} outlived it; killing them", file=sys.stderr)
        os.killpg(group, signal.SIGKILL)


def process_group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


def processes_naming(words: list[str]) -> list[str]:
    """Command lines of live processes that mention any of `words` (job ids): leftover job drivers."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if any(word in cmdline for word in words):
                    found.append(f"{entry.name}: {cmdline.strip()}")
    return found


def exit_on_sigterm() -> None:
    """SIGTERM (`kill`, a CI job's timeout) ends the run as Ctrl-C does, through the clean-up that stops what it
    started; Python's default ends it at once and leaves redis-server, the API and the Ray head running."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-quantile of `values` (nan when there are none)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else float("nan")


# -- load ------------------------------------------------------------------------------------------
Call = tuple[str, str, Any]  # method, path, JSON body or None


@dataclass
class Phase:
    operation: str
    latencies: list[float]
    wall: float
    answers: list[httpx.Response]
    concurrency: int

    def percentile(self, q: float) -> float:
        return percentile(self.latencies, q)

    def row(self) -> str:
        n = len(self.latencies)
        return (f"| {self.operation} | {n} | {self.concurrency} | {1000 * self.percentile(0.50):.1f} | "
                f"{1000 * self.percentile(0.99):.1f} | {n / self.wall:.0f} |")


def client(url: str, connections: int = 1) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                             limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))


async def run_load(url: str, operation: str, calls: list[Call], concurrency: int) -> Phase:
    """`concurrency` clients, each with its own connection (opened before the clock starts), take
    calls from one list until it is empty."""
    pending = iter(calls)
    latencies: list[float] = []
    answers: list[httpx.Response] = []
    connected, go = asyncio.Barrier(concurrency + 1), asyncio.Event()

    async def one_client() -> None:
        async with client(url) as http:
            await http.get("/healthz")
            await connected.wait()
            await go.wait()
            for method, path, body in pending:
                started = time.perf_counter()
                answer = await http.request(method, path, json=body)
                latencies.append(time.perf_counter() - started)
                answers.append(answer)

    clients = [asyncio.create_task(one_client()) for _ in range(concurrency)]
    await connected.wait()
    started = time.perf_counter()
    go.set()
    await asyncio.gather(*clients)
    return Phase(operation, latencies, time.perf_counter() - started, answers, concurrency)


def expect(phase: Phase, status: int) -> None:
    wrong = [answer for answer in phase.answers if answer.status_code != status]
    if wrong:
        raise RuntimeError(f"{phase.operation}: {len(wrong)} of {len(phase.answers)} answers were not {status}; "
                           f"first: {wrong[0].status_code} {wrong[0].text[:300]}")


async def load(url: str, requests: int, concurrency: int) -> list[Phase]:
    async with client(url) as http:  # warm-up: connections, imports, Lua scripts loaded
        for _ in range(20):
            job = (await http.post("/v1/jobs", json=tiny_spec())).json()
            await http.get(f"/v1/jobs/{job['id']}")
            await http.post(f"/v1/jobs/{job['id']}/cancel")
    submit = await run_load(url, "POST /v1/jobs", [("POST", "/v1/jobs", tiny_spec())] * requests, concurrency)
    expect(submit, 202)
    ids = [answer.json()["id"] for answer in submit.answers]
    reads = [("GET", f"/v1/jobs/{job_id}", None) for job_id in random.Random(0).choices(ids, k=requests)]
    read = await run_load(url, "GET /v1/jobs/{id}", reads, concurrency)
    expect(read, 200)
    cancels = [("POST", f"/v1/jobs/{job_id}/cancel", None) for job_id in ids]
    cancel = await run_load(url, "POST /v1/jobs/{id}/cancel", cancels, concurrency)
    expect(cancel, 202)
    return [submit, read, cancel]


# -- dispatch --------------------------------------------------------------------------------------
async def poll(check: Callable[[], Awaitable[Any]], seconds: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(interval)
    raise TimeoutError(f"waited {seconds} s for {what}")


async def records(http: httpx.AsyncClient, ids: list[str]) -> list[dict]:
    return [answer.json() for answer in await asyncio.gather(*(http.get(f"/v1/jobs/{job_id}") for job_id in ids))]


async def wait_dispatched(http: httpx.AsyncClient, ids: list[str], seconds: float = 120) -> list[dict]:
    async def all_dispatched() -> list[dict] | None:
        found = await records(http, ids)
        failed = [job for job in found if job["dispatched_at"] is None and job["state"] in FINAL]
        if failed:
            raise RuntimeError(f"job {failed[0]['id']} ended undispatched: {failed[0]['error']}")
        return found if all(job["dispatched_at"] is not None for job in found) else None

    return await poll(all_dispatched, seconds, f"{len(ids)} jobs to be dispatched")


async def cancel_all(http: httpx.AsyncClient, ids: list[str], seconds: float = 120) -> None:
    await asyncio.gather(*(http.post(f"/v1/jobs/{job_id}/cancel") for job_id in ids))

    async def all_final() -> bool:
        return all(job["state"] in FINAL for job in await records(http, ids))

    await poll(all_final, seconds, "every job to end after its cancel", interval=0.2)


async def submit(http: httpx.AsyncClient, n: int) -> list[str]:
    answers = await asyncio.gather(*(http.post("/v1/jobs", json=tiny_spec()) for _ in range(n)))
    return [answer.json()["id"] for answer in answers]


async def dispatch(url: str, n: int, submitted: list[str]) -> tuple[dict, list[dict]]:
    """(the warm-up job's record, the records of the `n` jobs once all are dispatched)."""
    async with client(url, connections=max(n, 1)) as http:
        warm = await submit(http, 1)
        submitted += warm
        cold = (await wait_dispatched(http, warm))[0]
        await cancel_all(http, warm)
        ids = await submit(http, n)
        submitted += ids
        return cold, await wait_dispatched(http, ids)


def ray_jobs_ended(jobs_url: str, ids: list[str]) -> bool:
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(jobs_url).list_jobs()
    statuses = {job.submission_id: str(getattr(job.status, "value", job.status)) for job in jobs}
    return all(statuses.get(job_id, "SUCCEEDED") in RAY_TERMINAL for job_id in ids)  # unknown: never submitted


# -- report ----------------------------------------------------------------------------------------
def print_load(phases: list[Phase]) -> None:
    print("| operation | requests | concurrency | p50 ms | p99 ms | req/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for phase in phases:
        print(phase.row())


def print_dispatch(cold: dict, jobs: list[dict], max_running: int) -> None:
    delays = sorted(job["dispatched_at"] - job["created_at"] for job in jobs)
    span = max(job["dispatched_at"] for job in jobs) - min(job["created_at"] for job in jobs)
    print(f"\ndispatch ({len(jobs)} jobs submitted at once, SCDD_MAX_RUNNING={max_running}, Ray head with 2 CPUs):")
    print(f"- submit -> dispatched: median {1000 * delays[len(delays) // 2]:.0f} ms, "
          f"min {1000 * delays[0]:.0f} ms, max {1000 * delays[-1]:.0f} ms")
    print(f"- dispatch rate: {len(jobs) / span:.1f} jobs/s ({len(jobs)} jobs in {span:.2f} s)")
    print(f"- first dispatch after the dispatcher started (cold): "
          f"{1000 * (cold['dispatched_at'] - cold['created_at']):.0f} ms")


# -- main ------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, stack: contextlib.ExitStack, tmp: Path) -> None:
    started = time.perf_counter()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start; "
          "client, API, Redis and Ray share them\n")
    redis_server = RedisServer(tmp / "redis").start()
    stack.callback(redis_server.stop)
    head = RayHead(cpus=2)
    stack.callback(stop_ray_head, head)
    head.start()
    api, url = start_api(redis_server.url, head.jobs_url, tmp / "artifacts", tmp / "api.log")
    stack.callback(stop_process, api)
    print(f"stack up in {time.perf_counter() - started:.1f} s\n", file=sys.stderr)

    phases = asyncio.run(load(url, args.requests, args.concurrency))
    print_load(phases)

    dispatcher = start_dispatcher_at_queue_end(redis_server.url, head.jobs_url, args.dispatch_jobs,
                                               tmp / "dispatcher.log")
    submitted: list[str] = []

    def clean_up() -> None:
        with contextlib.suppress(Exception):
            asyncio.run(cancel_jobs(url, submitted))
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: ray_jobs_ended(head.jobs_url, submitted), 60, "Ray to end every job", interval=0.5)
        dispatcher.stop()

    stack.callback(clean_up)
    cold, jobs = asyncio.run(dispatch(url, args.dispatch_jobs, submitted))
    print_dispatch(cold, jobs, args.dispatch_jobs)
    stack.close()
    leftovers = processes_naming(submitted) + [f"{p.pid}: the API" for p in (api,) if p.poll() is None]
    print(f"\nleftover processes: {leftovers or 'none'}; whole run {time.perf_counter() - started:.0f} s")


async def cancel_jobs(url: str, ids: list[str]) -> None:
    async with client(url, connections=16) as http:
        await cancel_all(http, ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per load operation")
    parser.add_argument("--concurrency", type=int, default=100, help="concurrent clients")
    parser.add_argument("--dispatch-jobs", type=int, default=8, help="jobs submitted at once for the dispatch rate")
    parser.add_argument("--smoke", action="store_true", help="seconds, both phases: " + ", ".join(
        f"--{dest.replace('_', '-')} {value}" for dest, value in SMOKE.items()) + " unless given")
    args = parser.parse_args()
    if args.smoke:
        apply_smoke(parser, args, SMOKE)
    exit_on_sigterm()
    os.chdir(ROOT)  # Ray job drivers run `python -m service.entrypoint` in the head's working folder
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # `ray start` turns token auth on; Jobs API clients must send it
    tmp = Path(tempfile.mkdtemp(prefix="api-load-"))
    ensure_ray_token(tmp)  # a fresh machine has none: one for this run's head, dispatcher and clients
    try:
        with contextlib.ExitStack() as stack:
            run(args, stack, tmp)
    except BaseException:
        print(f"failed; the logs are kept in {tmp}", file=sys.stderr)
        raise
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
