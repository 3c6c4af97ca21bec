"""Every script in bench/ runs in its small mode (`--smoke`), so a change that breaks a bench fails here (issue 28).

A bench script is a file of bench/ that runs as a program (`if __name__ == "__main__"`); the others are modules the
scripts share (published_loop.py, scale_serve.py, benchlib.py). Each smoke run is a real run of the script as a user
starts it, on tiny sizes: real Fashion-MNIST, real Ray clusters, redis-servers and uvicorn where the bench starts
them. They run three at a time (one torch thread each), so the suite pays about half their sum; each must exit 0, print
its table and leave the repository as it found it (a smoke run writes only to temporary folders).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
# benches whose --smoke run another test makes (with checks of its own), so it is not run twice
RUN_ELSEWHERE = {"gpu_check.py": "tests/test_gpu_check.py"}
# what each smoke run must print (its table's header or verdict): proof it got to the end, not just exited 0
PRINTS = {
    "api_load.py": r"\| POST /v1/jobs \|",
    "init_study.py": r"\| IPC \| config \| held-out top-1",
    "quality.py": r"\| IPC \| labels \| images \| preset \|",
    "recipes.py": r"\| row \| student protocol \|",
    "recover_speed.py": r"\| convnet \| 28 \| fast \|",
    "scale.py": r"wrote .*scale-smoke-",
    "scaling.py": r"\| convnet \| 2 \|",
    "soak.py": r"verdict: PASS",
    "sse_load.py": r"\| no streams \|",
    "ssl_backbone.py": r"\| random init \| 0 \|",
}
TIMEOUT_S = 300
PARALLEL = 3  # at a time: most of a smoke run is starting and stopping processes (Ray, Redis, uvicorn), not compute


def bench_scripts() -> list[str]:
    return sorted(path.name for path in BENCH.glob("*.py") if '__name__ == "__main__"' in path.read_text())


def test_every_bench_script_has_a_smoke_mode_this_suite_runs():
    scripts = bench_scripts()
    assert "scaling.py" in scripts and "published_loop.py" not in scripts
    for name in scripts:
        assert "--smoke" in (BENCH / name).read_text(), f"bench/{name} has no --smoke mode"
    assert set(scripts) == set(PRINTS) | set(RUN_ELSEWHERE), "a bench script without a smoke run here, or a stale entry"
    for name, test in RUN_ELSEWHERE.items():
        assert "--smoke" in (REPO / test).read_text(), f"{test} does not run bench/{name} --smoke"


def repository_files() -> dict[str, float]:
    """Every file under bench/ and every top-level entry, with its modification time (caches apart)."""
    found = {str(p.relative_to(REPO)): p.stat().st_mtime for p in BENCH.rglob("*")
             if p.is_file() and "__pycache__" not in p.parts}
    found.update({p.name: p.stat().st_mtime for p in REPO.iterdir() if p.name != ".git"})  # git status refreshes .git
    return found


def run_smoke(name: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # each bench starts (and stops) what it needs, as a user's run does
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(BENCH / name), "--smoke"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the bench stops what it started (a SIGKILL would leave its stack running)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        out = f"timed out after {TIMEOUT_S} s\n{out}"
    return {"code": proc.returncode, "output": out, "seconds": time.perf_counter() - started}


@pytest.fixture(scope="module")
def smoke_runs():
    """Every bench's smoke run, PARALLEL at a time, the longest first; and whether the repository changed under them."""
    before = repository_files()
    order = sorted(PRINTS, key=lambda n: n not in {"soak.py", "scale.py", "api_load.py", "scaling.py"})
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        runs = dict(zip(order, pool.map(run_smoke, order)))
    after = repository_files()
    changed = sorted(path for path in set(before) | set(after) if before.get(path) != after.get(path))  # made, changed, gone
    for name, run in sorted(runs.items(), key=lambda item: -item[1]["seconds"]):
        print(f"bench/{name} --smoke: {run['seconds']:.0f} s, exit {run['code']}")
    return runs, changed


@pytest.mark.parametrize("name", sorted(PRINTS))
def test_the_bench_runs_in_its_small_mode(smoke_runs, name):
    runs, _ = smoke_runs
    run = runs[name]
    assert run["code"] == 0, f"bench/{name} --smoke exited {run['code']}:\n{run['output'][-4000:]}"
    assert re.search(PRINTS[name], run["output"]), f"bench/{name} --smoke did not print {PRINTS[name]!r}:\n" \
        f"{run['output'][-3000:]}"
    assert "smoke" in run["output"].lower()  # it says it is the small mode (its numbers mean nothing)


def test_smoke_runs_leave_the_repository_as_they_found_it(smoke_runs):
    _, changed = smoke_runs
    assert not changed, f"smoke runs wrote into the repository: {changed}"
