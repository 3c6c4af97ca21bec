"""Obtain the teachers a job needs: from a given checkpoint, from the cache, or by squeezing.

Trained teachers are cached under the hash of the spec fields that determine them
(`JobSpec.teacher_digest`, `JobSpec.supervised_teacher_digest`, `JobSpec.ensemble_teacher_digest`), so a
second job with the same squeeze settings reuses them, and an sre2l job and an scdd job share their
supervised teacher. Every model a squeeze trains with labels is cached alike (a gvbsm ensemble's
members too), so the ensemble's member of teacher.arch is the sre2l teacher of the same settings.
A cached or saved checkpoint names its model (`scdd.models.model_metadata`).
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
from scdd.models import Ensemble, checkpoint_bytes, create_model, load_weights, model_from_checkpoint, model_metadata
from scdd.models.checkpoint import read_checkpoint
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


def _blank(spec: JobSpec, data: RealData) -> nn.Module:
    info = data.info
    return create_model(spec.teacher.arch, info.num_classes, info.channels, info.image_size)


def shape_metadata(info: DatasetInfo) -> dict:
    return {"num_classes": info.num_classes, "in_channels": info.channels, "image_size": info.image_size}


def _load_model(raw: bytes, url: str, spec: JobSpec, data: RealData) -> tuple[nn.Module, dict]:
    """The model in a checkpoint and its metadata: a checkpoint that names its model (one scdd saved: any
    architecture, or an ensemble) is rebuilt as it says, after checking it was made for this dataset's
    shape; a bare state dict is loaded into `teacher.arch`."""
    meta = read_checkpoint(raw, url)
    if "arch" not in meta:
        model = _blank(spec, data)
        return model, load_weights(model, raw, url)
    info = data.info
    shape = (meta.get("num_classes"), meta.get("in_channels"), meta.get("image_size"))
    if shape != (info.num_classes, info.channels, info.image_size):
        raise CheckpointError(
            f"checkpoint {url} is a {meta['arch']} for {shape[0]} classes, {shape[1]} channels, {shape[2]} px, but the "
            f"dataset has {info.num_classes} classes, {info.channels} channels, {info.image_size} px: pass a teacher "
            f"trained on this dataset (the same classes and image size)")
    return model_from_checkpoint(raw, url)


def load_stored_teacher(
    store: ArtifactStore, path: str, digest: str, source: str, spec: JobSpec, data: RealData
) -> Teacher | None:
    """The teacher saved at `path` if it is there and was made for `digest`, else None."""
    if not store.exists(path):
        return None
    model, meta = _load_model(store.read_bytes(path), store.url_of(path), spec, data)
    if meta.get("digest") != digest:
        return None
    return Teacher(model.eval(), source, digest, meta.get("details", {}))


class TeacherCache:
    def __init__(self, url: str | None):
        self.store = ArtifactStore(url or default_cache_url())

    def load(self, digest: str, spec: JobSpec, data: RealData) -> Teacher | None:
        return load_stored_teacher(self.store, f"{digest}.pt", digest, "cached", spec, data)

    def save(self, digest: str, model: nn.Module, details: dict, info: DatasetInfo) -> None:
        self.store.write_bytes(f"{digest}.pt", checkpoint_bytes(
            model, digest=digest, details=details, **model_metadata(model), **shape_metadata(info)))


def _from_checkpoint(spec: JobSpec, data: RealData, url: str) -> Teacher:
    model, meta = _load_model(read_url(url), url, spec, data)
    return Teacher(model.eval(), "checkpoint", None, {"checkpoint": url, **({"arch": meta["arch"]} if "arch" in meta else {})})


def _ensemble_from_checkpoints(spec: JobSpec, data: RealData, urls: list[str]) -> Teacher:
    """validate.relabel_checkpoints: one ensemble of the listed teachers (an ensemble listed adds its members)."""
    members, archs = [], []
    for i, url in enumerate(urls):
        try:
            model, meta = _load_model(read_url(url), url, spec, data)
        except CheckpointError as exc:
            raise CheckpointError(f"relabel ensemble member {i + 1}: {exc}") from None
        if isinstance(model, Ensemble):
            members += list(model.members)
            archs += model.archs
        else:
            members.append(model)
            archs.append(meta.get("arch", spec.teacher.arch))
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
        return _from_checkpoint(spec, data, vspec.relabel_checkpoint)
    if spec.method == "sre2l":
        return recovery  # sre2l's recovery teacher is the supervised teacher
    return _cached_or_squeezed(spec, "sre2l", spec.supervised_teacher_digest(), data, cache, runtime, progress, trainers)
