"""Real services for the tests: redis-server, a Ray head with the Jobs API, the API under uvicorn
on loopback, and dispatcher processes. Each starts on free loopback ports and stops cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from service.serve import (child_env, forget_ray_head, free_port, head_flags, jobs_api_up, program, redis_command,
                           redis_up)

ROOT = Path(__file__).resolve().parent.parent


def wait_until(check, seconds: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"waited {seconds} s for {what}")


class RedisServer:
    """redis-server on loopback with AOF (fsync always) in `folder`; restartable on the same data."""

    def __init__(self, folder: Path, maxmemory: str = "1gb"):
        self.folder, self.port, self.maxmemory = folder, free_port(), maxmemory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        self.folder.mkdir(parents=True, exist_ok=True)
        binary = program("redis-server", "apt-get install redis-server")
        self.process = subprocess.Popen(redis_command(binary, self.port, self.folder, self.maxmemory),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_until(lambda: redis_up(self.port), 10, "redis-server")
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # SHUTDOWN: the AOF is flushed
            self.process.wait(10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


class RayHead:
    """`ray start --head --block` with the dashboard (Jobs API) on loopback; SIGTERM stops it all."""

    def __init__(self, cpus: int = 2):
        self.port, self.dashboard_port = free_port(), free_port()
        self.gcs = f"127.0.0.1:{self.port}"
        self.jobs_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.cpus = cpus
        self.process: subprocess.Popen | None = None

    def start(self) -> "RayHead":
        self.process = subprocess.Popen(
            [program("ray", "bash scripts/setup.sh"), "start", "--head", "--block", "--num-cpus", str(self.cpus), "--num-gpus", "0",
             *head_flags(self.port, self.dashboard_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
            env=child_env(RAY_USAGE_STATS_ENABLED="0"))
        def up() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError("ray start --head exited")
            return jobs_api_up(self.jobs_url)

        try:
            wait_until(up, 90, "the Ray head's Jobs API", interval=0.5)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, then after `grace_s` SIGKILL to the head's whole process group (its raylet, GCS and workers):
        `ray start --block` took 30 s here to stop a head that served the suite, for nothing a test reads."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(30)
            forget_ray_head(self.port)  # as `scdd serve` does: no record of a head that is gone


def stop_service_ray_jobs(jobs_url: str, since_ms: int) -> list[str]:
    """Stop the service's Ray jobs (metadata `scdd_job`) submitted to the head at `jobs_url` since `since_ms` and not
    ended: a test whose own Redis is gone leaves drivers that would wait minutes for it (SCDD_FINAL_RECORD_RETRY_S)
    while holding the shared head's CPUs. The submission ids stopped."""
    from ray.job_submission import JobSubmissionClient

    client, stopped = JobSubmissionClient(jobs_url), []
    for job in client.list_jobs():
        status = str(getattr(job.status, "value", job.status))
        if (job.metadata or {}).get("scdd_job") and (job.start_time or 0) >= since_ms and \
                status not in ("SUCCEEDED", "FAILED", "STOPPED"):
            client.stop_job(job.submission_id)
            stopped.append(job.submission_id)
    return stopped


class ApiServer:
    """The FastAPI app under uvicorn on loopback, in a thread of the test process."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> "ApiServer":
        self.thread.start()
        wait_until(lambda: self.server.started, 20, "uvicorn")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30,
                            headers={"Authorization": f"Bearer {key}"} if key else {})


def api_settings(redis_url: str, tmp_path: Path, **overrides):
    """Service settings for API tests: tenants acme and globex (keys key-acme, key-globex), artifacts
    under `tmp_path`, which is also a data root; no Ray."""
    from service.settings import Settings

    base = dict(redis_url=redis_url, ray_address=None, api_keys="acme=key-acme,globex=key-globex",
                api_keys_file=None, artifacts=str(tmp_path / "artifacts"),
                data_roots=f"/usr/share/datasets{os.pathsep}{tmp_path}", max_active_jobs=4, max_body_bytes=4096)
    return Settings(**{**base, **overrides})


class DispatcherProcess:
    """`python -m service.dispatcher` with the given environment; kill -9 is `kill()`."""

    def __init__(self, env: dict[str, str], log: Path):
        self.env, self.log = env, log
        self.process: subprocess.Popen | None = None

    def start(self) -> "DispatcherProcess":
        handle = open(self.log, "a")
        self.process = subprocess.Popen([sys.executable, "-m", "service.dispatcher"], cwd=ROOT,
                                        env=child_env(**self.env), stdout=handle, stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
