"""Names a job spec may use. Each set mirrors a registry in `scdd`; a test checks they agree.

The API process validates specs without importing torch, so the names are spelled out here
rather than read from the registries at import time.
"""

from typing import Literal, get_args

DatasetName = Literal["fashion-mnist", "imagefolder"]
MethodName = Literal["gvbsm", "scdd", "sre2l"]
InitName = Literal["herding", "kmeans", "noise", "real", "selected"]
SSLMethodName = Literal["moco_v2"]
JobKind = Literal["distill", "evaluate"]
RecipeName = Literal["scdd-cifar100", "scdd-imagenet", "sre2l-cifar", "sre2l-imagenet", "sre2l-tiny-imagenet"]
SSLCheckpointFormat = Literal["auto", "moco_v2", "moco_v3", "dino", "swav", "torchvision"]
ModelName = Literal[
    "convnet",
    "convnet_d1_w32",
    "convnet_d2_w32",
    "convnet_in",
    "densenet121",
    "efficientnet_b0",
    "mobilenet_v2",
    "mobilenet_v2_small",
    "regnet_y_400mf",
    "resnet101",
    "resnet18",
    "resnet18_small",
    "resnet50",
    "resnet50_small",
    "shufflenet_v2",
    "wrn16_2",
]
# Registry models without a BatchNorm2d layer: they cannot be a backbone whose statistics recovery matches.
MODELS_WITHOUT_BATCHNORM: frozenset[str] = frozenset({"convnet_in"})

DATASETS: frozenset[str] = frozenset(get_args(DatasetName))
METHODS: frozenset[str] = frozenset(get_args(MethodName))
INITS: frozenset[str] = frozenset(get_args(InitName))
MODELS: frozenset[str] = frozenset(get_args(ModelName))
RECIPES: frozenset[str] = frozenset(get_args(RecipeName))
SSL_METHODS: frozenset[str] = frozenset(get_args(SSLMethodName))
