"""The method registry: each method's squeeze turns real data into a recovery teacher.

A squeeze returns the teacher (a registry model, or for G-VBSM an `Ensemble` of them carrying its
convolution statistics; eval mode) and facts about how it was made. The probe of SC-DD and G-VBSM's
statistics pass always run in the calling process (a linear layer on precomputed features; one pass
over the real images per backbone); the supervised and self-supervised training loops run where
`trainers` says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from api_schema import TeacherSpec
from scdd.data import RealData
from scdd.models import Ensemble, create_model, set_head, strip_head
from scdd.progress import Progress
from scdd.registry import Registry
from scdd.runtime import Runtime
from scdd.squeeze.conv_stats import collect_conv_statistics
from scdd.squeeze.probe import train_probe
from scdd.squeeze.ssl import SSL_METHODS, import_backbone
from scdd.squeeze.ssl.registry import PretrainFn
from scdd.squeeze.supervised import train_supervised
from scdd.store import read_url


@dataclass
class SqueezeResult:
    model: nn.Module
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Trainers:
    """Where squeeze's training loops run: in this process (the defaults), or data-parallel on a
    cluster (workers/train.py builds one). Each has the signature of the in-process function and
    trains the module it is given in place."""

    supervised: Callable[..., nn.Module] = train_supervised
    ssl: Callable[[str], PretrainFn] = SSL_METHODS.get


LOCAL_TRAINERS = Trainers()
SqueezeFn = Callable[[RealData, TeacherSpec, Runtime, int, Progress, Trainers], SqueezeResult]
METHODS: Registry[SqueezeFn] = Registry("method")
register_method = METHODS.register


@register_method("sre2l")
def sre2l(data: RealData, spec: TeacherSpec, runtime: Runtime, seed: int, progress: Progress,
          trainers: Trainers = LOCAL_TRAINERS) -> SqueezeResult:
    """SRe2L (arXiv 2306.13092): a teacher trained with labels."""
    info = data.info
    model = create_model(spec.arch, info.num_classes, info.channels, info.image_size)
    return SqueezeResult(trainers.supervised(model, data, spec, runtime, seed, progress), {"kind": "supervised"})


@register_method("scdd")
def scdd(data: RealData, spec: TeacherSpec, runtime: Runtime, seed: int, progress: Progress,
         trainers: Trainers = LOCAL_TRAINERS) -> SqueezeResult:
    """SC-DD (arXiv 2404.07976): a self-supervised backbone, frozen, plus a linear probe."""
    info = data.info
    model = create_model(spec.arch, info.num_classes, info.channels, info.image_size)
    head, feature_dim = strip_head(model)
    ssl = spec.ssl
    if ssl.checkpoint:
        fmt = import_backbone(model, head, read_url(ssl.checkpoint), ssl.checkpoint, ssl.checkpoint_format)
        ssl_details = {"source": "checkpoint", "checkpoint": ssl.checkpoint, "format": fmt}
        model.to(runtime.device, memory_format=runtime.memory_format())
    else:
        ssl_details = {"source": "pretrained", **trainers.ssl(ssl.method)(model, feature_dim, data, ssl, runtime, seed, progress)}
    probe = train_probe(model, data, spec.probe, runtime, seed, progress)
    set_head(model, head, probe.head.to(runtime.device))
    return SqueezeResult(model.eval(), {"kind": "self-supervised + linear probe", "ssl": ssl_details,
                                        "probe": {"epochs": spec.probe.epochs, **probe.accuracy.to_dict()}})


@register_method("gvbsm")
def gvbsm(data: RealData, spec: TeacherSpec, runtime: Runtime, seed: int, progress: Progress,
          trainers: Trainers = LOCAL_TRAINERS) -> SqueezeResult:
    """G-VBSM (arXiv 2311.17950): the backbones of `spec.ensemble`, each trained with labels like a
    supervised teacher, and the real-data statistics of each one's convolution inputs."""
    info = data.info
    members = []
    for arch in spec.ensemble:
        model = create_model(arch, info.num_classes, info.channels, info.image_size)
        members.append(trainers.supervised(model, data, spec.model_copy(update={"arch": arch}), runtime, seed, progress))
    ensemble = Ensemble(members, list(spec.ensemble), conv_statistics=True).to(runtime.device)
    for member, statistics in zip(ensemble.members, ensemble.conv_statistics):
        collect_conv_statistics(member, statistics, data, runtime)
    return SqueezeResult(ensemble.eval(), {"kind": "ensemble of supervised backbones (G-VBSM)"})
