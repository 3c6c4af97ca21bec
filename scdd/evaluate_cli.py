"""The `evaluate` command of `scdd`: judge a distilled set that exists (kind evaluate).

`scdd evaluate --images URL` trains the validation students (validate.students; each beside a random-real
baseline of the same count per class) on the set at URL (an ImageFolder, or a scdd output) and tests them on the
dataset's test split; no recover runs. It takes distill's flags (scdd/cli.py `DISTILL_FLAGS`: the dataset, the
student protocol, the relabel teacher, --workers, --out, ...) and, like distill, hands `--workers N` (N > 1) and
`--events` runs to the Ray job driver (`run_on_ray`, workers/cli.py), where `run_distillation` dispatches on the
spec's kind.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

from scdd.cli import DISTILL_FLAGS, RayRunner, add_spec_flags, run_job_command, spec_overrides

# distill's flags that make no sense for a set that exists: how recover makes images, and how they are written
NOT_FOR_EVALUATE = ("recover.", "output.image_format", "output.jpeg_quality")


def add_evaluate(sub: argparse._SubParsersAction, run_on_ray: RayRunner | None = None) -> None:
    """The `evaluate` subcommand; `run_on_ray` runs the spec through the Ray job driver (workers/cli.py)."""
    parser = sub.add_parser(
        "evaluate",
        help="evaluate an existing distilled set",
        description="Evaluate a distilled set that exists (an ImageFolder with one sub-folder per class, or a scdd "
        "output): train the validation students on it, each beside a random-real baseline of the same count per "
        "class, and test them on the real test split. No recover runs; the relabel teacher is "
        "--relabel-checkpoint, else obtained as distill obtains it. Flags override the config file.",
    )
    parser.add_argument("--images", required=True, metavar="URL",
                        help="the distilled set: a folder or fsspec URL (s3://...) of class sub-folders, or a scdd output")
    add_spec_flags(parser, skip=NOT_FOR_EVALUATE)
    parser.set_defaults(handler=functools.partial(evaluate, run_on_ray=run_on_ray), no_validate=False,
                        **{dotted: None for _flag, (dotted, _k, _t) in DISTILL_FLAGS.items()
                           if dotted.startswith(NOT_FOR_EVALUATE)})


def evaluate_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The spec fields of `scdd evaluate`: distill's flags, the kind and the set; a relabel checkpoint given alone
    means the supervised relabel teacher (the spec's rule for it)."""
    overrides = {**spec_overrides(args), "kind": "evaluate", "evaluate.images": args.images}
    if overrides.get("validate.relabel_checkpoint") and "validate.relabel_teacher" not in overrides:
        overrides["validate.relabel_teacher"] = "supervised"
    return overrides


def evaluate(args: argparse.Namespace, run_on_ray: RayRunner | None) -> int:
    return run_job_command(args, run_on_ray, evaluate_overrides(args))
