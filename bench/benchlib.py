"""What the benches share: the machine and commit a result was measured on, result files, and `--smoke` defaults.

A result file is one JSON document per run (`write_result`); `scripts/gen_bench_docs.py` renders the tables of
docs/benchmarks-and-findings.md from such files with each bench's own `table` function, so no table is typed by hand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_bf16() -> str:
    """`AVX512-BF16`, `AMX` (either makes bf16 native on a CPU), both, or `no native bf16`."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((set(line.split(":", 1)[1].split()) for line in handle if line.startswith("flags")), set())
    except OSError:
        pass
    found = [name for flag, name in (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX")) if flag in flags]
    return " + ".join(found) or "no native bf16"


def git_state() -> dict:
    """The commit the code is at, and whether the working tree differs from it."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return None

    commit, status = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    return {"commit": (commit or "").strip() or None, "dirty": bool(status.strip()) if status is not None else None}


def host() -> dict:
    """The machine a result was measured on, as the docs name it."""
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "bf16": cpu_bf16(), "python": sys.version.split()[0]}
    try:
        import torch

        info.update(torch=torch.__version__, threads=torch.get_num_threads())
    except ImportError:
        pass
    return info


def describe_host(info: dict) -> str:
    """`2-core AMD EPYC with AVX512-BF16, torch 2.15.0`: the machine line printed above a generated table."""
    bf16 = "without native bf16" if info["bf16"] == "no native bf16" else f"with {info['bf16']}"
    torch = f", torch {info['torch']}" if info.get("torch") else ""
    return f"{info['cores']}-core {info['cpu']} {bf16}{torch}"


# the record_function ranges of one recover step (scdd/recover/synthesize.py), as torch.profiler names them
STEP_PHASES = ("recover.augment", "recover.forward", "recover.bn_loss", "recover.backward", "recover.optimizer")


def step_phases_ms(events, steps: int) -> dict[str, float]:
    """Milliseconds per step of each phase of a recover step (`augment`, `forward`, ...), from a profile's
    `key_averages()` over `steps` steps; 0 for a phase that did not run."""
    totals = {e.key: e.cpu_time_total for e in events if e.key in STEP_PHASES}
    return {name.split(".", 1)[1]: round(totals.get(name, 0.0) / 1000 / steps, 3) for name in STEP_PHASES}


def commit_of(document: dict) -> str:
    """`commit 37f330d`, with `and uncommitted changes` where the tree differed from it."""
    return f"commit {document.get('commit')}" + (" and uncommitted changes" if document.get("dirty") else "")


def write_result(bench: str, document: dict, out: str | Path | None, smoke: bool) -> Path | None:
    """Write one run's JSON document: to `out`, else bench/results/<bench>-<date>.json; a smoke run, which must not
    touch the repository, writes only where `out` says (nowhere without it)."""
    document = {"bench": bench, "date": datetime.date.today().isoformat(), **git_state(), "smoke": smoke,
                "host": host(), **document}
    if out is None:
        if smoke:
            return None
        out = RESULTS / f"{bench}-{document['date']}.json"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {out}")
    return out


def read_results(paths: list[str | Path]) -> list[dict]:
    return [json.loads(Path(path).read_text()) for path in paths]


def apply_smoke(parser: argparse.ArgumentParser, args: argparse.Namespace, smoke: dict) -> None:
    """--smoke: each of `smoke`'s values replaces its argument where the command line left the default (an explicit
    flag wins); the first line printed says so."""
    for dest, value in smoke.items():
        if getattr(args, dest) == parser.get_default(dest):
            setattr(args, dest, value)
    print("smoke mode (seconds, the same code paths; the numbers are no measurement): "
          + " ".join(f"--{dest.replace('_', '-')} {getattr(args, dest)}" for dest in smoke), flush=True)


def smoke_into_temp(parser: argparse.ArgumentParser, args: argparse.Namespace, name: str) -> None:
    """A smoke run's `--out` folder and its `--log` file inside it go to a new temporary folder, unless given."""
    if args.out == parser.get_default("out"):
        args.out = tempfile.mkdtemp(prefix=f"{name}-smoke-")
    if args.log == parser.get_default("log"):
        args.log = str(Path(args.out) / f"{name}.jsonl")
    print(f"outputs and log: {args.out}", flush=True)
