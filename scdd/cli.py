"""The `distill` command of `scdd`: the library's part of the command line (scdd_cli composes them all).

`scdd distill` runs a job in this process; with `--workers N` (N > 1) or `--events FILE` it hands the
spec to the Ray job driver, which the composing entry point passes in (`run_on_ray`, workers/cli.py).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from api_schema import JobSpec, Report

# flag -> (dotted spec path, type, help). Every flag overrides the config file.
DISTILL_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--recipe": ("recipe", str, "a published recipe: scdd-imagenet, scdd-cifar100, sre2l-imagenet, sre2l-tiny-imagenet or "
                 "sre2l-cifar (every recover, augmentation, precision, output and student value of the reference "
                 "scripts; other flags override it)"),
    "--dataset": ("dataset.name", str, "dataset from the registry: fashion-mnist (default) or imagefolder"),
    "--data-dir": ("dataset.root", str, "data folder: the Fashion-MNIST IDX files, or an ImageFolder root with train/ and val/"),
    "--classes": ("dataset.classes", "list", "comma-separated subset of classes, by index or name (e.g. 0,1,2 or Bag,Coat)"),
    "--train-limit": ("dataset.train_limit", "limit", "training images per class the job uses (seeded random pick; "
                      "default 2000, the demo's size; 'all' for every image)"),
    "--test-limit": ("dataset.test_limit", "limit", "test images per class accuracies are measured on (seeded random "
                     "pick; default 'all', the whole test split; a limit is cheaper and noisier)"),
    "--image-size": ("dataset.image_size", int, "resize images to this side length (default: native size)"),
    "--normalization": ("dataset.normalization", str, "per-channel mean/std: default (the dataset's), measured (on the "
                        "training images; stored with the teacher) or given (--mean, --std)"),
    "--mean": ("dataset.mean", "floats", "with --normalization given: comma-separated per-channel mean"),
    "--std": ("dataset.std", "floats", "with --normalization given: comma-separated per-channel std"),
    "--test-resize-ratio": ("dataset.test_resize_ratio", float, "resize test images to image size x this, then centre-crop "
                            "(1.142857: ImageNet's Resize(256) + CenterCrop(224))"),
    "--method": ("method", str, "scdd (self-supervised backbone + linear probe, default), sre2l (supervised teacher) or "
                 "gvbsm (an ensemble of supervised backbones, BatchNorm + convolution statistics)"),
    "--teacher-arch": ("teacher.arch", str, "teacher architecture from the model registry (default convnet)"),
    "--teacher-checkpoint": ("teacher.checkpoint", str, "load this teacher checkpoint instead of training one"),
    "--teacher-epochs": ("teacher.epochs", int, "supervised teacher training epochs (sre2l; each gvbsm backbone; the relabel teacher)"),
    "--ensemble": ("teacher.ensemble", "list", "gvbsm: comma-separated backbones from the model registry, matched in rotation "
                   "(default convnet,convnet_d2_w32,wrn16_2)"),
    "--ssl-method": ("teacher.ssl.method", str, "self-supervised method for scdd: moco_v2"),
    "--ssl-epochs": ("teacher.ssl.epochs", int, "self-supervised pretraining epochs (scdd)"),
    "--ssl-checkpoint": ("teacher.ssl.checkpoint", str, "import this self-supervised checkpoint instead of pretraining"),
    "--ssl-checkpoint-format": ("teacher.ssl.checkpoint_format", str, "auto, moco_v2, moco_v3, dino, swav or torchvision"),
    "--probe-epochs": ("teacher.probe.epochs", int, "linear-probe epochs on the frozen backbone (scdd)"),
    "--ipc": ("recover.ipc", int, "images per class to synthesise"),
    "--init": ("recover.init", str, "where recovery starts: noise, real, selected (scored real crops), herding or kmeans; "
               "real-pixel inits put real training pixels into the distilled set"),
    "--select-rank": ("recover.select.rank", str, "selected: keep the easy (lowest teacher loss) or medium crops"),
    "--select-candidates": ("recover.select.candidates", int, "selected / herding / kmeans: real candidates drawn per class"),
    "--iterations": ("recover.iterations", int, "optimisation steps per recover batch (default: by --init)"),
    "--batch-size": ("recover.batch_size", int, "classes per recover batch"),
    "--lr": ("recover.lr", float, "recover learning rate (Adam, cosine decay)"),
    "--r-bn": ("recover.r_bn", float, "weight of the BatchNorm-statistic loss (default: by --init)"),
    "--first-bn-multiplier": ("recover.first_bn_multiplier", float, "extra weight of the first BatchNorm layer"),
    "--jitter": ("recover.augment.jitter", int, "recover: the largest roll in pixels (default image size / 8)"),
    "--jitter-direction": ("recover.augment.jitter_direction", str, "recover: roll both ways (default) or forward "
                           "(0..jitter, the reference's)"),
    "--augment-per": ("recover.augment.per", str, "recover: draw crop, flip and roll per image (default) or once per batch "
                      "(the reference's)"),
    "--image-format": ("output.image_format", str, "write the distilled images as png (default) or jpeg"),
    "--jpeg-quality": ("output.jpeg_quality", int, "with --image-format jpeg: the quality (default 75, PIL's)"),
    "--validate-mode": ("validate.mode", str, "kd (soft labels from the relabel teacher) or hard (class labels)"),
    "--preset": ("validate.preset", str, "student protocol: quick (default; kd 100 epochs) or long (300 epochs, EMA)"),
    "--dd-ranking": ("validate.dd_ranking", "bool", "true: also DD-Ranking's hard-label runs (HLR, LRS)"),
    "--student-arch": ("validate.student_arch", str, "student architecture (default convnet for kd, convnet_in for hard)"),
    "--validate-epochs": ("validate.epochs", int, "student training epochs (default: by mode and preset)"),
    "--temperature": ("validate.temperature", float, "knowledge-distillation temperature"),
    "--mix": ("validate.mix", str, "batch mixing in validation: none, cutmix or mixup (default cutmix for kd)"),
    "--students": ("validate.students", "list", "comma-separated student architectures trained on the same set (a "
                   "cross-architecture table in the report; the first is the validation student)"),
    "--student-crop": ("validate.crop", str, "student crop: resized (random-resized-crop) or padded (pad + random crop, CIFAR)"),
    "--warmup-epochs": ("validate.warmup_epochs", int, "student: epochs of linear warm-up before the cosine"),
    "--store-soft-labels": ("validate.store_soft_labels", int, "write the soft labels of this many epochs of the student's "
                            "augmented batches under soft_labels/ (FKD-style; 0: none)"),
    "--relabel-arch": ("validate.relabel_arch", str, "architecture of --relabel-checkpoint where the file does not name it"),
    "--relabel-teacher": ("validate.relabel_teacher", str, "recover (the recovery teacher, default), supervised (the same for "
                          "every method) or ensemble (mean logits of the gvbsm ensemble or of --relabel-checkpoints)"),
    "--relabel-checkpoints": ("validate.relabel_checkpoints", "list", "with --relabel-teacher ensemble: comma-separated "
                              "teacher checkpoints whose mean logits are the soft labels"),
    "--relabel-checkpoint": ("validate.relabel_checkpoint", str, "soft labels from this teacher checkpoint (any architecture, e.g. "
                             "another run's teacher.pt) instead of training the supervised one"),
    "--seed": ("seed", int, "seed of every random choice"),
    "--device": ("resources.device", str, "auto, cpu, cuda or cuda:N"),
    "--amp": ("resources.amp", str, "bf16 autocast: auto, bf16 or off"),
    "--channels-last": ("resources.channels_last", str, "channels-last memory format: auto, on or off"),
    "--threads": ("resources.threads", int, "CPU threads for torch (per worker with --workers; default 1 there)"),
    "--workers": ("resources.workers", int, "run every stage on Ray with this many workers, one GPU (or --threads CPUs) "
                  "each; joins RAY_ADDRESS or starts a local Ray"),
    "--bn-sync": ("recover.bn_sync", str, "with --workers: global (BN statistics of all workers' batches, default) or local"),
    "--out": ("output.url", str, "output folder or fsspec URL (default runs/<job id>); the same output resumes"),
}


@dataclass(frozen=True)
class DistillRun:
    """A resolved `scdd distill`: the spec, and how to show and log its progress."""

    spec: JobSpec
    quiet: bool = False  # no progress bars (no progress lines on Ray)
    events_file: str | None = None  # append the job driver's events here, as JSON lines


RayRunner = Callable[[DistillRun], int]  # runs a DistillRun through the Ray job driver; the exit code


def _parse_list(text: str) -> list[int | str]:
    return [int(part) if part.strip().isdigit() else part.strip() for part in text.split(",") if part.strip()]


def add_distill(sub: argparse._SubParsersAction, run_on_ray: RayRunner | None = None) -> None:
    """The `distill` subcommand; `run_on_ray` runs the spec through the Ray job driver (workers/cli.py)."""
    parser = sub.add_parser(
        "distill",
        help="distill a dataset on this machine",
        description="Distill a dataset: train or load a teacher (squeeze), synthesise IPC images per class "
        "(recover), train a student on them and test it on real data (validate). With no flags it runs the "
        "Fashion-MNIST demo. Flags override the config file.",
    )
    add_spec_flags(parser)
    parser.add_argument("--no-validate", action="store_true", help="skip the validation stage")
    parser.set_defaults(handler=functools.partial(distill, run_on_ray=run_on_ray))


def add_spec_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """--config, a flag per spec field (DISTILL_FLAGS, less the dotted paths starting with `skip`) and the run's
    output flags: what `scdd distill` and `scdd evaluate` share."""
    parser.add_argument("--config", help="YAML job spec (the same fields as the API's job spec)")
    for flag, (dotted, kind, text) in DISTILL_FLAGS.items():
        if skip and dotted.startswith(skip):
            continue
        parser.add_argument(flag, dest=dotted, type=str if kind in ("list", "bool", "limit", "floats") else kind,
                            default=None, help=text)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--print-spec", action="store_true", help="print the resolved job spec as YAML and exit")
    parser.add_argument("--events", metavar="FILE", help="run through the Ray job driver and append its events to FILE "
                        "as JSON lines (always the path with --workers > 1)")


def spec_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The spec fields the flags set, by dotted path."""
    overrides: dict[str, Any] = {}
    for flag, (dotted, kind, _text) in DISTILL_FLAGS.items():
        value = getattr(args, dotted)
        if value is not None:
            if kind == "list":
                value = _parse_list(value)
            elif kind == "floats":
                value = [part.strip() for part in value.split(",") if part.strip()]  # pydantic parses the numbers
            elif kind == "limit":
                value = None if value.lower() == "all" else value  # pydantic parses the number
            overrides[dotted] = value  # and "bool" text
    if args.no_validate:
        overrides["validate.enabled"] = False
    return overrides


def distill(args: argparse.Namespace, run_on_ray: RayRunner | None) -> int:
    return run_job_command(args, run_on_ray, spec_overrides(args))


def run_job_command(args: argparse.Namespace, run_on_ray: RayRunner | None, overrides: dict[str, Any]) -> int:
    """Build the spec from --config and `overrides`, then print it (--print-spec) or run it here or through the Ray
    job driver and print the report's numbers. A user error is one line and exit status 2."""
    from scdd.errors import ScddError

    # torch.compile on a CPU-only machine logs that it found no CUDA runtime: true, and no news.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        return _run_job(args, run_on_ray, overrides)
    except ScddError as exc:
        print(f"scdd: error: {exc}", file=sys.stderr)
        return 2


def _run_job(args: argparse.Namespace, run_on_ray: RayRunner | None, overrides: dict[str, Any]) -> int:
    import yaml

    from scdd.config import build_spec
    from scdd.errors import SpecError
    from scdd.pipeline import run_distillation
    from scdd.progress import ConsoleProgress, SilentProgress

    spec = build_spec(args.config, overrides)
    if args.print_spec:
        print(yaml.safe_dump(spec.to_dict(), sort_keys=False), end="")
        return 0
    run = DistillRun(spec, quiet=args.quiet, events_file=args.events)
    if spec.resources.workers > 1 or run.events_file:
        if run_on_ray is None:
            raise SpecError("--workers N > 1 and --events run through the Ray job driver, which this command "
                            "line was built without; run the `scdd` console script")
        return run_on_ray(run)
    report = run_distillation(spec, SilentProgress() if run.quiet else ConsoleProgress())
    print(describe_report(report))
    return 0


def describe_report(report: Report) -> str:
    """What `scdd distill` prints at the end: the report's numbers in a few lines."""
    rec, teacher, val, data = report.recover, report.teacher, report.validate_, report.dataset
    tested_on = ("the whole real test split" if data.test_limit is None
                 else f"{data.test_images} real test images (dataset.test_limit {data.test_limit} per class)")
    lines = [
        "",
        f"scdd {report.kind}: {report.job_id}" + (f"  (method {report.method})" if teacher else "")
        + ("  (resumed)" if report.resumed else ""),
        f"  dataset   {data.name}: {data.classes} classes, {data.train_images} train / {data.test_images} test images",
    ]
    if report.evaluated:
        ev = report.evaluated
        lines.append(f"  set       {ev.images} images of {ev.classes} classes from {ev.images_url}")
    if teacher:
        lines.append(
            f"  teacher   {teacher.arch} ({teacher.source}): top-1 {teacher.top1:.2f}% on {tested_on}"
            + (f"; {teacher.ssl.method or teacher.ssl.source} backbone + linear probe" if teacher.ssl else "")
            + ("; members " + ", ".join(f"{m.arch} {m.top1:.2f}%" for m in teacher.members) if teacher.members else ""))
    if rec:
        lines.append(
            f"  recover   {rec.images}/{rec.expected_images} images from {rec.init}"
            + (" (real training images)" if rec.init != "noise" else "")
            + (f", {rec.iterations} iterations, {rec.image_iterations_per_second:.0f} image-it/s, "
               f"final CE {rec.final_ce:.3f}, {'+'.join(rec.statistics)} statistics {rec.final_bn:.3f}"
               + (f" (EMA {rec.stat_momentum:g})" if rec.stat_momentum else "")
               + (f", {rec.backbones} backbones in rotation" if rec.backbones > 1 else "")
               if rec.iterations else ", kept as they are")
            + (f"; {rec.workers} workers, bn_sync {rec.bn_sync}" if rec.workers > 1 else ""))
    if report.schedule:
        lines.append(f"  schedule  {report.schedule}")
    if val:
        protocol, student = val.protocol, val.student
        lines.append(
            f"  validate  {protocol.student_arch} student, {protocol.mode} {protocol.epochs} epochs "
            f"({protocol.preset} preset): "
            f"top-1 {student.top1:.2f}%, top-5 {student.top5:.2f}% on {tested_on}"
        )
        if val.baseline:
            lines.append(
                f"  baseline  same protocol on {val.baseline.images} random real images: top-1 {val.baseline.top1:.2f}% "
                f"-> IOR {val.ior:+.2f} points (distilled minus random real)"
            )
        if val.students:
            width = max(len(row.arch) for row in val.students)
            lines.append(f"  students  {'arch':<{width}}   top-1    top-5   random real    IOR")
            lines += [f"            {row.arch:<{width}} {row.top1:6.2f}%  {row.top5:6.2f}%"
                      + (f"     {row.baseline_top1:6.2f}%   {row.ior:+6.2f}" if row.baseline_top1 is not None else "")
                      for row in val.students]
        if val.dd_ranking:
            rank = val.dd_ranking
            lines.append(
                f"  ranking   DD-Ranking: IOR {rank.ior:+.2f}, HLR {rank.hlr:+.2f} (full data hard "
                f"{rank.full_data_hard_top1:.2f}% [{rank.full_data_source}], set hard {rank.set_hard_top1:.2f}%), "
                f"LRS {rank.lrs:.4f}"
            )
    elif report.partial:
        lines.append("  validate  skipped: the distilled set is incomplete (rerun with the same --out to resume)")
    stages = ", ".join(f"{name} {sec:.1f}s" for name, sec in report.stage_seconds.items())
    written = "images/, manifest.json, report.json, grid.png" if rec else "report.json"
    lines += [f"  time      {stages}", f"  output    {report.output}  ({written})"]
    return "\n".join(lines)
