"""The model registry: `create_model(name, num_classes, in_channels, image_size)`."""

from __future__ import annotations

from typing import Callable

from torch import nn

from scdd.registry import Registry

ModelBuilder = Callable[[int, int, int], nn.Module]  # (num_classes, in_channels, image_size) -> model
MODELS: Registry[ModelBuilder] = Registry("model")
register_model = MODELS.register


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 224) -> nn.Module:
    """A new, randomly initialised model; it remembers its name (`registry_name`), which its checkpoints record."""
    model = MODELS.get(name)(num_classes, in_channels, image_size)
    model.registry_name = name
    return model
