"""ImageNet-shaped rehearsal on a CPU box: does each process's memory follow a shard, or the set? (issue 24)

1. Writes, once (cached under --data), a synthetic ImageFolder of JPEGs: `train/<class>/*.jpg` and
   `val/<class>/*.jpg`, --classes classes, --train and --val images per class, --size px. Each class has its
   own colour and stripe pattern (orientation, frequency, contrast), each image a random phase and pixel
   noise: cheap to write, and a teacher can learn the classes. Seeded; PIL, JPEG quality 90.
2. Runs the whole job once per IPC of --ipc, each into a fresh output folder and with a fresh teacher cache
   (every run trains its teacher: the same stages each time): `scdd.pipeline.run_distillation` on
   `workers.backend.RayBackend` with `resources.workers` = --workers, `--method sre2l`, noise init and
   --iterations recover steps, a tiny teacher and student (`convnet_d1_w32`, 1 epoch each), KD validation
   with the random-real baseline, `validate.dd_ranking` off, `resources.threads` 1, on a local Ray cluster
   the driver starts (or the one at RAY_ADDRESS).
3. While a run goes, a thread samples every --interval s the resident memory (RSS, psutil) of the driver (the
   process that calls `run_distillation`), of every Ray worker process, named by the role its Ray process
   title shows (`ray::RecoverWorker` -> RecoverWorker; RayTrainWorker; run_rank, a pass task of
   workers/passes.py; Ray Train's controller and helpers, and `idle worker`s, together as `other Ray actors`),
   and of the children those start (DataLoader workers: `<role> child`). Each sample is attributed to the
   pipeline stage running then (the pipeline's `on_stage` listener; `outside stages` is building the backend
   and writing the report); every stage start and end takes a sample too, so a short stage has one. Per run
   it prints per stage the seconds and the peak RSS of the driver and of each role (its largest process), the
   whole run's peak per process and of all of them together (the sum at one instant; Ray's own daemons
   apart, as `ray system`), the output's size and file count and the manifest's size; at the end, per
   process kind, the peak at the largest IPC against the smallest. Everything goes to a JSON file
   (bench/results/scale-<date>.json, or --out), with every sample by role, for docs tables and plots.

Each IPC runs in a fresh driver process (a spawned child of the bench that starts its own local Ray cluster),
as a job's driver is one: one run's heap never counts in the next run's peak. `--in-process` runs them all in
this process on one Ray cluster instead (quicker; the driver's later peaks then include earlier runs' heap).
With RAY_ADDRESS set, every `ray::` process on this machine counts as a worker of the run: run it alone.

    python bench/scale.py                          # 1000 classes, 50 + 5 images each, 32 px; IPC 10 and 50
    python bench/scale.py --classes 100            # a medium size
    python bench/scale.py --smoke                  # 20 classes at 8 px, IPC 1 (JSON to a temp folder); --ipc 1,2: growth
    python bench/scale.py --ipc 50 --serve-only    # the IPC 50 job through `scdd serve`: artifact listing pages,
                                                   # the archive's rate, the API's memory (bench/scale_serve.py)

Run it alone on the cores. The driver's torch uses one thread (OMP_NUM_THREADS=1 unless set), each worker
`resources.threads` = 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from benchlib import RESULTS, apply_smoke, git_state  # bench/benchlib.py

MIB = 2**20
DRIVER = "driver"
OUTSIDE = "outside stages"
RAY_SYSTEM = "ray system"
IDLE = "idle worker"  # a Ray worker process with no task or actor (yet)
RAY_AGENTS = {"DashboardAgent", "RuntimeEnvAgent"}  # Ray's own per-node agents: counted as ray system
ALL = "all processes"  # the driver, the Ray workers and their children, summed at one instant (not ray system)
# Workers that touch images, in table order: recover actors (workers/recover.py), Ray Train ranks (workers/train.py),
# pass tasks (workers/passes.py). Any other role not below gets its own column too.
DATA_ROLES = ("RecoverWorker", "RayTrainWorker", "run_rank")
# Ray's own actors (Ray Train's controller and helpers; `execute` is a Ray Train worker's method title) and ours that
# only coordinate: tabled together, as the largest of them, with the idle workers.
RAY_HELPERS = {"TrainController", "SynchronizationActor", "PlacementGroupCleaner", "DatasetManager",
               "PreemptionWatcher", "execute", "JobControl"}
OTHER = "other Ray actors"
ROLE_ORDER = (DRIVER, "data", "child", OTHER, RAY_SYSTEM)
# --smoke: the same code path, one run without the random-real baseline (`--smoke --ipc 1,2 --baseline on` adds the
# growth table and the baseline: each run starts its own driver, Ray cluster and four Ray Train stages, about 100 s on 2
# cores)
SMOKE = {"classes": 20, "train": 6, "val": 2, "size": 8, "ipc": "1", "baseline": "off"}


def kind_of(role: str) -> str:
    """How a role is tabled: the driver, a worker (own column), a child of one, other Ray actors, ray system."""
    if role in (DRIVER, RAY_SYSTEM):
        return role
    if role.endswith(" child"):
        return "child"
    return OTHER if role == IDLE or role in RAY_HELPERS or role.startswith("_") else "data"


# ---------------------------------------------------------------------------------------------------------------
# 1. The synthetic ImageFolder (numpy + PIL only: the pool's processes import neither torch nor Ray)


def class_dir(label: int) -> str:
    return f"n{label:08d}"  # ImageNet-style folder names (wnids)


def _write_class(job: tuple[str, int, int, int, int, int]) -> tuple[int, int]:
    """Writes train and val JPEGs of one class; returns (files, bytes)."""
    import numpy as np
    from PIL import Image

    root, label, train, val, size, seed = job
    look = np.random.default_rng([seed, label, 0])  # what the class looks like: the same in train and val
    colour = look.uniform(40, 215, 3)
    tint = look.uniform(-1, 1, 3)
    angle, cycles, contrast = look.uniform(0, np.pi), look.uniform(1, 4), look.uniform(25, 60)
    ys, xs = np.mgrid[0:size, 0:size] / size
    ramp = 2 * np.pi * cycles * (xs * np.cos(angle) + ys * np.sin(angle))
    files = written = 0
    for split, count, stream in (("train", train, 1), ("val", val, 2)):
        folder = Path(root, split, class_dir(label))
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, label, stream])
        for i in range(count):
            wave = np.sin(ramp + rng.uniform(0, 2 * np.pi))[..., None]
            pixels = colour + contrast * wave * tint + rng.normal(0, 18, (size, size, 3))
            path = folder / f"{split}_{label:04d}_{i:05d}.jpg"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
            files += 1
            written += path.stat().st_size
    return files, written


def ensure_data(base: Path, classes: int, train: int, val: int, size: int, seed: int) -> dict:
    """The ImageFolder for these settings under `base` (written unless a complete one is there)."""
    root = base / f"c{classes}-train{train}-val{val}-px{size}-seed{seed}"
    marker = root / "scale-data.json"
    if marker.exists():
        return {**json.loads(marker.read_text()), "root": str(root), "cached": True, "generate_s": 0.0}
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    started = time.perf_counter()
    jobs = [(str(partial), label, train, val, size, seed) for label in range(classes)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=get_context("spawn")) as pool:
        done = list(pool.map(_write_class, jobs, chunksize=max(1, classes // 64)))
    facts = {"classes": classes, "train_per_class": train, "val_per_class": val, "size": size, "seed": seed,
             "files": sum(f for f, _ in done), "bytes": sum(b for _, b in done)}
    (partial / "scale-data.json").write_text(json.dumps(facts, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    seconds = round(time.perf_counter() - started, 2)
    print(f"wrote {facts['files']:,} JPEGs ({facts['bytes']:,} bytes) to {root} in {seconds:.1f} s", flush=True)
    return {**facts, "root": str(root), "cached": False, "generate_s": seconds}


# ---------------------------------------------------------------------------------------------------------------
# 3. Memory sampling


class MemorySampler:
    """Samples the RSS of the driver, of the Ray worker processes and of their children, per stage.

    `on_stage` is the pipeline's stage listener. Samples are kept raw (pid -> RSS, and what each process's title
    said) and named at the end, when each process's whole life is known: an actor owns its process for life and
    its title follows the method it runs (Ray Train's `ray::execute...` on a RayTrainWorker); a task worker shows
    `ray::IDLE` while it starts (importing torch) and between tasks, and `ray::run_rank` only while a pass runs,
    so a process is named by the first actor class, else the first task, it ever showed (`idle worker` if none).
    Then per stage and role: the largest process of the role; per process: its peak over the run; and the sum
    over all processes at one instant (`all processes`, without `ray system`)."""

    def __init__(self, interval: float, local_cluster: bool):
        import psutil

        self.psutil = psutil
        self.interval = interval
        self.local_cluster = local_cluster  # True: the workers are this process's descendants
        self.driver = psutil.Process(os.getpid())
        self.driver_cmdline = " ".join(self.driver.cmdline()).strip()
        self.lock = threading.Lock()
        self.stack: list[str] = []
        self.stage_order: list[str] = []
        self.stage_seconds: dict[str, float] = {}
        # raw samples: (seconds since start, stage, {pid: (rss bytes, what its title says)}), where what the title
        # says is a role, ("child", ancestor pid), or None (a process exiting: no title)
        self.raw: list[tuple[float, str, dict[int, tuple[int, Any]]]] = []
        self.shown: dict[int, list[str]] = {}  # pid -> the roles its title showed, in order
        self.titles: dict[int, list[str]] = {}  # pid -> a few of its titles (the JSON keeps them per role)
        self.started = time.perf_counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="scale-memory-sampler", daemon=True)

    # -- the processes -------------------------------------------------------------------------------------------
    def _title(self, proc) -> str:
        """The process's title: what Ray set (`ray::RecoverWorker.run`, padded), else its command line."""
        try:
            return " ".join(proc.cmdline()).strip()
        except (self.psutil.Error, OSError):
            return ""

    @staticmethod
    def _ray_role(title: str) -> str | None:
        """The role a worker process's title names: `ray::RecoverWorker.run` -> RecoverWorker, `ray::IDLE` (or a
        worker still starting: `python .../default_worker.py ...`) -> idle worker, Ray's agents -> ray system;
        None if not a Ray worker."""
        words = title.split()
        if not words:
            return None
        if len(words) > 1 and os.path.basename(words[1]) in ("default_worker.py", "setup_worker.py"):
            return IDLE
        if not words[0].startswith("ray::"):
            return None
        role = words[0][len("ray::"):].split(".")[0].split(":")[-1]  # a named actor: `ray::<name>:<Class>.method`
        if role in ("IDLE", ""):
            return IDLE
        return RAY_SYSTEM if role in RAY_AGENTS else role

    def _processes(self):
        if self.local_cluster:
            try:
                return self.driver.children(recursive=True)
            except self.psutil.Error:
                return []
        found = {p.pid: p for p in self.psutil.process_iter() if self._ray_role(self._title(p))}
        try:
            found.update({p.pid: p for p in self.driver.children(recursive=True)})
        except self.psutil.Error:
            pass
        return list(found.values())

    def _snapshot(self) -> dict[int, tuple[int, Any]]:
        """pid -> (RSS bytes, what its title says), this instant."""
        seen: dict[int, tuple[int, str, int]] = {}  # pid -> (ppid, title, rss)
        for proc in self._processes():
            try:
                seen[proc.pid] = (proc.ppid(), self._title(proc), proc.memory_info().rss)
            except (self.psutil.Error, OSError):
                continue
        out: dict[int, tuple[int, Any]] = {self.driver.pid: (self.driver.memory_info().rss, DRIVER)}
        self.shown.setdefault(self.driver.pid, [DRIVER])
        for pid, (ppid, title, rss) in seen.items():
            if rss <= 0:
                continue
            role: Any = self._ray_role(title)
            if role not in (None, RAY_SYSTEM) and self._ray_role(seen.get(ppid, (0, ""))[1]) not in (None, RAY_SYSTEM):
                role = None  # a forked child keeps its parent's title: named after the ancestor below
            if not title:
                role = None  # exiting: named by what it showed before, if anything
            elif role is None:
                ancestor, hops = ppid, 0
                while ancestor in seen and hops < 16 and self._ray_role(seen[ancestor][1]) in (None, RAY_SYSTEM):
                    ancestor, hops = seen[ancestor][0], hops + 1
                if ancestor in seen:
                    role = ("child", ancestor)  # e.g. a DataLoader worker of a Ray worker
                elif ancestor == self.driver.pid and ("multiprocessing" in title or title == self.driver_cmdline):
                    role = f"{DRIVER} child"
                else:
                    role = RAY_SYSTEM  # gcs_server, raylet, Ray's agents and monitors
            if isinstance(role, str):
                shown = self.shown.setdefault(pid, [])
                if role not in shown:
                    shown.append(role)
                kept = self.titles.setdefault(pid, [])
                if len(kept) < 6 and title[:120] not in kept:
                    kept.append(title[:120])
            out[pid] = (rss, role)
        return out

    # -- sampling ------------------------------------------------------------------------------------------------
    def sample(self) -> None:
        snapshot = self._snapshot()
        with self.lock:
            stage = self.stack[-1] if self.stack else OUTSIDE
            if stage not in self.stage_order:
                self.stage_order.append(stage)
            self.raw.append((time.perf_counter() - self.started, stage, snapshot))

    def on_stage(self, event: str, stage: str, seconds: float) -> None:
        """The pipeline's StageListener: ("started" | "finished", stage, seconds)."""
        if event == "started":
            with self.lock:
                self.stack.append(stage)
            self.sample()
            print(f"[{time.perf_counter() - self.started:7.1f} s] {stage} ...", file=sys.stderr, flush=True)
        else:
            self.sample()
            with self.lock:
                if stage in self.stack:
                    del self.stack[len(self.stack) - 1 - self.stack[::-1].index(stage)]
                self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds
            print(f"[{time.perf_counter() - self.started:7.1f} s] {stage} done in {seconds:.1f} s", file=sys.stderr,
                  flush=True)

    def _loop(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.sample()
            except Exception as exc:  # e.g. a process gone between listing and reading: the next sample has it
                print(f"memory sample failed: {type(exc).__name__}: {exc}", file=sys.stderr)

    def __enter__(self) -> "MemorySampler":
        self.started = time.perf_counter()
        self.sample()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.sample()

    # -- naming and the record -----------------------------------------------------------------------------------
    def _role_of(self, pid: int, hops: int = 0) -> str | None:
        """A process's name for the whole run: the first actor class it showed, else the first task, else what it
        was (idle worker, ray system, driver child); a child is named after its Ray worker ancestor."""
        shown = self.shown.get(pid, [])
        for wanted in (lambda r: r[:1].isupper() or r[:1] == "_", lambda r: r != IDLE):
            for role in shown:
                if isinstance(role, str) and wanted(role):
                    return role
        if shown:
            return shown[0]
        for _, _, snapshot in self.raw:  # a child: named after the ancestor it had
            said = snapshot.get(pid, (0, None))[1]
            if isinstance(said, tuple) and hops < 16:
                return f"{self._role_of(said[1], hops + 1) or IDLE} child"
        return None

    def record(self, wall: float) -> dict:
        role_of = {pid: self._role_of(pid) for pid in {p for _, _, snap in self.raw for p in snap}}
        stage_peaks: dict[str, dict[str, float]] = {}
        process_peaks: dict[int, float] = {}
        series: list[dict[str, float]] = []
        for t, stage, snapshot in self.raw:
            now: dict[str, float] = {}
            total = 0
            for pid, (rss, _) in snapshot.items():
                role = role_of[pid]
                if role is None:
                    continue
                mib = rss / MIB
                now[role] = max(now.get(role, 0.0), mib)
                process_peaks[pid] = max(process_peaks.get(pid, 0.0), mib)
                if role != RAY_SYSTEM:
                    total += rss
            others = [mib for role, mib in now.items() if kind_of(role) == OTHER]
            if others:
                now[OTHER] = max(others)
            now[ALL] = total / MIB
            peaks = stage_peaks.setdefault(stage, {})
            for role, mib in now.items():
                peaks[role] = max(peaks.get(role, 0.0), mib)
            series.append(now)
        roles = sorted({role_of[pid] for pid in process_peaks},
                       key=lambda r: (ROLE_ORDER.index(kind_of(r)), DATA_ROLES.index(r) if r in DATA_ROLES else 9,
                                      r == IDLE, r))
        role_peak = {r: max(m for pid, m in process_peaks.items() if role_of[pid] == r) for r in roles}
        # columns: the driver, the workers, and children of those that hold memory (not a passing `ldconfig`)
        kinds = [r for r in roles if kind_of(r) in (DRIVER, "data") or (kind_of(r) == "child" and role_peak[r] >= 10)]
        kinds += [OTHER] if any(OTHER in peaks for peaks in stage_peaks.values()) else []
        inside = sum(self.stage_seconds.values())
        seconds = {stage: self.stage_seconds.get(stage, 0.0) for stage in self.stage_order}
        seconds[OUTSIDE] = max(0.0, wall - inside)  # building the backend, writing the report
        stages = [{"stage": stage, "seconds": round(seconds[stage], 3),
                   "peak_mib": {r: round(v, 1) for r, v in stage_peaks[stage].items()}} for stage in self.stage_order]
        keys = roles + [k for k in (OTHER, ALL) if any(k in s["peak_mib"] for s in stages)]
        # every sample, by column: seconds, the stage's index in `stages`, and per role its largest process (MiB)
        timeline = {"t": [round(t, 2) for t, _, _ in self.raw],
                    "stage": [self.stage_order.index(stage) for _, stage, _ in self.raw],
                    "mib": {k: [round(now[k], 1) if k in now else None for now in series] for k in keys}}
        processes = sorted(({"pid": pid, "role": role_of[pid], "peak_mib": round(mib, 1)}
                            for pid, mib in process_peaks.items()), key=lambda p: (roles.index(p["role"]), p["pid"]))
        titles: dict[str, list[str]] = {}
        for pid, kept in self.titles.items():
            if role_of.get(pid):
                bucket = titles.setdefault(role_of[pid], [])
                bucket += [t for t in kept if t not in bucket][:max(0, 6 - len(bucket))]
        return {"roles": roles, "kinds": kinds, "stages": stages,
                "peak_mib": {r: round(max(s["peak_mib"].get(r, 0.0) for s in stages), 1) for r in keys},
                "processes": processes,
                "process_counts": {r: sum(1 for p in processes if p["role"] == r) for r in roles}, "titles": titles,
                "samples": len(self.raw), "interval_s": self.interval, "timeline": timeline}


# ---------------------------------------------------------------------------------------------------------------
# 2. One run


def job_spec(args: argparse.Namespace, data_root: str, ipc: int, out: str, teacher_cache: str) -> dict:
    return {
        "method": "sre2l",
        "seed": args.seed,
        "dataset": {"name": "imagefolder", "root": data_root, "image_size": args.size, "train_limit": None},
        "teacher": {"arch": args.teacher_arch, "epochs": args.teacher_epochs},
        "recover": {"ipc": ipc, "init": "noise", "iterations": args.iterations,
                    **({"batch_size": args.batch_size} if args.batch_size else {})},
        "validate": {"epochs": args.student_epochs, "student_arch": args.student_arch, "dd_ranking": False,
                     "baseline": args.baseline == "on"},
        "resources": {"device": "cpu", "workers": args.workers, "threads": 1, "compile": "off"},
        "output": {"url": out, "teacher_cache": teacher_cache},
    }


def folder_facts(out: Path) -> dict:
    """The output's bytes and files, in all and per top-level entry (images/, state/, manifest.json, ...)."""
    files = size = 0
    parts: dict[str, dict[str, int]] = {}
    for folder, _dirs, names in os.walk(out):
        for name in names:
            path = Path(folder) / name
            nbytes = path.stat().st_size
            files, size = files + 1, size + nbytes
            part = parts.setdefault(path.relative_to(out).parts[0], {"bytes": 0, "files": 0})
            part["bytes"] += nbytes
            part["files"] += 1
    images = parts.get("images", {"bytes": 0, "files": 0})
    manifest = out / "manifest.json"
    return {"bytes": size, "files": files, "images": images["files"], "image_bytes": images["bytes"],
            "manifest_bytes": manifest.stat().st_size if manifest.exists() else None,
            "parts": dict(sorted(parts.items(), key=lambda kv: -kv[1]["bytes"]))}


def run_one(args: argparse.Namespace, data: dict, ipc: int, work: Path) -> dict:
    """One job with this process as its driver; returns its record (and prints its table)."""
    import ray
    import torch

    from api_schema import JobSpec
    from scdd.pipeline import run_distillation
    from scdd.progress import SilentProgress
    from workers.backend import RayBackend
    from workers.cluster import connect

    torch.set_num_threads(1)
    out, cache = work / f"ipc{ipc}", work / f"ipc{ipc}-teachers"
    for folder in (out, cache):
        shutil.rmtree(folder, ignore_errors=True)
    spec = JobSpec.model_validate(job_spec(args, data["root"], ipc, str(out), str(cache)))
    local = not os.environ.get("RAY_ADDRESS")
    connect()
    print(f"IPC {ipc}: {ipc * data['classes']:,} images, driver pid {os.getpid()}, Ray "
          f"{int(ray.cluster_resources().get('CPU', 0))} CPUs", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with MemorySampler(args.interval, local_cluster=local) as sampler:
        backend = RayBackend(spec)
        report = run_distillation(spec, SilentProgress(), backend, on_stage=sampler.on_stage)
    wall = time.perf_counter() - started
    record = {"ipc": ipc, "images": ipc * data["classes"], "seconds": round(wall, 2), "driver_pid": os.getpid(),
              **sampler.record(wall), "output": folder_facts(out), "spec": spec.to_dict(),
              "report": {"complete": report.complete, "stage_seconds": report.stage_seconds,
                         **report.summary().model_dump(exclude={"output"})}}
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    print_run(record, data)
    return record


def _driver_child(args: argparse.Namespace, data: dict, ipc: int, work: str, result: str) -> None:
    """Entry of a spawned driver process: one run, its record written to `result`."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    record = run_one(args, data, ipc, Path(work))
    Path(result).write_text(json.dumps(record))
    import ray

    ray.shutdown()


def run_in_fresh_driver(args: argparse.Namespace, data: dict, ipc: int, work: Path) -> dict:
    result = work / f"ipc{ipc}-record.json"
    result.unlink(missing_ok=True)
    child = get_context("spawn").Process(target=_driver_child, args=(args, data, ipc, str(work), str(result)),
                                         name=f"scale-driver-ipc{ipc}")
    child.start()
    child.join()
    if child.exitcode != 0 or not result.exists():
        raise SystemExit(f"the driver process of IPC {ipc} failed (exit code {child.exitcode}); its output is above")
    return json.loads(result.read_text())


# ---------------------------------------------------------------------------------------------------------------
# Tables


def _mib(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def print_run(run: dict, data: dict) -> None:
    kinds = run["kinds"]
    out = run["output"]
    print(f"\nIPC {run['ipc']}: {run['images']:,} images of {data['classes']} classes at {data['size']} px, "
          f"{run['spec']['resources']['workers']} workers: {run['seconds']:.1f} s; peak RSS in MiB per stage "
          f"({run['samples']} samples, every {run['interval_s']} s)\n")
    print("| stage | seconds | " + " | ".join(kinds) + f" | {ALL} |")
    print("|---|---:|" + "---:|" * (len(kinds) + 1))
    for stage in run["stages"]:
        peaks = stage["peak_mib"]
        print(f"| {stage['stage']} | {stage['seconds']:.1f} | "
              + " | ".join(_mib(peaks.get(k)) for k in kinds) + f" | {_mib(peaks.get(ALL))} |")
    peaks = run["peak_mib"]
    print(f"| **whole run** | **{run['seconds']:.1f}** | "
          + " | ".join(f"**{_mib(peaks.get(k))}**" for k in kinds) + f" | **{_mib(peaks.get(ALL))}** |")
    print("\n| process | processes | peak RSS MiB (each) |\n|---|---:|---|")
    for role in run["roles"]:
        procs = [p for p in run["processes"] if p["role"] == role]
        if kind_of(role) in (OTHER, RAY_SYSTEM) or len(procs) > 8:
            each = f"max {_mib(max(p['peak_mib'] for p in procs))}"
        else:
            each = ", ".join(_mib(p["peak_mib"]) for p in procs)
        print(f"| {role} | {len(procs)} | {each} |")
    print(f"| {ALL} (sum at one instant, not {RAY_SYSTEM}) | | {_mib(peaks.get(ALL))} |")
    report = run["report"]
    print(f"\noutput: {out['bytes']:,} bytes in {out['files']:,} files ({out['images']:,} images, "
          f"{out['image_bytes']:,} bytes); manifest.json {out['manifest_bytes'] or 0:,} bytes "
          f"({(out['manifest_bytes'] or 0) / max(1, run['images']):.0f} bytes per image)")
    print("  by entry: " + ", ".join(f"{name} {part['bytes']:,} B / {part['files']:,} files"
                                     for name, part in out["parts"].items()))
    print(f"top-1: teacher {report['teacher_top1']}, student {report['student_top1']}, "
          f"random real {report['baseline_top1']}", flush=True)


def growth(runs: list[dict]) -> list[dict]:
    """Per process kind (and per role, in the JSON): the peak at the largest IPC against the smallest."""
    low, high = runs[0], runs[-1]
    rows = []
    for kind in list(dict.fromkeys(high["kinds"] + [r for r in high["roles"] if r != DRIVER] + [ALL])):
        a, b = low["peak_mib"].get(kind), high["peak_mib"].get(kind)
        if a and b:
            shown = kind == ALL or (kind in low["kinds"] and kind in high["kinds"])
            rows.append({"process": kind, "shown": shown, "ipc_low": low["ipc"],
                         "ipc_high": high["ipc"], "peak_low_mib": a, "peak_high_mib": b,
                         "growth_pct": round(100 * (b / a - 1), 1)})
    return rows


def print_growth(rows: list[dict]) -> None:
    if not rows:
        return
    low, high = rows[0]["ipc_low"], rows[0]["ipc_high"]
    print(f"\n| process | peak MiB at IPC {low} | peak MiB at IPC {high} | growth |\n|---|---:|---:|---:|")
    for row in rows:
        if row["shown"]:
            print(f"| {row['process']} | {_mib(row['peak_low_mib'])} | {_mib(row['peak_high_mib'])} | "
                  f"{row['growth_pct']:+.1f} % |")


# ---------------------------------------------------------------------------------------------------------------


def dump(document: dict) -> str:
    """Indented JSON with lists of numbers on one line each (the timelines)."""
    text = json.dumps(document, indent=1)
    number = r"(?:-?\d+(?:\.\d+)?(?:e-?\d+)?|null)"
    return re.sub(rf"\[\s+({number}(?:,\s+{number})*)\s+\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help=f"seconds, the same code path: {SMOKE['classes']} classes, {SMOKE['size']} px, "
                        f"{SMOKE['train']} train / {SMOKE['val']} val images per class, IPC {SMOKE['ipc']}, no baseline")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--train", type=int, default=50, help="training images per class")
    parser.add_argument("--val", type=int, default=5, help="validation images per class")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (written and dataset.image_size)")
    parser.add_argument("--ipc", default="10,50", help="comma-separated IPCs, one run each")
    parser.add_argument("--workers", type=int, default=2, help="resources.workers")
    parser.add_argument("--iterations", type=int, default=2, help="recover iterations (noise init)")
    parser.add_argument("--batch-size", type=int, default=None, help="recover.batch_size (default: the spec's)")
    parser.add_argument("--teacher-arch", default="convnet_d1_w32")
    parser.add_argument("--teacher-epochs", type=int, default=1)
    parser.add_argument("--student-arch", default="convnet_d1_w32")
    parser.add_argument("--student-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", choices=["on", "off"], default="on",
                        help="validate.baseline: train the random-real baseline too (its own Ray Train stage)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between memory samples")
    parser.add_argument("--data", type=Path, default=Path("/tmp/scdd-scale-data"),
                        help="where the ImageFolder is cached")
    parser.add_argument("--work", type=Path, default=None, help="the runs' output folders (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the runs' outputs (in --work)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every IPC in this process on one Ray cluster (default: a fresh driver process each)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON results (default bench/results/scale-<date>.json; with --smoke "
                        "scale-smoke-<date>.json in a temporary folder)")
    parser.add_argument("--print-spec", action="store_true", help="print the first run's full job spec and exit")
    parser.add_argument("--serve", action="store_true",
                        help="also run the largest IPC's job through `scdd serve` (its own redis-server and Ray head) "
                        "and time the artifact listing per page, the archive's rate and the API's memory while it "
                        "streams (bench/scale_serve.py)")
    parser.add_argument("--serve-only", action="store_true", help="only the --serve run (no driver runs of this bench)")
    parser.add_argument("--page", type=int, default=1000, help="--serve: files per listing page (the API's limit)")
    args = parser.parse_args(argv)
    if args.smoke:
        apply_smoke(parser, args, SMOKE)
    args.ipcs = sorted({int(x) for x in str(args.ipc).split(",") if x.strip()})
    if not args.ipcs:
        parser.error("--ipc names no IPC")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_spec:
        from api_schema import JobSpec

        root = str(args.data / "<generated>")
        spec = JobSpec.model_validate(job_spec(args, root, args.ipcs[0], "<work>/ipc", "<work>/teachers"))
        print(json.dumps(spec.to_dict(), indent=2))
        return 0
    started = time.perf_counter()
    data = ensure_data(args.data, args.classes, args.train, args.val, args.size, args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="scdd-scale-runs-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for ipc in ([] if args.serve_only else args.ipcs):
        runs.append(run_one(args, data, ipc, work) if args.in_process else run_in_fresh_driver(args, data, ipc, work))
    rows = growth(runs) if len(runs) > 1 else []
    print_growth(rows)
    served = None
    if args.serve or args.serve_only:
        from scale_serve import print_serve, run_through_serve

        ipc = args.ipcs[-1]
        spec = job_spec(args, data["root"], ipc, "<service>", "<service>")
        served = run_through_serve(args, data, ipc, work, spec, class_dir(0))
        print_serve(served)
    if args.work is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    today = datetime.date.today().isoformat()
    kind = "scale-serve" if args.serve_only else "scale"
    # a smoke run must not touch the repository: its JSON goes to a temporary folder unless --out says where
    smoke_folder = Path(tempfile.mkdtemp(prefix="scale-smoke-")) if args.smoke else RESULTS
    out = args.out or smoke_folder / f"{kind}-{'smoke-' if args.smoke else ''}{today}.json"
    document = {
        "bench": "scale", "date": today, **git_state(), "smoke": args.smoke,
        "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "driver_process": "in-process" if args.in_process else "a fresh spawned driver per run",
        "data": data, "runs": runs, "growth": rows, "serve": served, "seconds": round(time.perf_counter() - started, 1),
    }
    try:
        import ray
        import torch

        document["host"].update(torch=torch.__version__, ray=ray.__version__)
    except ImportError:
        pass
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump(document))
    print(f"\nwrote {out} ({time.perf_counter() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
