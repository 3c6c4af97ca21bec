"""What one job may ask of the service: the size of a spec against its tenant's limits.

Limits (service/auth.py `Limits`; per tenant in the API key file, else the SCDD_* settings): workers
per job (each worker may hold a GPU), recover work (images x iterations), the epochs of any one
training schedule, and the wall-clock time after dispatch (enforced by the dispatcher, not here).
A refused spec gets one message per exceeded limit, naming the field, the limit and where it is set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from api_schema import JobSpec
from service.auth import Tenant

# Classes of the built-in datasets when the spec does not list them.
DATASET_CLASSES = {"fashion-mnist": 10}
# Validation epochs a spec leaves to its preset: at most this many (scdd/validate/protocol.py PRESETS; a test
# keeps the two in step; the API does not import the compute packages).
PRESET_EPOCHS_AT_MOST = 300
# Student work of one job (validate.students, each beside its baseline): at most this many runs of the longest
# schedule a tenant may ask for (max_epochs), all runs' epochs together.
MAX_STUDENT_RUNS_AT_FULL_SCHEDULE = 8


def classes_of(spec: JobSpec, look_in_root: bool = True) -> int | None:
    """Classes the job distils: the listed ones, the built-in dataset's, or (with `look_in_root`: the root is one
    the service may read) the class folders of an ImageFolder root; None when it cannot tell."""
    if spec.dataset.classes:
        return len(spec.dataset.classes)
    if spec.dataset.name in DATASET_CLASSES:
        return DATASET_CLASSES[spec.dataset.name]
    if not look_in_root or not spec.dataset.root:
        return None
    train = Path(spec.dataset.root) / "train"
    try:
        return sum(1 for entry in train.iterdir() if entry.is_dir()) or None
    except OSError:
        return None


def gpus_of(resources: Mapping[str, Any]) -> int:
    """GPUs a job may hold (its spec's `resources` as a dict): one per worker unless its device is cpu. A job with
    device auto counts as GPU work: whether it gets GPUs depends on the cluster it lands on."""
    return 0 if resources.get("device", "auto") == "cpu" else int(resources.get("workers", 1))


def over_budget(spec: JobSpec, tenant: Tenant, look_in_root: bool = True,
                max_gpus: int = 0) -> list[tuple[tuple[str, ...], str]]:
    """(location, message) for every limit of `tenant` the spec exceeds, and a job holding more GPUs than
    `max_gpus` (the service's bound; 0: none); [] when it fits. `look_in_root`: the dataset root passed
    admission's path check, so its class folders may be counted."""
    limits, errors = tenant.limits, []

    def refuse(loc: tuple[str, ...], asked: str, limit: str, name: str) -> None:
        errors.append((("body", *loc), f"{asked}, over the limit of {limit} per job for tenant {tenant.name!r} "
                                       f"(limits.{name} in the API key file, else SCDD_{name.upper()})"))

    workers = spec.resources.workers
    if workers > limits.max_workers:
        refuse(("resources", "workers"), f"{workers} workers asked", str(limits.max_workers), "max_workers")
    gpus = gpus_of(spec.resources.model_dump())
    if max_gpus and gpus > max_gpus:
        errors.append((("body", "resources", "workers"), f"{workers} workers on device {spec.resources.device!r} hold "
                       f"{gpus} GPUs, more than this service runs at once (SCDD_MAX_GPUS={max_gpus}): lower "
                       f"resources.workers, or set resources.device to cpu"))
    recover = spec.recover
    evaluate = spec.kind == "evaluate"  # no recover work (the set exists; its students are counted below)
    if not evaluate:  # the recover size, from the classes (which may list the dataset root: only where needed)
        classes = classes_of(spec, look_in_root)
        if classes is None:
            if recover.iterations:
                errors.append((("body", "dataset", "classes"), "the service cannot count this dataset's classes to "
                               "check the job's size: list them in dataset.classes"))
        elif recover.ipc * classes * recover.iterations > limits.max_image_iterations:
            work = recover.ipc * classes * recover.iterations
            refuse(("recover", "iterations"), f"{work:,} image-iterations asked (ipc {recover.ipc} x {classes} classes "
                   f"x {recover.iterations} iterations)", f"{limits.max_image_iterations:,}", "max_image_iterations")
    teacher, validate = spec.teacher, spec.validate_
    schedules = [(("teacher", "epochs"), teacher.epochs), (("teacher", "ssl", "epochs"), teacher.ssl.epochs),
                 (("teacher", "probe", "epochs"), teacher.probe.epochs)]
    if evaluate and validate.relabel_checkpoint:
        schedules = []  # the relabel teacher is given: no teacher trains
    if validate.enabled:
        schedules.append((("validate", "epochs"), validate.epochs or PRESET_EPOCHS_AT_MOST))
        runs = max(1, len(validate.students)) * (2 if validate.baseline else 1)  # students, each with its baseline
        epochs = validate.epochs or PRESET_EPOCHS_AT_MOST
        if runs > 1 and runs * epochs > limits.max_epochs * MAX_STUDENT_RUNS_AT_FULL_SCHEDULE:
            refuse(("validate", "students"), f"{runs} student runs of {epochs} epochs asked ({runs * epochs} epochs in "
                   f"all)", f"{limits.max_epochs * MAX_STUDENT_RUNS_AT_FULL_SCHEDULE} epochs in all "
                   f"({MAX_STUDENT_RUNS_AT_FULL_SCHEDULE} x max_epochs)", "max_epochs")
        if validate.dd_ranking:
            schedules.append((("validate", "full_data_epochs"), validate.full_data_epochs))
    for loc, epochs in schedules:
        if epochs > limits.max_epochs:
            refuse(loc, f"{epochs} epochs asked", str(limits.max_epochs), "max_epochs")
    return errors
