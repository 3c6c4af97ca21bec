"""`scdd serve` from nothing: it starts its own redis-server and Ray head, serves a job, stops
everything it started, and a second start on the same data folder still knows the job; killed with
SIGKILL, it leaves nothing running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx
import pytest

from service.serve import ray_bootstrap_record
from tests.services import free_port, wait_until

pytestmark = pytest.mark.slow


def ray_heads() -> set[int]:
    found = subprocess.run(["pgrep", "-f", "ray start --head"], capture_output=True, text=True).stdout.split()
    return {int(pid) for pid in found}


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(child) for child in found]


def running(pid: int) -> bool:
    """Alive and not a zombie (an ended orphan waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def start_serve(data_dir, port: int, log) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "RAY_ADDRESS", "SCDD_API_KEYS", "SCDD_API_KEYS_FILE", "SCDD_ARTIFACTS")}
    return subprocess.Popen([sys.executable, "-m", "scdd_cli", "serve", "--port", str(port), "--data-dir", str(data_dir)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(120)


def test_serve_starts_redis_and_ray_runs_a_job_and_cleans_up(tmp_path, fmnist_root, fmnist_teacher_ckpt, ray_head):
    heads_before = ray_heads()
    data_dir, port = tmp_path / "service", free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w")
    process = start_serve(data_dir, port, log)
    try:
        wait_until(lambda: ready(url), 180, "scdd serve to be ready", interval=0.5)
        key = (data_dir / "api-key").read_text().strip()
        assert oct((data_dir / "api-key").stat().st_mode)[-3:] == "600"
        assert key not in (data_dir / "api-keys.yaml").read_text()  # only its hash is kept
        headers = {"Authorization": f"Bearer {key}"}
        spec = {"method": "sre2l", "dataset": {"root": str(fmnist_root), "classes": [0, 1], "train_limit": 30},
                "teacher": {"epochs": 1}, "recover": {"ipc": 1, "iterations": 3, "batch_size": 2},
                "validate": {"enabled": False},
                "resources": {"device": "cpu", "amp": "off", "channels_last": "off", "compile": "off"}}
        job = httpx.post(f"{url}/v1/jobs", json=spec, headers=headers).json()
        done = wait_until(lambda: (j := httpx.get(f"{url}/v1/jobs/{job['id']}", headers=headers).json())["state"]
                          in ("succeeded", "failed", "cancelled") and j, 240, "the job", interval=0.5)
        assert done["state"] == "succeeded", done
        assert (data_dir / "artifacts" / "default" / job["id"] / "manifest.json").exists()
    finally:
        stop(process)
    assert process.returncode == 0
    assert ray_heads() == heads_before  # its Ray head is gone; the tests' head is untouched
    text = (tmp_path / "serve.log").read_text()
    for line in ("started redis-server", "started a Ray head", "created an API key", "started the dispatcher"):
        assert line in text
    # Ray's record of the "current cluster" does not name the stopped head (a local multi-worker run would try to
    # join it; that a run starts its own Ray whatever the record says is test_distributed_recover.py's)
    head_port = re.search(r"started a Ray head: cluster 127\.0\.0\.1:(\d+)", text).group(1)
    record = ray_bootstrap_record()
    assert not record.exists() or record.read_text().strip().rsplit(":", 1)[-1] != head_port

    again = start_serve(data_dir, port, log)
    try:
        wait_until(lambda: ready(url), 180, "scdd serve to be ready again", interval=0.5)
        listed = httpx.get(f"{url}/v1/jobs", headers=headers).json()["jobs"]
        assert [(j["id"], j["state"]) for j in listed] == [(job["id"], "succeeded")]
        started = children(again.pid)  # redis-server, the `ray start` head, the dispatcher
        assert len(started) == 3, started
    finally:
        again.kill()  # SIGKILL: serve cannot stop anything itself
        again.wait(30)
    # Linux ends its children with it (they asked for SIGTERM on their parent's death): nothing is orphaned.
    wait_until(lambda: not any(running(pid) for pid in started), 90, "serve's children to end", interval=0.5)
    assert ray_heads() == heads_before
