"""Which initialisation makes distilled images worth more than random real ones? Tuned on held-out
training images only (the test split is never read here).

Fashion-MNIST's training split is cut into a pool (5000 images per class) and a held-out set (the other
1000 per class). The teachers train on the pool; every set is drawn from the pool; a ConvNet student
trains on the set by KD from the relabel teacher under a validation preset and is scored on the held-out
set. Each row is appended to a JSON-lines file (every run is kept), and a table is printed.

    python bench/init_study.py --ipc 1 10 50 --configs random real selected-easy selected-medium herding
    python bench/init_study.py --ipc 10 --configs selected-easy+it30 real+it100 --seeds 0 1 2
    python bench/init_study.py --ipc 1 10 --configs random herding --relabel-arch resnet18_small   # other teacher

    python bench/init_study.py --smoke      # seconds: 50 + 50 images per class, IPC 1, random and real, 2 epochs

A config is `<init>[-<rank>][+it<N>][+lr<x>][+bn<x>][+crops<N>][+cand<N>]`; `random` is the random-real baseline
(the pipeline's own `random_real_subset`).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

from api_schema import DatasetSpec, RecoverSpec, ResourcesSpec, TeacherSpec, ValidateSpec
from scdd.data import RealData, load_dataset
from scdd.data.base import PixelSet, TensorImageDataset
from scdd.evaluate import evaluate
from scdd.models import checkpoint_bytes, create_model, load_weights
from scdd.progress import SilentProgress
from scdd.recover import BNStatLoss, freeze, synthesize
from scdd.recover.init import INITS
from scdd.runtime import resolve_runtime
from scdd.squeeze.supervised import train_supervised
from scdd.validate import random_real_subset, resolve_protocol, train_student

from benchlib import apply_smoke  # bench/benchlib.py

HELD_OUT_PER_CLASS = 1000
SMOKE = {"ipc": [1], "configs": ["random", "real"], "teacher_epochs": 1, "preset": "quick", "student_epochs": 2,
         "limit": 50}


def held_out_split(seed: int = 0, limit: int | None = None) -> RealData:
    """Pool = train minus 1000 random images per class; 'test' = those held-out training images (`limit`: at most
    that many of each per class)."""
    full = load_dataset(DatasetSpec(train_limit=None), seed)  # every training image: pool 5000, held out 1000
    labels = full.train.labels
    generator = torch.Generator().manual_seed(12345 + seed)
    held, pool = [], []
    for label in range(10):
        members = (labels == label).nonzero().flatten()
        order = members[torch.randperm(len(members), generator=generator)]
        held.append(order[:HELD_OUT_PER_CLASS][:limit])
        pool.append(order[HELD_OUT_PER_CLASS:][:limit])
    held, pool = torch.cat(held).sort().values, torch.cat(pool).sort().values

    def part(index: torch.Tensor) -> TensorImageDataset:
        return TensorImageDataset(full.train.images[index], labels[index], full.info.mean, full.info.std,
                                  source_index=index)

    return RealData(full.info, train=part(pool), test=part(held))


def teacher(data: RealData, epochs: int, seed: int, cache: Path, runtime, arch: str = "convnet") -> torch.nn.Module:
    path = cache / f"teacher-{arch}-e{epochs}-s{seed}.pt"
    model = create_model(arch, 10, 1, 28)
    if path.exists():
        load_weights(model, path.read_bytes(), str(path))
    else:
        torch.manual_seed(seed)
        train_supervised(model, data, TeacherSpec(arch=arch, epochs=epochs), runtime, seed, SilentProgress())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(checkpoint_bytes(model, arch=arch, num_classes=10, in_channels=1, image_size=28,
                                          class_names=list(data.info.class_names), digest="study", source="study",
                                          details={}))
    return freeze(model, runtime)


def parse(config: str) -> tuple[str, dict]:
    init, *mods = config.split("+")
    recover: dict = {}
    if "-" in init:
        init, rank = init.split("-")
        recover["select"] = {"rank": rank}
    for mod in mods:
        key, value = re.fullmatch(r"([a-z]+)([0-9.e-]+)", mod).groups()
        if key == "it":
            recover["iterations"] = int(value)
        elif key == "lr":
            recover["lr"] = float(value)
        elif key == "bn":
            recover["r_bn"] = float(value)
        elif key in ("crops", "cand"):
            recover.setdefault("select", {})["crops" if key == "crops" else "candidates"] = int(value)
        else:
            raise SystemExit(f"unknown modifier {mod!r}")
    return init, recover


def make_set(config: str, ipc: int, data: RealData, model, runtime, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if config == "random":
        return random_real_subset(data.train, ipc, 10, seed).normalized()
    init, recover = parse(config)
    recover.setdefault("select", {})
    recover["select"].setdefault("candidates", max(100, 2 * ipc))
    spec = RecoverSpec.model_validate({"ipc": ipc, "init": init, **recover})
    info = data.info
    if init == "noise":
        pixels = None
    else:
        plan = INITS.get(init)(data, model, spec, runtime, seed)
        pixels = plan.pixels.transpose(0, 1).reshape(-1, *plan.pixels.shape[2:])  # round-major like the pipeline
        pixels = (pixels.clamp(0, 1) * 255).round() / 255  # as stored
    labels = torch.arange(10).repeat(ipc)
    images = info.normalize(pixels) if pixels is not None else None
    if spec.iterations:
        out = []
        generator = torch.Generator().manual_seed(seed)
        with BNStatLoss(model, spec.first_bn_multiplier) as bn_loss:
            for r in range(ipc):
                rows = slice(r * 10, (r + 1) * 10)
                res = synthesize(model, labels[rows], spec, info.pixel_bounds(), (1, 28, 28), runtime, generator,
                                 bn_loss, start=None if images is None else images[rows])
                out.append(res.images)
        images = info.normalize((info.denormalize(torch.cat(out)) * 255).round() / 255)
    return images, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--configs", nargs="+", default=["random", "real", "selected-easy", "selected-medium", "herding"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--preset", default="long")
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--relabel-epochs", type=int, help="another relabel teacher (default: the scoring teacher)")
    parser.add_argument("--relabel-seed", type=int, default=None)
    parser.add_argument("--relabel-arch", default="convnet", help="architecture of the relabel teacher (e.g. resnet18_small)")
    parser.add_argument("--student-epochs", type=int, help="cut the preset's student epochs")
    parser.add_argument("--limit", type=int, help="at most this many pool and held-out images per class")
    parser.add_argument("--out", default="bench/results/init_study.jsonl")
    parser.add_argument("--smoke", action="store_true", help="seconds: " + ", ".join(f"{k} {v}" for k, v in SMOKE.items())
                        + "; the log and the teacher cache go to a temporary folder")
    args = parser.parse_args()
    cache = Path("bench/out/study")
    if args.smoke:
        apply_smoke(parser, args, SMOKE)
        cache = Path(tempfile.mkdtemp(prefix="init-study-smoke-"))
        if args.out == parser.get_default("out"):
            args.out = str(cache / "init_study.jsonl")
        print(f"the log and the teacher cache: {cache}", flush=True)
    runtime = resolve_runtime(ResourcesSpec(device="cpu"))
    data = held_out_split(limit=args.limit)
    scorer = teacher(data, args.teacher_epochs, 0, cache, runtime)
    relabel = scorer
    if args.relabel_epochs or args.relabel_seed is not None or args.relabel_arch != "convnet":
        relabel = teacher(data, args.relabel_epochs or args.teacher_epochs, args.relabel_seed or 0, cache, runtime,
                          args.relabel_arch)
    relabel_top1 = evaluate(relabel, data.test, runtime).top1
    print(f"held-out top-1: scoring teacher {evaluate(scorer, data.test, runtime).top1:.2f}, "
          f"relabel teacher ({args.relabel_arch}) {relabel_top1:.2f}", flush=True)
    results: dict[tuple, list[float]] = {}
    for ipc in args.ipc:
        for config in args.configs:
            for seed in args.seeds:
                started = time.perf_counter()
                images, labels = make_set(config, ipc, data, scorer, runtime, seed)
                protocol = resolve_protocol(ValidateSpec(preset=args.preset, epochs=args.student_epochs), len(images))
                torch.manual_seed(seed)
                student = create_model(protocol.student_arch, 10, 1, 28)
                train_student(student, PixelSet.from_normalized(images, labels, data.info), protocol, relabel, runtime,
                              seed, SilentProgress())
                top1 = evaluate(student, data.test, runtime).top1
                row = {"ipc": ipc, "config": config, "seed": seed, "preset": args.preset, "held_out_top1": top1,
                       "teacher_epochs": args.teacher_epochs, "relabel_epochs": args.relabel_epochs,
                       "relabel_seed": args.relabel_seed, "relabel_arch": args.relabel_arch,
                       "relabel_top1": relabel_top1, "seconds": round(time.perf_counter() - started, 1),
                       **({"student_epochs": args.student_epochs} if args.student_epochs else {}),
                       **({"limit": args.limit} if args.limit else {})}
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                results.setdefault((ipc, config), []).append(top1)
                print(json.dumps(row), flush=True)
    print("\n| IPC | config | held-out top-1 (mean ± half-range) | vs random |")
    print("|---:|---|---:|---:|")
    for ipc in args.ipc:
        base = results.get((ipc, "random"))
        for config in args.configs:
            v = results[(ipc, config)]
            spread = (max(v) - min(v)) / 2
            gain = f"{statistics.mean(v) - statistics.mean(base):+.2f}" if base else "—"
            print(f"| {ipc} | {config} | {statistics.mean(v):.2f} ± {spread:.2f} | {gain} |")


if __name__ == "__main__":
    main()
