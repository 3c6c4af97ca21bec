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

    python bench/scaling.py [--workers 1 2] [--models convnet resnet18_small] [--iterations 50] [--units 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import ray
import torch

from api_schema import RecoverSpec, ResourcesSpec
from scdd.data.base import DatasetInfo
from scdd.models import checkpoint_bytes, create_model
from scdd.recover.scope import sync_bytes_per_step
from scdd.layout import TEACHER_PATH, unit_record_path
from scdd.store import ArtifactStore
from workers.cluster import connect
from workers.recover import RayRecover

CLASSES, CHANNELS, SIZE = 100, 3, 32


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
    store = ArtifactStore(tempfile.mkdtemp(prefix=f"scaling-{arch}-w{workers}-"))
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
        "steady": per_unit * len(steady) / sum(r["seconds"] for r in steady),
        "end_to_end": per_unit * len(records) / wall,
        "ce": result.final_ce,
        "bn": result.final_bn,
    }


def main() -> None:
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
    args = parser.parse_args()

    connect()  # joins RAY_ADDRESS when set, else a new local cluster
    cluster = ray.cluster_resources()
    print(f"Ray: {int(cluster.get('CPU', 0))} CPUs, {int(cluster.get('GPU', 0))} GPUs; torch {torch.__version__}; "
          f"global batch {args.classes} images of 3x32x32, {args.iterations} iterations/unit, {args.units} units; "
          f"{args.threads} thread(s) per worker; device {args.device}, amp {args.amp}, compile {args.compile}")
    print()
    print("| model | workers | steady image-it/s | speed-up | efficiency | end-to-end image-it/s | final CE | final BN |")
    print("|---|---|---|---|---|---|---|---|")
    for arch in args.models:
        base = None
        for workers in args.workers:
            row = run(arch, workers, args)
            base = base or row["steady"]
            speedup = row["steady"] / base
            print(f"| {arch} | {workers} | {row['steady']:.0f} | {speedup:.2f}x | {speedup * args.workers[0] / workers:.0%} "
                  f"| {row['end_to_end']:.0f} | {row['ce']:.3f} | {row['bn']:.3f} |", flush=True)
    print()
    print("| model (ImageNet-1K head) | BN layers | bytes all-reduced per worker per step (forward + backward) |")
    print("|---|---|---|")
    for arch in ("resnet18", "resnet50"):
        model = create_model(arch, 1000, 3, 224)
        layers = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        print(f"| {arch} | {layers} | {sync_bytes_per_step(model):,} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
