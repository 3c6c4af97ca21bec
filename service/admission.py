"""What a tenant's spec may ask of the service, and where its job writes.

The service chooses the output: every job writes under `<artifacts>/<tenant>/<job id>` and caches
teachers under `<teacher cache>/<tenant>`, so `output.url`, `output.teacher_cache` and `output.s3`
are not for requests. Paths a job reads (dataset root, checkpoints, the set an evaluate job judges) must be absolute
(the job runs in another process and folder than the API: a relative path would be checked here and opened there) or
object-store URLs, and lie under one of the service's data roots (SCDD_DATA_ROOTS) or the tenant's own artifacts. A
local checkpoint file there is read (its pickle only, without torch: service/checkpoint_scan.py) and refused when the
library's safe load would refuse it. Everything here touches the filesystem: the API calls it in a thread.
"""

from __future__ import annotations

import os
from typing import Optional

from api_schema import JobSpec
from service.artifacts import UnsafePath, check_relative, within
from service.auth import Tenant
from service.budget import over_budget
from service.checkpoint_scan import checkpoint_refusal
from service.settings import Settings


class AdmissionError(ValueError):
    def __init__(self, errors: list[tuple[tuple[str, ...], str]]):
        super().__init__("; ".join(f"{'.'.join(loc)}: {msg}" for loc, msg in errors))
        self.errors = errors


def job_prefix(settings: Settings, tenant: str, job_id: str) -> str:
    return f"{settings.artifacts.rstrip('/')}/{tenant}/{job_id}"


def _readable(path: str, roots: list[str], tenant_root: str) -> bool:
    if "\x00" in path:
        return False
    if "://" in path:  # an object-store URL: inside the tenant's prefix, with no segment that climbs out of it
        rest = path.removeprefix(tenant_root + "/")
        try:
            return rest != path and check_relative(rest) == rest
        except UnsafePath:
            return False
    real = os.path.realpath(path)
    return any(within(real, root) for root in roots + [tenant_root])


def admit(spec: JobSpec, tenant: Tenant, job_id: str, settings: Settings) -> dict:
    """The spec the job will run (as a dict), or AdmissionError naming each refused field and each exceeded limit
    of the tenant (service/budget.py). Blocking (it reads checkpoint files and may list the dataset root): call it
    in a thread from async code."""
    errors: list[tuple[tuple[str, ...], str]] = []
    output = spec.output
    for field, value in (("url", output.url), ("teacher_cache", output.teacher_cache)):
        if value is not None:
            errors.append((("body", "output", field), "chosen by the service (each job writes under its own artifact "
                                                       "prefix): leave it out"))
    if output.s3.model_dump(exclude_none=True):
        errors.append((("body", "output", "s3"), "the service's artifact store is configured by the operator: leave it out"))
    tenant_root = f"{settings.artifacts.rstrip('/')}/{tenant.name}"
    roots = settings.data_root_list
    checkpoints: list[tuple[tuple[str, ...], Optional[str]]] = [
        (("teacher", "checkpoint"), spec.teacher.checkpoint),
        (("teacher", "ssl", "checkpoint"), spec.teacher.ssl.checkpoint),
        (("validate", "relabel_checkpoint"), spec.validate_.relabel_checkpoint),
        *((("validate", "relabel_checkpoints", str(i)), path) for i, path in enumerate(spec.validate_.relabel_checkpoints)),
    ]
    reads: list[tuple[tuple[str, ...], Optional[str]]] = [
        (("dataset", "root"), spec.dataset.root),
        (("evaluate", "images"), spec.evaluate.images),  # kind evaluate: the set it judges
        *checkpoints,
    ]
    for loc, path in reads:
        if path is None:
            continue
        if "://" not in path and not os.path.isabs(path):
            errors.append((("body", *loc), f"{path!r} is a relative path: a job runs in another folder than the API, "
                                           f"so give the absolute path (e.g. under {roots[0] if roots else '/data'}) "
                                           f"or an object-store URL"))
        elif not _readable(path, roots, tenant_root):
            errors.append((("body", *loc), f"{path!r} is outside the folders this service reads from "
                                           f"({', '.join(roots)}, or your own job artifacts)"))
        elif (loc, path) in checkpoints and "://" not in path:  # a URL is read (and judged) by the squeeze stage
            refusal = checkpoint_refusal(path)
            if refusal:
                errors.append((("body", *loc), refusal))
    root_refused = any(loc == ("body", "dataset", "root") for loc, _ in errors)
    errors += over_budget(spec, tenant, look_in_root=not root_refused,  # never lists a folder it may not read
                          settings=settings)
    if errors:
        raise AdmissionError(errors)
    data = spec.to_dict()
    data["output"] = {**data["output"], "url": job_prefix(settings, tenant.name, job_id),
                      "teacher_cache": f"{settings.teacher_cache_root.rstrip('/')}/{tenant.name}"}
    return data
