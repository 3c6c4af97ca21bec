"""Names a job spec may use. Each set mirrors a registry in `scdd`; a test checks they agree.

The API process validates specs without importing torch, so the names are spelled out here
rather than read from the registries at import time.
"""

from typing import Literal, get_args

DatasetName = Literal["fashion-mnist", "imagefolder"]
MethodName = Literal["scdd", "sre2l"]
InitName = Literal["herding", "kmeans", "noise", "real", "selected"]
SSLMethodName = Literal["moco_v2"]
SSLCheckpointFormat = Literal["auto", "moco_v2", "moco_v3", "dino", "swav", "torchvision"]
ModelName = Literal[
    "convnet",
    "convnet_in",
    "mobilenet_v2",
    "resnet18",
    "resnet18_small",
    "resnet50",
    "resnet50_small",
]

DATASETS: frozenset[str] = frozenset(get_args(DatasetName))
METHODS: frozenset[str] = frozenset(get_args(MethodName))
INITS: frozenset[str] = frozenset(get_args(InitName))
MODELS: frozenset[str] = frozenset(get_args(ModelName))
SSL_METHODS: frozenset[str] = frozenset(get_args(SSLMethodName))
