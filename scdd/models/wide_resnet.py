"""Wide residual networks (Zagoruyko & Komodakis 2016, arXiv 1605.07146) for small images: WRN-16-2.

Pre-activation basic blocks (BN -> ReLU -> conv3x3, twice) in three groups of widths 16k, 32k, 64k
(k the widening factor), the second and third starting with stride 2; a 1x1 convolution on the
shortcut where the shape changes; BN -> ReLU -> global average pool -> linear. Depth 16 gives two
blocks per group. A backbone of G-VBSM's ensemble on CIFAR.
"""

from __future__ import annotations

from torch import nn

from scdd.models.registry import register_model


class _Block(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
                         if stride != 1 or in_channels != out_channels else None)

    def forward(self, x):
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        return out + (self.shortcut(pre) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, depth: int = 16, widen: int = 2):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        layers: list[nn.Module] = []
        channels = widths[0]
        for group, width in enumerate(widths[1:]):
            for b in range(blocks):
                layers.append(_Block(channels, width, 2 if group > 0 and b == 0 else 1))
                channels = width
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.bn(self.blocks(self.conv1(x))))).flatten(1))


@register_model("wrn16_2")
def wrn16_2(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """WRN-16-2 (0.7 M parameters): a backbone of a G-VBSM ensemble."""
    return WideResNet(num_classes, in_channels, depth=16, widen=2)
