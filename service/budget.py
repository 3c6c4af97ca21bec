"""What one job may ask of the service: the size of a spec against its tenant's limits and the cluster's nodes.

Limits (service/auth.py `Limits`; per tenant in the API key file, else the SCDD_* settings): workers per job (each
worker may hold a GPU), recover work (images x iterations; a real-pixel init kept as it is counts each image once),
the epochs of any one training schedule, the estimated peak memory of one process of the job (service/memory_estimate.py),
and the wall-clock time after dispatch (enforced by the dispatcher, not here). The cluster bounds: the GPUs the
service runs at once (SCDD_MAX_GPUS), the CPUs and the memory of the largest node a job can land on
(SCDD_NODE_CPUS, SCDD_NODE_MEMORY_GIB; unset, this machine's). A refused spec gets one message per exceeded bound,
naming the field, what was asked (or estimated), the bound and where it is set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from api_schema import JobSpec
from service.auth import Tenant
from service.memory_estimate import GIB, MemoryEstimate, estimate_memory, gib, image_size_of

if TYPE_CHECKING:
    from service.settings import Settings

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


def node_cpus(settings: Optional["Settings"]) -> tuple[int, str]:
    """CPUs of the largest node a job can land on, and where that number is set."""
    if settings is not None and settings.node_cpus:
        return settings.node_cpus, "SCDD_NODE_CPUS"
    return os.cpu_count() or 1, "this machine's CPU count: set SCDD_NODE_CPUS to the largest node's"


def node_memory(settings: Optional["Settings"]) -> tuple[float, str]:
    """Bytes of memory of the largest node a job can land on, and where that number is set."""
    if settings is not None and settings.node_memory_gib:
        return settings.node_memory_gib * GIB, "SCDD_NODE_MEMORY_GIB"
    return (float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
            "this machine's memory: set SCDD_NODE_MEMORY_GIB to the largest node's")


def over_budget(spec: JobSpec, tenant: Tenant, look_in_root: bool = True, max_gpus: int = 0,
                settings: Optional["Settings"] = None) -> list[tuple[tuple[str, ...], str]]:
    """(location, message) for every limit of `tenant` the spec exceeds, a job holding more GPUs than `max_gpus`
    (the service's bound, else `settings.max_gpus`; 0: none), more threads than a node's CPUs, and an estimated
    peak memory over the tenant's limit or a node's memory (`settings`: the node bounds and the default memory
    limit; None: this machine's); [] when it fits. `look_in_root`: the dataset root passed admission's path check,
    so its class folders may be counted and one image header read. Blocking (it may list the root): call it in a
    thread from async code."""
    limits, errors = tenant.limits, []
    max_gpus = max_gpus or (settings.max_gpus if settings is not None else 0)

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
    threads = spec.resources.threads
    cpus, cpus_from = node_cpus(settings)
    if threads and threads > cpus:
        errors.append((("body", "resources", "threads"), f"{threads} CPU threads asked per process, more than the "
                       f"{cpus} CPUs of the largest node a job can land on ({cpus_from}): Ray could never place the "
                       f"job; lower resources.threads to {cpus} or less"))
    recover = spec.recover
    evaluate = spec.kind == "evaluate"  # no recover work (the set exists; its students are counted below)
    classes = classes_of(spec, look_in_root)  # may list the dataset root: only where no class is listed
    if not evaluate:  # the recover size: images x iterations, each image at least once (a real-pixel init kept as is)
        if classes is None:
            errors.append((("body", "dataset", "classes"), "the service cannot count this dataset's classes to "
                           "check the job's size: list them in dataset.classes"))
        elif recover.ipc * classes * max(recover.iterations, 1) > limits.max_image_iterations:
            if recover.iterations:
                work = recover.ipc * classes * recover.iterations
                refuse(("recover", "iterations"), f"{work:,} image-iterations asked (ipc {recover.ipc} x {classes} "
                       f"classes x {recover.iterations} iterations)", f"{limits.max_image_iterations:,}",
                       "max_image_iterations")
            else:
                refuse(("recover", "ipc"), f"{recover.ipc * classes:,} images asked (ipc {recover.ipc} x {classes} "
                       f"classes; with recover.iterations 0 each image counts as one image-iteration)",
                       f"{limits.max_image_iterations:,} image-iterations", "max_image_iterations")
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
    errors += _over_memory(spec, tenant, estimate_memory(spec, classes, image_size_of(spec, look_in_root)), settings)
    return errors


def _over_memory(spec: JobSpec, tenant: Tenant, estimate: MemoryEstimate,
                 settings: Optional["Settings"]) -> list[tuple[tuple[str, ...], str]]:
    """One message per memory bound the estimate exceeds: the tenant's limit, the largest node's memory."""
    largest = estimate.largest
    if largest is None:
        return []
    peak = estimate.peak_bytes
    field = ".".join(largest.field)
    asked = (f"an estimated peak of {gib(peak)} per process of this job (stage {estimate.peak_stage or 'load'}; "
             f"its largest term {largest.what}: {gib(largest.bytes)}; the estimate: docs/service.md, \"Budgets and "
             f"timeouts\")")
    errors = []
    limit = tenant.limits.max_job_memory_gib
    if limit is None and settings is not None:
        limit = settings.max_job_memory_gib
    if limit is not None and peak > limit * GIB:
        errors.append((("body", *largest.field), f"{asked}, over the limit of {limit:g} GiB per job for tenant "
                       f"{tenant.name!r} (limits.max_job_memory_gib in the API key file, else "
                       f"SCDD_MAX_JOB_MEMORY_GIB): lower {field}"))
    node, node_from = node_memory(settings)
    if peak > node:
        errors.append((("body", *largest.field), f"{asked}, more than the {node / GIB:,.1f} GiB of the largest node "
                       f"a job can land on ({node_from}): lower {field}"))
    return errors
