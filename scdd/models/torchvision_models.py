"""torchvision architectures (randomly initialised; nothing is downloaded), and small-image variants.

The small variants (`*_small`) replace the strided stem (ResNet: the 7x7/2 conv and the max-pool;
MobileNetV2: the 3x3/2 conv) with a 3x3/1 one, the usual choice for inputs of 64 px or less (CIFAR,
Tiny-ImageNet, Fashion-MNIST). Every model here runs from 28 px up: the others downsample 32x and end
at 1x1 on 28-32 px inputs (DenseNet-121's transition pools round up, so its odd-sized maps do not
collapse to nothing; on even sizes, 32 and 224 px, it is torchvision's network exactly).
A model's state dict has torchvision's keys, so torchvision checkpoints of the same name load into it
(`TORCHVISION_NAMES` maps the names that differ).
"""

from __future__ import annotations

from typing import Callable

from torch import nn
from torchvision import models as tvm

from scdd.models.registry import register_model

# torchvision's names for registry models whose name differs (a checkpoint's `arch` / `args.model`).
TORCHVISION_NAMES = {"shufflenet_v2_x1_0": "shufflenet_v2"}


def _first_conv_for(conv: nn.Conv2d, in_channels: int, kernel: int | None = None, stride: int | None = None) -> nn.Conv2d:
    kernel = kernel or conv.kernel_size[0]
    stride = stride or conv.stride[0]
    return nn.Conv2d(in_channels, conv.out_channels, kernel, stride=stride, padding=kernel // 2, bias=conv.bias is not None)


def _resnet(builder, num_classes: int, in_channels: int, small: bool) -> nn.Module:
    model = builder(weights=None, num_classes=num_classes)
    if small:
        model.conv1 = _first_conv_for(model.conv1, in_channels, kernel=3, stride=1)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = _first_conv_for(model.conv1, in_channels)
    return model


def _with_stem(builder: Callable[..., nn.Module], stem: Callable[[nn.Module], tuple[nn.Module, str | int]],
               num_classes: int, in_channels: int, stride: int | None = None) -> nn.Module:
    """torchvision's `builder` model with its first conv (`stem(model)` gives its parent and its name in it)
    replaced where the input channels or the stride differ from torchvision's."""
    model = builder(weights=None, num_classes=num_classes)
    parent, name = stem(model)
    conv = parent[name] if isinstance(name, int) else getattr(parent, name)
    if in_channels != conv.in_channels or (stride is not None and stride != conv.stride[0]):
        conv = _first_conv_for(conv, in_channels, stride=stride)
        if isinstance(name, int):
            parent[name] = conv
        else:
            setattr(parent, name, conv)
    return model


@register_model("resnet18")
def resnet18(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _resnet(tvm.resnet18, num_classes, in_channels, small=False)


@register_model("resnet50")
def resnet50(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _resnet(tvm.resnet50, num_classes, in_channels, small=False)


@register_model("resnet101")
def resnet101(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _resnet(tvm.resnet101, num_classes, in_channels, small=False)


@register_model("resnet18_small")
def resnet18_small(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _resnet(tvm.resnet18, num_classes, in_channels, small=True)


@register_model("resnet50_small")
def resnet50_small(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _resnet(tvm.resnet50, num_classes, in_channels, small=True)


@register_model("mobilenet_v2")
def mobilenet_v2(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _with_stem(tvm.mobilenet_v2, lambda m: (m.features[0], 0), num_classes, in_channels)


@register_model("mobilenet_v2_small")
def mobilenet_v2_small(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """MobileNetV2 with a 3x3/1 stem (CIFAR variants): 16x downsampling; a mobilenet_v2 state dict fits it."""
    return _with_stem(tvm.mobilenet_v2, lambda m: (m.features[0], 0), num_classes, in_channels, stride=1)


@register_model("densenet121")
def densenet121(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    model = _with_stem(tvm.densenet121, lambda m: (m.features, "conv0"), num_classes, in_channels)
    for module in model.modules():
        if isinstance(module, nn.AvgPool2d):  # the transitions: 7 px -> 4, not 3 (28 px inputs)
            module.ceil_mode = True
    return model


@register_model("efficientnet_b0")
def efficientnet_b0(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _with_stem(tvm.efficientnet_b0, lambda m: (m.features[0], 0), num_classes, in_channels)


@register_model("shufflenet_v2")
def shufflenet_v2(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """ShuffleNetV2 x1.0."""
    return _with_stem(tvm.shufflenet_v2_x1_0, lambda m: (m.conv1, 0), num_classes, in_channels)


@register_model("regnet_y_400mf")
def regnet_y_400mf(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _with_stem(tvm.regnet_y_400mf, lambda m: (m.stem, 0), num_classes, in_channels)
