"""torchvision architectures (randomly initialised; nothing is downloaded), and small-image ResNets.

The small variants (`*_small`) replace the 7x7/2 stem and max-pool with a 3x3/1 stem, the usual
choice for inputs of 64 px or less (CIFAR, Tiny-ImageNet, Fashion-MNIST).
"""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from scdd.models.registry import register_model


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


@register_model("resnet18")
def resnet18(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _resnet(tvm.resnet18, num_classes, in_channels, small=False)


@register_model("resnet50")
def resnet50(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _resnet(tvm.resnet50, num_classes, in_channels, small=False)


@register_model("resnet18_small")
def resnet18_small(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _resnet(tvm.resnet18, num_classes, in_channels, small=True)


@register_model("resnet50_small")
def resnet50_small(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _resnet(tvm.resnet50, num_classes, in_channels, small=True)


@register_model("mobilenet_v2")
def mobilenet_v2(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    model = tvm.mobilenet_v2(weights=None, num_classes=num_classes)
    if in_channels != 3:
        stem = model.features[0][0]
        model.features[0][0] = _first_conv_for(stem, in_channels)
    return model
