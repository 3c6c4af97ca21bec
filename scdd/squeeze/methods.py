"""The method registry: each method's squeeze turns real data into a recovery teacher."""

from __future__ import annotations

from typing import Callable

from torch import nn

from api_schema import TeacherSpec
from scdd.data import RealData
from scdd.models import create_model
from scdd.progress import Progress
from scdd.registry import Registry
from scdd.runtime import Runtime
from scdd.squeeze.supervised import train_supervised

SqueezeFn = Callable[[RealData, TeacherSpec, Runtime, int, Progress], nn.Module]
METHODS: Registry[SqueezeFn] = Registry("method")
register_method = METHODS.register


@register_method("sre2l")
def sre2l(data: RealData, spec: TeacherSpec, runtime: Runtime, seed: int, progress: Progress) -> nn.Module:
    """SRe2L (arXiv 2306.13092): a teacher trained with labels."""
    info = data.info
    model = create_model(spec.arch, info.num_classes, info.channels, info.image_size)
    return train_supervised(model, data, spec, runtime, seed, progress)
