"""Many open event streams on one API process, and what they cost everyone else.

Starts its own redis-server and the API under uvicorn (one worker, a separate process) on loopback; no
Ray (the jobs stay queued, events are written straight into their streams as a job's driver does).
A second process holds `--streams` Server-Sent-Event streams open (one httpx connection each, spread
over `--jobs` jobs of one tenant) and counts the events each receives; this process measures
`GET /v1/jobs/{id}` from one client (sequential requests, latency from sending to the whole answer):

1. without streams,
2. with every stream open and quiet (keep-alives only),
3. with every stream open while `--rate` events per second go into each job's stream for `--seconds`.

It then checks that every stream got every event, and prints the table (and how many Redis connections
were blocked in XREAD while the streams were open: one per API process, the event hub's).

    python bench/sse_load.py [--streams 1000] [--jobs 1] [--rate 5] [--seconds 20] [--requests 500]
    python bench/sse_load.py --smoke   # seconds, every check: 20 streams, 2 s of events, 20 requests per probe
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from api_load import KEY, exit_on_sigterm, percentile, start_api, stop_process  # noqa: E402
from benchlib import apply_smoke  # noqa: E402
from service.records import Keys  # noqa: E402
from tests.services import RedisServer  # noqa: E402

SPEC = {"method": "sre2l", "dataset": {"classes": [0, 1]}, "recover": {"ipc": 1, "iterations": 2},
        "resources": {"device": "cpu"}}
SMOKE = {"streams": 20, "seconds": 2.0, "requests": 20}  # --smoke: seconds, the same code paths and checks


# -- the stream holder (a process of its own) -------------------------------------------------------
async def hold(url: str, jobs: list[str], streams: int) -> None:
    """Open `streams` streams, say 'ready' on stdout, count events until SIGTERM, then print the counts."""
    counts = [0] * streams
    statuses: list[int] = [0] * streams
    opened = asyncio.Semaphore(50)  # connect 50 at a time (the listen backlog)
    ready = 0
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, limits=limits,
                                 timeout=httpx.Timeout(60, read=None)) as client:

        async def one(n: int) -> None:
            nonlocal ready
            async with opened:
                response = await client.send(client.build_request("GET", f"/v1/jobs/{jobs[n % len(jobs)]}/events"),
                                             stream=True)
            statuses[n] = response.status_code
            ready += 1
            try:
                async for line in response.aiter_lines():
                    if line.startswith("event: progress"):
                        counts[n] += 1
            finally:
                await response.aclose()

        tasks = [asyncio.create_task(one(n)) for n in range(streams)]
        while ready < streams:
            await asyncio.sleep(0.1)
        print(json.dumps({"ready": streams, "statuses": sorted(set(statuses))}), flush=True)
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({"counts": counts}), flush=True)


# -- this process ----------------------------------------------------------------------------------
def probe(url: str, job_id: str, requests: int) -> list[float]:
    latencies = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
        client.get(f"/v1/jobs/{job_id}")
        for _ in range(requests):
            started = time.perf_counter()
            answer = client.get(f"/v1/jobs/{job_id}")
            latencies.append(time.perf_counter() - started)
            assert answer.status_code == 200, answer.text
    return latencies


def write_events(redis_url: str, jobs: list[str], rate: float, seconds: float) -> int:
    """`rate` progress events a second into each job's stream, for `seconds` (in a thread)."""
    client, keys, sent = redis.Redis.from_url(redis_url), Keys(), 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for job_id in jobs:
            client.xadd(keys.events(job_id), {"type": "progress", "data": json.dumps({"type": "progress", "n": sent})})
        sent += 1
        time.sleep(max(0.0, start + sent / rate - time.perf_counter()))
    return sent


def row(name: str, latencies: list[float]) -> str:
    return f"| {name} | {len(latencies)} | {1000 * percentile(latencies, 0.5):.1f} | {1000 * percentile(latencies, 0.99):.1f} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--rate", type=float, default=5.0, help="events per second into each job's stream")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--smoke", action="store_true", help="seconds, every check: " + ", ".join(
        f"--{dest} {value:g}" for dest, value in SMOKE.items()) + " unless given")
    parser.add_argument("--hold", nargs=2, metavar=("URL", "JOBS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold:
        asyncio.run(hold(args.hold[0], args.hold[1].split(","), args.streams))
        return 0
    if args.smoke:
        apply_smoke(parser, args, SMOKE)
    exit_on_sigterm()

    with tempfile.TemporaryDirectory(prefix="scdd-sse-") as tmp:
        redis_server = RedisServer(Path(tmp) / "redis").start()
        bound = str(args.streams + 10)
        api = holder = None
        try:
            api, url = start_api(redis_server.url, "", Path(tmp) / "artifacts", Path(tmp) / "api.log",
                                 SCDD_MAX_STREAMS_PER_TENANT=bound, SCDD_MAX_STREAMS_PER_PROCESS=bound)
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
                jobs = [client.post("/v1/jobs", json=SPEC).json()["id"] for _ in range(args.jobs)]
            quiet = probe(url, jobs[0], args.requests)
            started = time.perf_counter()
            holder = subprocess.Popen([sys.executable, __file__, "--streams", str(args.streams), "--hold", url,
                                       ",".join(jobs)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                      env={**os.environ, "SCDD_BENCH_KEY": KEY})
            opened = json.loads(holder.stdout.readline())
            open_s = time.perf_counter() - started
            blocked = int(redis.Redis.from_url(redis_server.url).info("clients")["blocked_clients"])
            idle = probe(url, jobs[0], args.requests)
            busy: list[float] = []
            sent_box: list[int] = []
            import threading

            writer = threading.Thread(target=lambda: sent_box.append(
                write_events(redis_server.url, jobs, args.rate, args.seconds)))
            writer.start()
            while writer.is_alive():
                busy += probe(url, jobs[0], 50)
            writer.join()
            time.sleep(2)  # the last events reach every stream
            holder.send_signal(signal.SIGTERM)
            counts = json.loads(holder.stdout.readline())["counts"]
            holder.wait(30)
            sent = sent_box[0]
        finally:
            if holder and holder.poll() is None:
                holder.kill()
                holder.wait(10)
            if api:
                stop_process(api)
            redis_server.stop()
    complete = sum(1 for count in counts if count == sent)
    print(f"{args.streams} streams on {args.jobs} job(s): all opened in {open_s:.1f} s with statuses "
          f"{opened['statuses']}; Redis connections blocked in XREAD while open: {blocked}")
    print(f"{sent} events into each job's stream at {args.rate:g}/s: {complete} of {len(counts)} streams got every one "
          f"(fewest {min(counts)}, most {max(counts)})")
    print()
    print("| GET /v1/jobs/{id} | requests | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|")
    print(row("no streams", quiet))
    print(row(f"{args.streams} streams open, quiet", idle))
    print(row(f"{args.streams} streams open, {args.rate:g} events/s each", busy))
    return 0 if complete == len(counts) and opened["statuses"] == [200] else 1


if __name__ == "__main__":
    sys.exit(main())
