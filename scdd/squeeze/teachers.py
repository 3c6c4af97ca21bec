"""Obtain the teachers a job needs: from a given checkpoint, from the cache, or by squeezing.

Trained teachers are cached under the hash of the spec fields that determine them
(`JobSpec.teacher_digest`, `JobSpec.supervised_teacher_digest`), so a second job with the same
squeeze settings reuses them, and an sre2l job and an scdd job share their supervised teacher.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from api_schema import JobSpec
from scdd.data import RealData
from scdd.errors import CheckpointError
from scdd.models import checkpoint_bytes, create_model, load_weights, model_from_checkpoint
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


def load_stored_teacher(
    store: ArtifactStore, path: str, digest: str, source: str, spec: JobSpec, data: RealData
) -> Teacher | None:
    """The teacher saved at `path` if it is there and was made for `digest`, else None."""
    if not store.exists(path):
        return None
    model = _blank(spec, data)
    meta = load_weights(model, store.read_bytes(path), store.url_of(path))
    if meta.get("digest") != digest:
        return None
    return Teacher(model.eval(), source, digest, meta.get("details", {}))


class TeacherCache:
    def __init__(self, url: str | None):
        self.store = ArtifactStore(url or default_cache_url())

    def load(self, digest: str, spec: JobSpec, data: RealData) -> Teacher | None:
        return load_stored_teacher(self.store, f"{digest}.pt", digest, "cached", spec, data)

    def save(self, digest: str, model: nn.Module, details: dict) -> None:
        self.store.write_bytes(f"{digest}.pt", checkpoint_bytes(model, digest=digest, details=details))


def _from_checkpoint(spec: JobSpec, data: RealData, url: str, raw: bytes | None = None) -> Teacher:
    model = _blank(spec, data)
    load_weights(model, read_url(url) if raw is None else raw, url)
    return Teacher(model.eval(), "checkpoint", None, {"checkpoint": url})


def _relabel_from_checkpoint(spec: JobSpec, data: RealData, url: str) -> Teacher:
    """A relabel teacher of any architecture: a checkpoint scdd saved (teacher.pt of a run) names its model,
    so soft labels can come from another architecture than the recovery teacher's; a bare state dict is
    loaded into `teacher.arch`."""
    raw = read_url(url)
    meta = read_checkpoint(raw, url)
    if "arch" not in meta:
        return _from_checkpoint(spec, data, url, raw)
    info = data.info
    shape = (meta.get("num_classes"), meta.get("in_channels"), meta.get("image_size"))
    if shape != (info.num_classes, info.channels, info.image_size):
        raise CheckpointError(
            f"relabel checkpoint {url} is a {meta['arch']} for {shape[0]} classes, {shape[1]} channels, "
            f"{shape[2]} px, but the dataset has {info.num_classes} classes, {info.channels} channels, "
            f"{info.image_size} px: pass a teacher trained on this dataset (the same classes and image size)")
    model, _ = model_from_checkpoint(raw, url)
    return Teacher(model.eval(), "checkpoint", None, {"checkpoint": url, "arch": meta["arch"]})


def _cached_or_squeezed(
    spec: JobSpec, method: str, digest: str, data: RealData, cache: TeacherCache, runtime: Runtime, progress: Progress,
    trainers: Trainers,
) -> Teacher:
    cached = cache.load(digest, spec, data)
    if cached is not None:
        return cached
    result = METHODS.get(method)(data, spec.teacher, runtime, spec.seed, progress, trainers)
    cache.save(digest, result.model, result.details)
    return Teacher(result.model, "trained", digest, result.details)


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
    if vspec.relabel_checkpoint:
        return _relabel_from_checkpoint(spec, data, vspec.relabel_checkpoint)
    if spec.method == "sre2l":
        return recovery  # sre2l's recovery teacher is the supervised teacher
    return _cached_or_squeezed(spec, "sre2l", spec.supervised_teacher_digest(), data, cache, runtime, progress, trainers)
