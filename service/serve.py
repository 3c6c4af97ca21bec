"""`scdd serve`: the API and a dispatcher, plus what they need when it is not given.

- no REDIS_URL: starts a private redis-server on loopback, data under <data-dir>/redis, append-only
  file with fsync on every write (a restart loses no job);
- no RAY_ADDRESS: starts a local Ray head (`ray start --head --block`) with the Jobs API on loopback, and
  unless SCDD_WORKER_DEVICE is set, sets it (cuda when this machine shows an NVIDIA GPU, else cpu) for that
  head: jobs with resources.device auto then use its GPUs;
- no SCDD_API_KEYS / SCDD_API_KEYS_FILE: uses <data-dir>/api-keys.yaml, creating it with one key for
  tenant `default` the first time (the key itself is written to <data-dir>/api-key, mode 0600);
- no SCDD_ARTIFACTS: artifacts go to <data-dir>/artifacts.
Everything it started is stopped again when it exits (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from service.redact import redact_text, redact_url

log = logging.getLogger("scdd.serve")
PR_SET_PDEATHSIG = 1  # prctl(2)


class ServeError(RuntimeError):
    pass


REDIS_MAXMEMORY = "1gb"  # the private redis-server's limit (it then refuses writes; nothing is evicted)


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("scdd-service")
    max_running: int | None = None
    redis_maxmemory: str = REDIS_MAXMEMORY


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def head_flags(port: int, dashboard_port: int) -> list[str]:
    """`ray start --head` flags binding everything to loopback on free ports, so that two heads on
    one machine never collide on Ray's fixed default ports (dashboard agent, metrics, ...)."""
    fixed = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port", "ray-client-server-port", "node-manager-port", "object-manager-port")
    return ["--node-ip-address", "127.0.0.1", "--port", str(port), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dashboard_port), "--include-dashboard", "true", "--disable-usage-stats",
            *(f"--{name}={free_port()}" for name in fixed)]


def program(name: str, install: str) -> str:
    """The executable `name` next to the running interpreter (a virtual environment need not be
    activated), else on PATH; else a ServeError naming `install`, the way to get it."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ServeError(f"{name} not found next to {sys.executable} or on PATH: {install}")
    return found


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a program started here: this interpreter's bin/ first on PATH, so that what
    it starts in turn (Ray job entrypoints run `python -m service.entrypoint`) uses the same environment."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, **extra}


def _wait(check: Callable[[], bool], seconds: float, what: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServeError(f"{what} exited with code {process.returncode} while starting; see its log")
        if check():
            return
        time.sleep(0.2)
    raise ServeError(f"{what} did not come up within {seconds:.0f} s")


def _stopper(process: subprocess.Popen, name: str, grace: float = 30) -> Callable[[], None]:
    def stop() -> None:
        if process.poll() is None:
            log.info("stopping %s", name)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    return stop


def redis_command(binary: str, port: int, folder: Path, maxmemory: str = REDIS_MAXMEMORY) -> list[str]:
    """redis-server on loopback, data in `folder`: an append-only file synced on every write (a restart
    loses no job), no RDB snapshots; at `maxmemory` it refuses writes (noeviction) instead of growing until
    the OS kills it or silently dropping keys."""
    return [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder), "--appendonly", "yes",
            "--appendfsync", "always", "--save", "", "--protected-mode", "yes",
            "--maxmemory", maxmemory, "--maxmemory-policy", "noeviction"]


def redis_up(port: int) -> bool:
    """redis-server on loopback `port` answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def jobs_api_up(url: str) -> bool:
    """The Ray Jobs API at `url` lists jobs (with this process's Ray auth settings)."""
    from ray.job_submission import JobSubmissionClient

    try:
        JobSubmissionClient(url).list_jobs()
        return True
    except Exception:  # not up yet: connection refused, 5xx, not ready
        return False


def _ends_with_serve() -> Callable[[], None] | None:
    """A preexec_fn that has Linux send the child SIGTERM when `scdd serve` dies, even by SIGKILL, so no
    redis-server, Ray head or dispatcher is left running orphaned (elsewhere: None, the stop path only)."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # serve died before the line above
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def start_redis(folder: Path, stack: ExitStack, maxmemory: str = REDIS_MAXMEMORY) -> str:
    binary = program("redis-server", "install it (apt-get install redis-server) or set REDIS_URL")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    logfile = open(folder / "redis.log", "a")
    process = subprocess.Popen(redis_command(binary, port, folder, maxmemory), stdout=logfile,
                               stderr=subprocess.STDOUT, preexec_fn=_ends_with_serve())
    stack.callback(_stopper(process, "redis-server"))

    _wait(lambda: redis_up(port), 20, "redis-server", process)
    url = f"redis://127.0.0.1:{port}/0"
    log.info("started redis-server at %s (data in %s, append-only file, fsync always, maxmemory %s, noeviction)",
             redact_url(url), folder, maxmemory)
    return url


def ray_bootstrap_record() -> Path:
    """Where `ray start` records the "current cluster" that a bare ray.init() joins (Ray's own rule:
    $RAY_TMPDIR, else $TMPDIR on Linux, else /tmp; then ray/ray_current_cluster)."""
    root = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    return Path(root or "/tmp") / "ray" / "ray_current_cluster"


def forget_ray_head(port: int) -> None:
    """Once a head is stopped: remove Ray's bootstrap record if it still names the head on `port`, so nothing
    later tries to join a cluster that is gone."""
    record = ray_bootstrap_record()
    try:
        if record.read_text().strip().rsplit(":", 1)[-1] == str(port):
            record.unlink()
    except OSError:
        pass


def nvidia_gpu_present() -> bool:
    """Whether this machine shows an NVIDIA GPU to the processes it starts, checked cheaply (no torch in this
    process): CUDA_VISIBLE_DEVICES not emptied, and the driver's /proc entries or `nvidia-smi -L` list one."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    try:
        if gpus.is_dir() and any(gpus.iterdir()):
            return True
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def start_ray_head(folder: Path, stack: ExitStack) -> str:
    port, dashboard = free_port(), free_port()
    stack.callback(forget_ray_head, port)  # runs after the stopper below (last in, first out)
    logfile = open(folder / "ray-head.log", "a")
    process = subprocess.Popen(
        [program("ray", "install the project (bash scripts/setup.sh) or set RAY_ADDRESS"), "start", "--head",
         "--block", *head_flags(port, dashboard)],
        stdout=logfile, stderr=subprocess.STDOUT, env=child_env(RAY_USAGE_STATS_ENABLED="0"),
        preexec_fn=_ends_with_serve())
    stack.callback(_stopper(process, "the Ray head", grace=60))
    url = f"http://127.0.0.1:{dashboard}"

    _wait(lambda: jobs_api_up(url), 120, "the Ray head", process)
    log.info("started a Ray head: cluster 127.0.0.1:%d, Jobs API and dashboard %s (log %s)", port, url, logfile.name)
    return url


def ensure_ray_token(data_dir: Path) -> None:
    """Token auth (Ray >= 2.5x turns it on for `ray start`) needs a token: unless one is given (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), make one in <data-dir>/ray-auth-token (mode 0600) and point
    RAY_AUTH_TOKEN_PATH at it, for the head, the dispatcher and this process alike."""
    env = os.environ
    if env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH") or (Path.home() / ".ray" / "auth_token").exists():
        return
    path = data_dir / "ray-auth-token"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    env["RAY_AUTH_TOKEN_PATH"] = str(path)


def ensure_api_keys(data_dir: Path) -> str:
    from service.auth import write_key_file

    keys_file, key_file = data_dir / "api-keys.yaml", data_dir / "api-key"
    if not keys_file.exists():
        key = write_key_file(keys_file, "default")
        key_file.touch(mode=0o600)
        key_file.write_text(key + "\n")
        log.info("created an API key for tenant 'default': export SCDD_API_KEY=$(cat %s)", key_file)
    else:
        log.info("API keys from %s%s", keys_file, f"; tenant 'default' key in {key_file}" if key_file.exists() else "")
    return str(keys_file)


def start_dispatcher(data_dir: Path, stack: ExitStack) -> None:
    logfile = open(data_dir / "dispatcher.log", "a")
    process = subprocess.Popen([sys.executable, "-m", "service.dispatcher"], stdout=logfile, stderr=subprocess.STDOUT,
                               env=child_env(), preexec_fn=_ends_with_serve())
    stack.callback(_stopper(process, "the dispatcher"))
    time.sleep(0.5)
    if process.poll() is not None:
        raise ServeError(f"the dispatcher exited with code {process.returncode}: see {logfile.name}")
    log.info("started the dispatcher (log %s)", logfile.name)


class _Stop(Exception):
    pass


def _exit_on_signal(signum: int, frame: object) -> None:
    raise _Stop()


def serve(options: ServeOptions) -> int:
    import uvicorn

    from service.api.main import create_app
    from service.auth import KeyConfigError
    from service.settings import Settings

    data_dir = options.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    # A signal (also while starting) ends this as an exception, so the exit stack stops what it started;
    # uvicorn shuts down on SIGINT/SIGTERM and then raises the signal again, which lands here too.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit_on_signal)
    try:
        with ExitStack() as stack:
            env = os.environ
            if not env.get("REDIS_URL"):
                env["REDIS_URL"] = start_redis(data_dir / "redis", stack, options.redis_maxmemory)
            if not env.get("RAY_ADDRESS"):
                env.setdefault("RAY_AUTH_MODE", "token")  # Ray >= 2.5x turns token auth on for `ray start`
                ensure_ray_token(data_dir)
                # the head's worker device decides resources.device auto for the jobs it runs (workers/cluster.py)
                env.setdefault("SCDD_WORKER_DEVICE", "cuda" if nvidia_gpu_present() else "cpu")
                log.info("Ray head's workers: %s (SCDD_WORKER_DEVICE; decides resources.device auto)",
                         env["SCDD_WORKER_DEVICE"])
                env["RAY_ADDRESS"] = start_ray_head(data_dir, stack)
            if not env.get("SCDD_API_KEYS") and not env.get("SCDD_API_KEYS_FILE"):
                env["SCDD_API_KEYS_FILE"] = ensure_api_keys(data_dir)
            env.setdefault("SCDD_ARTIFACTS", str(data_dir / "artifacts"))
            if options.max_running:
                env["SCDD_MAX_RUNNING"] = str(options.max_running)
            try:
                app = create_app(Settings())
            except (KeyConfigError, ValueError) as exc:
                raise ServeError(redact_text(str(exc))) from None
            start_dispatcher(data_dir, stack)
            log.info("API on http://%s:%d (docs at /docs); artifacts in %s", options.host, options.port,
                     redact_url(env["SCDD_ARTIFACTS"]))
            uvicorn.run(app, host=options.host, port=options.port, log_level="info")
    except _Stop:
        log.info("stopped; everything this command started is stopped too")
    return 0
