"""Obtain the teachers a job needs: from a given checkpoint, from the cache, or by squeezing.

Trained teachers are cached under the hash of the spec fields that determine them
(`JobSpec.teacher_digest`, `JobSpec.supervised_teacher_digest`, `JobSpec.ensemble_teacher_digest`), so a
second job with the same squeeze settings reuses them, and an sre2l job and an scdd job share their
supervised teacher. Every model a squeeze trains with labels is cached alike (a gvbsm ensemble's
members too), so the ensemble's member of teacher.arch is the sre2l teacher of the same settings.
A cached or saved checkpoint names its model (`scdd.models.model_metadata`) and the data it was made for
(`shape_metadata`: shape and normalisation); the foreign files a user may pass are in scdd/models/checkpoint.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn

from api_schema import JobSpec, TeacherSpec
from scdd.data import RealData
from scdd.errors import CheckpointError
from scdd.data.base import DatasetInfo
from scdd.models import Ensemble, checkpoint_bytes, create_model, model_metadata
from scdd.models.checkpoint import is_scdd_checkpoint, load_foreign, read_checkpoint, scdd_model
from scdd.progress import Progress
from scdd.runtime import Runtime
from scdd.squeeze.methods import LOCAL_TRAINERS, METHODS, Trainers
from scdd.store import ArtifactStore, read_url


def default_cache_url() -> str:
    base = os.environ.get("SCDD_CACHE_DIR") or str(Path.home() / ".cache" / "scdd")
    return f"{base.rstrip('/')}/teachers"


@dataclass
class Teacher:
    model: nn.Module
    source: str  # "checkpoint", "cached" or "trained"
    digest: str | None
    details: dict = field(default_factory=dict)


def shape_metadata(info: DatasetInfo) -> dict:
    """What a saved teacher records of the data it was made for: its shape and its normalisation."""
    return {"num_classes": info.num_classes, "in_channels": info.channels, "image_size": info.image_size,
            "mean": [float(v) for v in info.mean], "std": [float(v) for v in info.std]}


TEACHER_ARCH_FIELD = "teacher.arch (--teacher-arch)"
RELABEL_ARCH_FIELD = "validate.relabel_arch (--relabel-arch)"


def _check_normalisation(meta: dict, url: str, info: DatasetInfo) -> None:
    """A checkpoint that records its normalisation (scdd's, since issue 26) must match the job's."""
    if "mean" not in meta or "std" not in meta:
        return  # older checkpoints: as before
    made, job = (list(meta["mean"]), list(meta["std"])), (list(info.mean), list(info.std))
    if all(len(a) == len(b) and all(abs(x - y) <= 1e-4 for x, y in zip(a, b)) for a, b in zip(made, job)):
        return

    def fmt(values: list) -> str:
        return "[" + ", ".join(f"{float(v):.4f}" for v in values) + "]"

    raise CheckpointError(
        f"checkpoint {url} was made with pixels normalised by mean {fmt(made[0])}, std {fmt(made[1])}, but this job "
        f"normalises by mean {fmt(job[0])}, std {fmt(job[1])}: set dataset.normalization: given with dataset.mean "
        f"{fmt(made[0])} and dataset.std {fmt(made[1])} (the checkpoint's), or the normalization it was made with "
        f"(default or measured)")


def _load_model(obj: dict, url: str, spec: JobSpec, data: RealData, arch: str | None = None,
                arch_field: str = TEACHER_ARCH_FIELD) -> tuple[nn.Module, dict]:
    """The model in a checkpoint (read: `read_checkpoint`) and its metadata. One scdd saved (any architecture, or
    an ensemble) is rebuilt as it says, after checking it was made for this dataset's shape and normalisation;
    a foreign one (MoCo linear eval, torchvision's reference script, a bare state dict) is loaded, built for this
    dataset, into `arch` (the spec's `arch_field`, validate.relabel_arch) where given and the weights fit it, else
    the architecture the file names, else `teacher.arch` (tried after the file's name: it always has a value)."""
    info = data.info
    if not is_scdd_checkpoint(obj):
        given = arch_field if arch else (TEACHER_ARCH_FIELD if arch_field == TEACHER_ARCH_FIELD
                                         else f"teacher.arch, as {arch_field} is unset")
        model, used = load_foreign(obj, url, lambda name: create_model(name, info.num_classes, info.channels,
                                                                      info.image_size),
                                   arch or spec.teacher.arch, given, job_first=arch is not None, fix_field=arch_field)
        return model, {"arch": used}
    shape = (obj.get("num_classes"), obj.get("in_channels"), obj.get("image_size"))
    if shape != (info.num_classes, info.channels, info.image_size):
        raise CheckpointError(
            f"checkpoint {url} is a {obj['arch']} for {shape[0]} classes, {shape[1]} channels, {shape[2]} px, but the "
            f"dataset has {info.num_classes} classes, {info.channels} channels, {info.image_size} px: pass a teacher "
            f"trained on this dataset (the same classes and image size)")
    _check_normalisation(obj, url, info)
    return scdd_model(obj, url)


def load_stored_teacher(
    store: ArtifactStore, path: str, digest: str, source: str, spec: JobSpec, data: RealData
) -> Teacher | None:
    """The teacher saved at `path` if it is there and was made for `digest`, else None."""
    if not store.exists(path):
        return None
    obj = read_checkpoint(store.read_bytes(path), store.url_of(path))
    if obj.get("digest") != digest:
        return None
    model, meta = _load_model(obj, store.url_of(path), spec, data)
    return Teacher(model.eval(), source, digest, meta.get("details", {}))


class TeacherCache:
    def __init__(self, url: str | None):
        self.store = ArtifactStore(url or default_cache_url())

    def load(self, digest: str, spec: JobSpec, data: RealData) -> Teacher | None:
        return load_stored_teacher(self.store, f"{digest}.pt", digest, "cached", spec, data)

    def save(self, digest: str, model: nn.Module, details: dict, info: DatasetInfo) -> None:
        self.store.write_bytes(f"{digest}.pt", checkpoint_bytes(
            model, digest=digest, details=details, **model_metadata(model), **shape_metadata(info)))


def _from_checkpoint(spec: JobSpec, data: RealData, url: str, arch: str | None = None,
                     arch_field: str = TEACHER_ARCH_FIELD) -> Teacher:
    """A teacher from a checkpoint; `arch` is the architecture the spec's `arch_field` gives (see `_load_model`)."""
    model, meta = _load_model(read_checkpoint(read_url(url), url), url, spec, data, arch, arch_field)
    return Teacher(model.eval(), "checkpoint", None, {"checkpoint": url, "arch": meta["arch"]})


def _ensemble_from_checkpoints(spec: JobSpec, data: RealData, urls: list[str]) -> Teacher:
    """validate.relabel_checkpoints: one ensemble of the listed teachers (an ensemble listed adds its members)."""
    members, archs = [], []
    for i, url in enumerate(urls):
        try:
            model, meta = _load_model(read_checkpoint(read_url(url), url), url, spec, data)
        except CheckpointError as exc:
            raise CheckpointError(f"relabel ensemble member {i + 1}: {exc}") from None
        if isinstance(model, Ensemble):
            members += list(model.members)
            archs += model.archs
        else:
            members.append(model)
            archs.append(meta["arch"])
    return Teacher(Ensemble(members, archs).eval(), "checkpoint", None, {"checkpoints": list(urls)})


def _cached_or_trained(
    cache: "TeacherCache", digest: str, spec: JobSpec, data: RealData, train: Callable[[], tuple[nn.Module, dict]]
) -> Teacher:
    """The teacher cached under `digest`, else the (model, details) `train()` returns, saved there first."""
    cached = cache.load(digest, spec, data)
    if cached is not None:
        return cached
    model, details = train()
    cache.save(digest, model, details, data.info)
    return Teacher(model, "trained", digest, details)


def _caching_supervised(trainers: Trainers, spec: JobSpec, data: RealData, cache: "TeacherCache") -> Trainers:
    """`trainers` whose supervised loop first looks in the cache (under the digest of a supervised teacher
    of the TeacherSpec it is given) and saves what it trains there."""
    def supervised(model: nn.Module, data: RealData, teacher: TeacherSpec, runtime: Runtime, seed: int,
                   progress: Progress) -> nn.Module:
        member = spec.model_copy(update={"teacher": teacher, "seed": seed})
        trained = _cached_or_trained(cache, member.supervised_teacher_digest(), member, data, lambda: (
            trainers.supervised(model, data, teacher, runtime, seed, progress), {"kind": "supervised"}))
        return trained.model.to(runtime.device, memory_format=runtime.memory_format())

    return Trainers(supervised=supervised, ssl=trainers.ssl)


def _cached_or_squeezed(
    spec: JobSpec, method: str, digest: str, data: RealData, cache: TeacherCache, runtime: Runtime, progress: Progress,
    trainers: Trainers,
) -> Teacher:
    def squeeze() -> tuple[nn.Module, dict]:
        caching = _caching_supervised(trainers, spec, data, cache)
        result = METHODS.get(method)(data, spec.teacher, runtime, spec.seed, progress, caching)
        return result.model, result.details

    return _cached_or_trained(cache, digest, spec, data, squeeze)


def recovery_teacher(
    spec: JobSpec, data: RealData, cache: TeacherCache, runtime: Runtime, progress: Progress,
    trainers: Trainers = LOCAL_TRAINERS,
) -> Teacher:
    if spec.teacher.checkpoint:
        return _from_checkpoint(spec, data, spec.teacher.checkpoint)
    return _cached_or_squeezed(spec, spec.method, spec.teacher_digest(), data, cache, runtime, progress, trainers)


def relabel_teacher(
    spec: JobSpec, data: RealData, recovery: Teacher, cache: TeacherCache, runtime: Runtime, progress: Progress,
    trainers: Trainers = LOCAL_TRAINERS,
) -> Teacher:
    """The teacher that gives soft labels in KD validation (see ValidateSpec.relabel_teacher)."""
    vspec = spec.validate_
    if vspec.relabel_teacher == "recover":
        return recovery
    if vspec.relabel_teacher == "ensemble":
        if vspec.relabel_checkpoints:
            return _ensemble_from_checkpoints(spec, data, vspec.relabel_checkpoints)
        if isinstance(recovery.model, Ensemble):
            return recovery
        return _cached_or_squeezed(spec, "gvbsm", spec.ensemble_teacher_digest(), data, cache, runtime, progress, trainers)
    if vspec.relabel_checkpoint:
        return _from_checkpoint(spec, data, vspec.relabel_checkpoint, vspec.relabel_arch, RELABEL_ARCH_FIELD)
    if vspec.relabel_arch and vspec.relabel_arch != spec.teacher.arch:  # a supervised teacher of another architecture
        spec = spec.model_copy(update={"teacher": spec.teacher.model_copy(update={"arch": vspec.relabel_arch})})
    elif spec.method == "sre2l":
        return recovery  # sre2l's recovery teacher is the supervised teacher
    return _cached_or_squeezed(spec, "sre2l", spec.supervised_teacher_digest(), data, cache, runtime, progress, trainers)
