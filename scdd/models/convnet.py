"""The ConvNet of dataset-distillation papers (Gidaris & Komodakis 2018; used by DC, DM, MTT).

`depth` blocks of conv3x3(width) -> norm -> ReLU -> avgpool(2), then one linear layer.
Input (N, C, S, S) -> logits (N, num_classes); the feature map is S / 2**depth (floored) wide.
"""

from __future__ import annotations

from torch import nn

from scdd.models.registry import register_model


def _norm(kind: str, width: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(width)
    if kind == "instance":  # instance norm with affine parameters, as GroupNorm(width, width) in the DC code
        return nn.GroupNorm(width, width, affine=True)
    raise ValueError(f"unknown norm {kind!r}")


class ConvNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: int = 128, depth: int = 3, norm: str = "batch"):
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1), _norm(norm, width), nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            channels, size = width, size // 2
        if size < 1:
            raise ValueError(f"image size {image_size} is too small for a ConvNet of depth {depth}")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


@register_model("convnet")
def convnet(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """ConvNet-D3-W128 with BatchNorm: a recovery teacher (its BN statistics are what recover matches)."""
    return ConvNet(num_classes, in_channels, image_size, norm="batch")


@register_model("convnet_d1_w32")
def convnet_d1_w32(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """ConvNet-D1-W32 with BatchNorm: a small, fast backbone of a G-VBSM ensemble."""
    return ConvNet(num_classes, in_channels, image_size, width=32, depth=1, norm="batch")


@register_model("convnet_d2_w32")
def convnet_d2_w32(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """ConvNet-D2-W32 with BatchNorm: a small, fast backbone of a G-VBSM ensemble."""
    return ConvNet(num_classes, in_channels, image_size, width=32, depth=2, norm="batch")


@register_model("convnet_in")
def convnet_in(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """ConvNet-D3-W128 with instance norm: the evaluation network of classic distillation papers."""
    return ConvNet(num_classes, in_channels, image_size, norm="instance")
