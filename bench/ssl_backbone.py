"""SC-DD's premise, measured: does a self-supervised backbone trained for real carry more than a random one?

Pretrains MoCo v2 (the library's `moco_v2`, `teacher.ssl` defaults otherwise) on all 60 000 Fashion-MNIST
training images for as many epochs as fit in `--minutes` (default 60; at least `--min-epochs`, 30), through
the library's own squeeze, so the backbone + linear probe is cached in the same teacher cache, under the same
digest, that `bench/quality.py --ssl-epochs E` uses for its `scdd` rows (seed 0). Then it trains the same
linear probe (30 epochs, 2 augmented views, standardised features) on a randomly initialised backbone of the
same architecture, and prints both probes' test top-1 on the whole 10 000-image test split.

    python bench/ssl_backbone.py                      # about an hour on 2 CPU cores
    python bench/ssl_backbone.py --smoke              # seconds: 1 epoch on 30 images per class, to a temp folder

`--epochs auto` (the default) times one pretraining epoch on 3 000 images and extrapolates to the whole split
(the epoch time is linear in the images); the chosen count, the measured and projected times are printed and
appended with the results to `--log`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from api_schema import JobSpec
from scdd.data import load_dataset
from scdd.models import create_model, strip_head
from scdd.progress import ConsoleProgress, SilentProgress
from scdd.runtime import resolve_runtime
from scdd.squeeze.probe import train_probe
from scdd.squeeze.teachers import TeacherCache, recovery_teacher

from benchlib import apply_smoke, smoke_into_temp  # bench/benchlib.py

SMOKE = {"epochs": "1", "train_limit": 30, "teacher_epochs": 1}


def scdd_spec(epochs: int, train_limit: int | None, teacher_epochs: int) -> JobSpec:
    """The spec of bench/quality.py's scdd rows (seed 0) with `epochs` of pretraining: the same teacher digest."""
    return JobSpec.model_validate({"method": "scdd", "seed": 0, "dataset": {"train_limit": train_limit},
                                   "teacher": {"epochs": teacher_epochs, "ssl": {"epochs": epochs}}})


def seconds_per_epoch(images: int) -> float:
    """Seconds of one MoCo epoch over `images` training images, from one timed epoch on 300 images per class."""
    from scdd.squeeze.ssl import SSL_METHODS

    probe_spec = scdd_spec(1, 300, 3)
    data = load_dataset(probe_spec.dataset, 0)
    runtime = resolve_runtime(probe_spec.resources)
    info = data.info
    backbone = create_model(probe_spec.teacher.arch, info.num_classes, info.channels, info.image_size)
    _, feature_dim = strip_head(backbone)
    started = time.perf_counter()
    SSL_METHODS.get("moco_v2")(backbone, feature_dim, data, probe_spec.teacher.ssl, runtime, 0, SilentProgress())
    seconds = time.perf_counter() - started
    return seconds * images / len(data.train)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="time for the pretraining (auto epochs)")
    parser.add_argument("--epochs", default="auto", help="pretraining epochs, or auto (as many as fit in --minutes)")
    parser.add_argument("--min-epochs", type=int, default=30)
    parser.add_argument("--train-limit", type=int, help="training images per class (default: all 6 000)")
    parser.add_argument("--teacher-epochs", type=int, default=3, help="as bench/quality.py (part of the spec digest)")
    parser.add_argument("--out", default="bench/out/quality", help="the teacher cache is <out>/teachers")
    parser.add_argument("--log", default="bench/results/ssl_backbone.jsonl")
    parser.add_argument("--smoke", action="store_true", help="seconds: " + ", ".join(f"{k} {v}" for k, v in SMOKE.items())
                        + "; --out and --log go to a temporary folder")
    args = parser.parse_args()
    if args.smoke:
        apply_smoke(parser, args, SMOKE)
        smoke_into_temp(parser, args, "ssl_backbone")
    record: dict = {"train_limit": args.train_limit}
    data = load_dataset(scdd_spec(1, args.train_limit, args.teacher_epochs).dataset, 0)  # the same whatever the epochs
    if args.epochs == "auto":
        images = len(data.train)
        epoch_s = seconds_per_epoch(images)
        epochs = int(args.minutes * 60 // epoch_s)
        print(f"one MoCo v2 epoch over {images} images: {epoch_s:.0f} s (projected from 3 000); "
              f"{epochs} epochs fit in {args.minutes:g} min", flush=True)
        if epochs < args.min_epochs:
            raise SystemExit(f"only {epochs} epochs fit in {args.minutes:g} minutes (at least {args.min_epochs} asked): "
                             f"raise --minutes, or pass --epochs")
        record.update(minutes=args.minutes, projected_epoch_s=round(epoch_s, 1))
    else:
        epochs = int(args.epochs)
        record["epochs_given"] = True
    spec = scdd_spec(epochs, args.train_limit, args.teacher_epochs)
    runtime = resolve_runtime(spec.resources)
    cache = TeacherCache(str(Path(args.out) / "teachers"))
    started = time.perf_counter()
    teacher = recovery_teacher(spec, data, cache, runtime, ConsoleProgress())
    squeeze_s = time.perf_counter() - started
    trained = teacher.details["probe"]["top1"]

    torch.manual_seed(spec.seed)
    info = data.info
    random_backbone = create_model(spec.teacher.arch, info.num_classes, info.channels, info.image_size)
    strip_head(random_backbone)
    random_backbone.to(runtime.device)
    baseline = train_probe(random_backbone, data, spec.teacher.probe, runtime, spec.seed, SilentProgress()).accuracy.top1
    ssl = teacher.details.get("ssl", {})
    losses = ssl.get("epoch_losses") or []
    record.update({
        "epochs": epochs, "teacher_digest": teacher.digest,
        "source": teacher.source, "squeeze_s": round(squeeze_s, 1), "probe_top1_trained": trained,
        "probe_top1_random_init": baseline, "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None, "images": len(data.train), "test_images": len(data.test),
        "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    })
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "a") as log:
        log.write(json.dumps(record) + "\n")
    print(f"\n| backbone | MoCo v2 epochs | linear probe top-1 (test, {len(data.test)} images) |\n|---|---:|---:|")
    print(f"| random init | 0 | {baseline:.2f} |")
    print(f"| MoCo v2 ({teacher.source}, {squeeze_s / 60:.1f} min) | {epochs} | {trained:.2f} |")
    print(f"\nbench/quality.py --ssl-epochs {epochs} reuses this teacher (digest {teacher.digest}).")


if __name__ == "__main__":
    main()
