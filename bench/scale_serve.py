"""bench/scale.py --serve: the rehearsal's largest job through `scdd serve`, and its artifacts through the API.

Starts `scdd serve` on a fresh data folder (its own redis-server and Ray head on this machine; SCDD_DATA_ROOTS the
synthetic dataset's folder), submits the job of bench/scale.py (without `output`: the service chooses it) over
HTTP, waits for it, and then measures what a user fetching a 50 000-image result meets:

- the artifact listing, page by page (`GET /v1/jobs/{id}/artifacts?limit=N&cursor=`, every page of the job) and
  one class's page (`prefix=images/<class>/`): seconds per request, p50 / p99 / max;
- the archive (`GET /v1/jobs/{id}/archive`) read to the end: bytes, entries, MB/s;
- the API process's resident memory (the `scdd serve` process runs uvicorn), sampled every 0.1 s before and
  while the archive streams: its peak against its level before.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

MIB = 2**20
TERMINAL = ("succeeded", "failed", "cancelled")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_of(pid: int) -> int:
    """Resident memory of a process in bytes (Linux: /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class RssPeak:
    """The peak resident memory of one process while the block runs, sampled every `interval` s."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval = pid, interval
        self.before = self.peak = rss_of(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_of(self.pid))

    def __enter__(self) -> "RssPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_of(self.pid))


def percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"pages": len(ordered), "p50_ms": round(1000 * statistics.median(ordered), 1),
            "p99_ms": round(1000 * p99, 1), "max_ms": round(1000 * ordered[-1], 1)}


def list_all(client: Any, job_id: str, limit: int, prefix: str | None = None) -> tuple[int, list[float]]:
    """Every page of the job's listing: (files, seconds per request)."""
    files, times, cursor = 0, [], None
    while True:
        params = {"limit": limit, **({"cursor": cursor} if cursor else {}), **({"prefix": prefix} if prefix else {})}
        started = time.perf_counter()
        answer = client.get(f"/v1/jobs/{job_id}/artifacts", params=params)
        times.append(time.perf_counter() - started)
        answer.raise_for_status()
        page = answer.json()
        files += len(page["files"])
        cursor = page.get("next_cursor")
        if not cursor:
            return files, times


def stream_archive(client: Any, job_id: str, serve_pid: int) -> dict:
    """The archive read to the end (nothing kept), with the API process's memory while it streams."""
    started = time.perf_counter()
    size = 0
    with RssPeak(serve_pid) as rss, client.stream("GET", f"/v1/jobs/{job_id}/archive", timeout=600) as answer:
        answer.raise_for_status()
        for block in answer.iter_bytes(1 << 20):
            size += len(block)
    seconds = time.perf_counter() - started
    return {"bytes": size, "seconds": round(seconds, 2), "mb_per_s": round(size / 1e6 / seconds, 1),
            "api_rss_before_mib": round(rss.before / MIB, 1), "api_rss_peak_mib": round(rss.peak / MIB, 1),
            "api_rss_growth_mib": round((rss.peak - rss.before) / MIB, 1)}


def run_through_serve(args: argparse.Namespace, data: dict, ipc: int, work: Path, spec: dict, first_class: str) -> dict:
    """Submit `spec` to a fresh `scdd serve`, wait for it, then measure the artifact routes (`first_class`: the
    folder of the class whose listing is timed alone)."""
    import httpx

    folder = work / f"serve-ipc{ipc}"
    shutil.rmtree(folder, ignore_errors=True)
    port = _free_port()
    env = {**os.environ, "SCDD_DATA_ROOTS": str(Path(data["root"]).parent), "SCDD_MAX_RUNNING": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("RAY_ADDRESS", None)
    env.pop("REDIS_URL", None)
    folder.mkdir(parents=True)
    log = open(folder / "serve.log", "w")
    serve = subprocess.Popen([sys.executable, "-m", "scdd_cli", "serve", "--data-dir", str(folder), "--port",
                              str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if serve.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"scdd serve did not become ready; see {folder / 'serve.log'}")
            time.sleep(0.5)
        key = (folder / "api-key").read_text().strip()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
            submitted = time.perf_counter()
            answer = client.post("/v1/jobs", json={k: v for k, v in spec.items() if k != "output"})
            if answer.status_code != 202:
                raise SystemExit(f"the service refused the job: {answer.status_code} {answer.text}")
            job_id = answer.json()["id"]
            print(f"IPC {ipc} through scdd serve: job {job_id}", file=sys.stderr, flush=True)
            while (job := client.get(f"/v1/jobs/{job_id}").json())["state"] not in TERMINAL:
                time.sleep(2)
            wall = time.perf_counter() - submitted
            if job["state"] != "succeeded":
                raise SystemExit(f"job {job_id} {job['state']}: {job.get('error')}")
            files, times = list_all(client, job_id, args.page)
            class_files, class_times = list_all(client, job_id, args.page, prefix=f"images/{first_class}/")
            class_listing = {"files": class_files, **percentiles(class_times)}
            archive = stream_archive(client, job_id, serve.pid)
        return {"ipc": ipc, "job": job_id, "job_seconds": round(wall, 1), "summary": job.get("summary"),
                "listing": {"files": files, "limit": args.page, **percentiles(times)},
                "class_listing": class_listing, "archive": archive}
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
        log.close()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def print_serve(record: dict) -> None:
    listing, archive = record["listing"], record["archive"]
    print(f"\nIPC {record['ipc']} through scdd serve: job {record['job_seconds']:.0f} s")
    print(f"  listing  {listing['files']:,} files in {listing['pages']} pages of {listing['limit']}: "
          f"p50 {listing['p50_ms']} ms, p99 {listing['p99_ms']} ms, max {listing['max_ms']} ms")
    if record.get("class_listing"):
        one = record["class_listing"]
        print(f"  one class ({one['files']} files): p50 {one['p50_ms']} ms, max {one['max_ms']} ms")
    print(f"  archive  {archive['bytes'] / 1e6:.1f} MB in {archive['seconds']} s ({archive['mb_per_s']} MB/s); API "
          f"RSS {archive['api_rss_before_mib']} -> peak {archive['api_rss_peak_mib']} MiB "
          f"(+{archive['api_rss_growth_mib']} MiB)")
