"""The self-supervised method registry: name -> pretrain(backbone, feature_dim, data, spec, runtime, seed, progress).

A method trains the backbone (a registry model whose classifier is nn.Identity, returning (N, D)
features) on the training images without labels, in place, and returns a dict of facts for the
report. Adding a method (SimCLR, DINO, SwAV) is one module that registers a function here.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from api_schema import SSLSpec
from scdd.data import RealData
from scdd.progress import Progress
from scdd.registry import Registry
from scdd.runtime import Runtime

PretrainFn = Callable[[nn.Module, int, RealData, SSLSpec, Runtime, int, Progress], dict]
SSL_METHODS: Registry[PretrainFn] = Registry("self-supervised method")
register_ssl = SSL_METHODS.register
