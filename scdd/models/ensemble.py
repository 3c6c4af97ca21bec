"""An ensemble of registry models (G-VBSM's backbones; the ensemble relabel teacher), and the real-data
statistics of each member's convolution inputs, stored with it.

`Ensemble(members)` returns the mean of its members' logits. `ConvStatistics` holds, for every
`nn.Conv2d` of one member in module order, the per-channel mean and biased variance of that
convolution's input over a real dataset (buffers, so they travel in the state dict and a checkpoint).
A checkpoint of an ensemble names its members (`model_metadata`), so `model_from_checkpoint` rebuilds it.
"""

from __future__ import annotations

import torch
from torch import nn

ENSEMBLE = "ensemble"


def conv_layers(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


class ConvStatistics(nn.Module):
    """Targets of the convolution-statistic loss of one member: `mean_i`, `var_i` (C_in,) per convolution i."""

    def __init__(self, member: nn.Module):
        super().__init__()
        self.count = len(conv_layers(member))
        for i, conv in enumerate(conv_layers(member)):
            self.register_buffer(f"mean_{i}", torch.zeros(conv.in_channels))
            self.register_buffer(f"var_{i}", torch.ones(conv.in_channels))

    def target(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"mean_{index}"), getattr(self, f"var_{index}")


class Ensemble(nn.Module):
    """Registry models with one output: the mean of their logits. With `conv_statistics`, each member has a
    `ConvStatistics` (filled by scdd.squeeze.conv_stats.collect_conv_statistics)."""

    def __init__(self, members: list[nn.Module], archs: list[str], conv_statistics: bool = False):
        super().__init__()
        if not members or len(members) != len(archs):
            raise ValueError("an ensemble needs one or more members, each with its architecture's name")
        self.members = nn.ModuleList(members)
        self.archs = list(archs)
        self.conv_statistics = nn.ModuleList([ConvStatistics(m) for m in members]) if conv_statistics else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x).float() for member in self.members]).mean(0)


def members_of(model: nn.Module) -> list[nn.Module]:
    """The backbones a model is made of: an ensemble's members, else the model itself."""
    return list(model.members) if isinstance(model, Ensemble) else [model]


def model_metadata(model: nn.Module) -> dict:
    """What names a model in a checkpoint: its registry name (and an ensemble's members)."""
    if isinstance(model, Ensemble):
        return {"arch": ENSEMBLE, "members": list(model.archs), "conv_statistics": model.conv_statistics is not None}
    name = getattr(model, "registry_name", None)
    return {"arch": name} if name else {}


def blank_ensemble(archs: list[str], num_classes: int, in_channels: int, image_size: int,
                   conv_statistics: bool = False) -> Ensemble:
    from scdd.models.registry import create_model

    members = [create_model(a, num_classes, in_channels, image_size) for a in archs]
    return Ensemble(members, archs, conv_statistics)
