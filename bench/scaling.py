"""Distributed recover scaling: image-iterations per second with 1 and with W workers on Ray.

Both runs synthesise the same global batch (`--classes` classes, one image each per unit) with the
same teacher; W workers split the classes into W slices and synchronise BatchNorm statistics every
step (`bn_sync: global`, gloo on CPU, NCCL on GPUs). Each worker gets `--threads` CPU threads (or
one GPU with `--device cuda`). The teacher is a registry model on CIFAR-100-shaped inputs
(3 x 32 x 32, 100 classes) with BN running statistics from a train-mode pass over noise: recover
never reads real data, and speed does not depend on what the teacher learnt.

Steady-state throughput comes from the unit records (each unit's synthesis time, slowest worker),
leaving out the first unit (torch.compile warm-up, first-touch allocations); `end-to-end` also
counts forming the worker group, loading the teacher and compiling. Also printed: the bytes each
worker all-reduces per step for the global BN statistics, for the models listed.

Each run writes a JSON result (bench/results/scaling-<date>.json, or `--out`); docs/benchmarks-and-findings.md's
table is rendered from it (`scripts/gen_bench_docs.py`, or `--table-from`), against the goal of >= 1.9x from 1 to 2
workers.

    python bench/scaling.py [--workers 1 2] [--models convnet resnet18_small] [--iterations 50] [--units 3]
    python bench/scaling.py --smoke          # seconds: 4 classes, 2 iterations, 2 units, the ConvNet, not compiled
    python bench/scaling.py --table-from bench/results/scaling-*.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import timedelta

import ray
import torch

from api_schema import RecoverSpec, ResourcesSpec
from scdd.data.base import DatasetInfo
from scdd.models import checkpoint_bytes, create_model, model_from_checkpoint
from scdd.recover import prepare_teacher, synthesize
from scdd.recover.objective import RecoverObjective
from scdd.recover.scope import GlobalScope, LocalScope, sync_bytes_per_step
from scdd.runtime import resolve_runtime
from scdd.layout import TEACHER_PATH, unit_record_path
from scdd.store import ArtifactStore
from service.serve import free_port
from workers.cluster import connect
from workers.recover import RayRecover

from benchlib import (apply_smoke, commit_of, describe_host, host, read_results, step_phases_ms,  # bench/benchlib.py
                      write_result)

CLASSES, CHANNELS, SIZE = 100, 3, 32
GOAL = 1.9  # steady speed-up from 1 to 2 workers (issue 28)
SMOKE = {"models": ["convnet"], "classes": 4, "iterations": 2, "units": 2, "compile": "off"}


def dataset_info(classes: int) -> DatasetInfo:
    names = tuple(f"class{c:03d}" for c in range(classes))
    return DatasetInfo("cifar100-shaped", names, names, tuple(range(classes)), CHANNELS, SIZE,
                       (0.5,) * CHANNELS, (0.25,) * CHANNELS)


def teacher_checkpoint(arch: str, classes: int) -> bytes:
    torch.manual_seed(0)
    model = create_model(arch, classes, CHANNELS, SIZE)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the passes below
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(64, CHANNELS, SIZE, SIZE))
    return checkpoint_bytes(model.eval(), arch=arch, num_classes=classes, in_channels=CHANNELS, image_size=SIZE)


def run(arch: str, workers: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"scaling-{arch}-w{workers}-", ignore_cleanup_errors=True) as folder:
        return run_in(ArtifactStore(folder), arch, workers, args)


def run_in(store: ArtifactStore, arch: str, workers: int, args: argparse.Namespace) -> dict:
    store.write_bytes(TEACHER_PATH, teacher_checkpoint(arch, args.classes))
    resources = ResourcesSpec(device=args.device, workers=workers, threads=args.threads, amp=args.amp,
                              compile=args.compile, channels_last=args.channels_last)
    # noise: the initialisation recover needs no plan for (a real-pixel init would need real images to plan from,
    # which this bench has none of); the speed of a step does not depend on where its pixels started
    spec = RecoverSpec(init="noise", ipc=args.units, iterations=args.iterations, batch_size=args.classes)
    started = time.perf_counter()
    result = RayRecover(resources)(None, dataset_info(args.classes), spec, None, store, seed=0)  # type: ignore[arg-type]
    wall = time.perf_counter() - started
    records = [json.loads(store.read_bytes(unit_record_path(f"r{r:05d}-b00000"))) for r in range(args.units)]
    steady = records[1:] or records
    per_unit = args.classes * args.iterations
    return {
        "model": arch, "workers": workers,
        "steady": per_unit * len(steady) / sum(r["seconds"] for r in steady),
        "end_to_end": per_unit * len(records) / wall,
        "ce": result.final_ce,
        "bn": result.final_bn,
    }


def profile_rank(rank: int, world: int, port: int, checkpoint: bytes, args: argparse.Namespace, queue) -> None:
    """One process of the split profile: recover's step as a worker runs it (its share of the global batch, BN
    statistics combined over `world` processes with gloo when world > 1), timed per phase with torch.profiler."""
    torch.set_num_threads(args.threads)
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world, timeout=timedelta(seconds=120))
    runtime = resolve_runtime(ResourcesSpec(device="cpu", amp=args.amp, compile=args.compile,
                                            channels_last=args.channels_last))
    teacher, _ = model_from_checkpoint(checkpoint, "profile")
    share = args.classes // world
    targets = torch.arange(rank * share, (rank + 1) * share)
    spec = RecoverSpec(init="noise", iterations=args.iterations, batch_size=share)
    runner = prepare_teacher(teacher, runtime, share * args.iterations)
    info = dataset_info(args.classes)
    bounds = info.pixel_bounds()
    scope = GlobalScope() if world > 1 else LocalScope()
    with RecoverObjective(teacher, spec.first_bn_multiplier, scope, spec.stat_momentum) as objective:
        generator = torch.Generator().manual_seed(rank)
        synthesize(runner, targets, spec, bounds, (CHANNELS, SIZE, SIZE), runtime, generator, objective)  # warm-up
        steps = max(args.profile, 1)
        short = spec.model_copy(update={"iterations": steps})
        started = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            synthesize(runner, targets, short, bounds, (CHANNELS, SIZE, SIZE), runtime, generator, objective)
        wall_ms = (time.perf_counter() - started) * 1000 / steps
    events = prof.key_averages()
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key) / 1000 / steps
    # the statistics' all-reduce, forward and backward (scdd/recover/scope.py), waiting for the other rank included
    collective = sum(e.cpu_time_total for e in events if e.key in ("_AllReduceSum", "_AllReduceSumBackward")) / 1000 / steps
    queue.put({"workers": world, "rank": rank, "images": share, "step_ms": round(wall_ms, 2),
               "phase_ms": step_phases_ms(events, steps), "conv_ms": round(conv, 2),
               "all_reduce_ms": round(collective, 2)})
    if world > 1:
        torch.distributed.destroy_process_group()


def profile_split(arch: str, args: argparse.Namespace) -> list[dict]:
    """Where a step's time goes with 1 and with 2 workers: the same model, global batch and speed options as the
    Ray runs, in plain processes (gloo on loopback), so each phase, the convolutions and the all-reduce can be
    timed per rank."""
    import multiprocessing

    checkpoint = teacher_checkpoint(arch, args.classes)
    context = multiprocessing.get_context("spawn")
    rows = []
    for world in (1, 2):
        queue = context.Queue()
        port = free_port()
        processes = [context.Process(target=profile_rank, args=(rank, world, port, checkpoint, args, queue))
                     for rank in range(world)]
        for process in processes:
            process.start()
        found = [queue.get(timeout=900) for _ in processes]
        for process in processes:
            process.join()
        rows += sorted(({"model": arch, **row} for row in found), key=lambda r: r["rank"])
    return rows


def profile_table(rows: list[dict], settings: dict) -> str:
    lines = [f"torch.profiler per rank, {settings['profile']} steps after a warm-up unit, ms per step (plain processes, "
             "gloo on loopback, the Ray runs' model, global batch and speed options; *bn loss* includes the forward "
             "all-reduce of the statistics, *backward* the backward one; *all-reduce* is both, the wait for the other "
             "rank included):\n",
             "| model | workers | rank | images | step | augment | forward | bn loss | backward | optimizer | conv | "
             "all-reduce |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = r["phase_ms"]
        lines.append(f"| {r['model']} | {r['workers']} | {r['rank']} | {r['images']} | {r['step_ms']:.1f} | "
                     f"{ms.get('augment', 0):.1f} | {ms.get('forward', 0):.1f} | {ms.get('bn_loss', 0):.1f} | "
                     f"{ms.get('backward', 0):.1f} | {ms.get('optimizer', 0):.1f} | {r['conv_ms']:.1f} | "
                     f"{r['all_reduce_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def table(documents: list[dict], brief: bool = False) -> str:
    """Per run: the machine and settings, then each model's rows with the speed-up over its first row against the
    goal for 2 workers, and the bytes all-reduced per step."""
    parts = []
    for doc in documents:
        st = doc["settings"]
        parts.append(f"{describe_host(doc['host'])}; {doc['date']}, {commit_of(doc)}; Ray with "
                     f"{doc['ray_cpus']} CPUs, {st['threads']} thread(s) per worker, device {st['device']}, amp {st['amp']}, "
                     f"compile {st['compile']}; global batch {st['classes']} images of 3×32×32, {st['iterations']} "
                     f"iterations a unit, {st['units']} units (the first left out of *steady*).\n")
        parts.append("| model | workers | steady image-it/s | speed-up | efficiency | goal | end-to-end image-it/s | "
                     "final CE | final BN |")
        parts.append("|---|---:|---:|---:|---:|---|---:|---:|---:|")
        base: dict[str, dict] = {}
        for row in doc["rows"]:
            first = base.setdefault(row["model"], row)
            speedup = row["steady"] / first["steady"]
            efficiency = speedup * first["workers"] / row["workers"]
            goal = ""
            if row["workers"] == 2 and first["workers"] == 1 and not doc["smoke"]:
                goal = f"≥ {GOAL}× met" if speedup >= GOAL else f"≥ {GOAL}× **missed**"
            parts.append(f"| {row['model']} | {row['workers']} | {row['steady']:.0f} | **{speedup:.2f}×** | "
                         f"{efficiency:.0%} | {goal} | {row['end_to_end']:.0f} | {row['ce']:.3f} | {row['bn']:.3f} |")
        parts.append("")
        if not brief:
            parts.append("| model (ImageNet-1K head) | BN layers | bytes all-reduced per worker per step (forward + "
                         "backward) |")
            parts.append("|---|---:|---:|")
            parts += [f"| {arch} | {layers} | {size:,} |" for arch, layers, size in doc["sync_bytes"]]
            parts.append("")
        if doc.get("profile"):
            parts.append(profile_table(doc["profile"], doc["settings"]))
    return "\n".join(parts).rstrip() + "\n"


def sync_bytes() -> list[tuple[str, int, int]]:
    rows = []
    for arch in ("resnet18", "resnet50"):
        model = create_model(arch, 1000, 3, 224)
        layers = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        rows.append((arch, layers, sync_bytes_per_step(model)))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--models", nargs="+", default=["convnet", "resnet18_small"])
    parser.add_argument("--classes", type=int, default=CLASSES, help="classes = images in the global batch")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--units", type=int, default=3, help="units (rounds) per run; the first is warm-up")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per worker")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for one GPU per worker")
    parser.add_argument("--amp", default="auto")
    parser.add_argument("--compile", default="auto")
    parser.add_argument("--channels-last", default="auto")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile this many steps of each model with 1 and 2 plain processes (gloo): ms per "
                        "step of each phase, the convolutions and the all-reduce, per rank")
    parser.add_argument("--out", help="the JSON result (default bench/results/scaling-<date>.json; a --smoke run "
                        "writes only where --out says)")
    parser.add_argument("--smoke", action="store_true", help="seconds: " + ", ".join(f"{k} {v}" for k, v in SMOKE.items()))
    parser.add_argument("--table-from", nargs="+", metavar="JSON", help="print the tables of these result files and exit")
    parser.add_argument("--brief", action="store_true", help="--table-from: leave out the bytes-per-step table")
    args = parser.parse_args(argv)
    if args.table_from:
        print(table(read_results(args.table_from), args.brief), end="")
        return
    if args.smoke:
        apply_smoke(parser, args, SMOKE)

    connect()  # joins RAY_ADDRESS when set, else a new local cluster
    cluster = ray.cluster_resources()
    print(f"Ray: {int(cluster.get('CPU', 0))} CPUs, {int(cluster.get('GPU', 0))} GPUs; {describe_host(host())}; "
          f"global batch {args.classes} images of 3x32x32, {args.iterations} iterations/unit, {args.units} units; "
          f"{args.threads} thread(s) per worker; device {args.device}, amp {args.amp}, compile {args.compile}", flush=True)
    rows = []
    for arch in args.models:
        for workers in args.workers:
            rows.append(run(arch, workers, args))
            print(f"  {arch}, {workers} worker(s): steady {rows[-1]['steady']:.0f} image-it/s", flush=True)
    ray.shutdown()
    settings = {k: getattr(args, k) for k in ("workers", "models", "classes", "iterations", "units", "threads", "device",
                                              "amp", "compile", "channels_last", "profile")}
    profile = [row for arch in args.models for row in profile_split(arch, args)] if args.profile else None
    document = {"settings": settings, "ray_cpus": int(cluster.get("CPU", 0)), "rows": rows, "sync_bytes": sync_bytes(),
                **({"profile": profile} if profile else {})}
    print()
    print(table([{**document, "host": host(), "date": "now", "commit": "this tree", "smoke": args.smoke}]), end="")
    write_result("scaling", document, args.out, args.smoke)


if __name__ == "__main__":
    main()
