"""Split a registry model into backbone and classifier head.

A registry model's classifier is its last `nn.Linear` (`classifier` of the ConvNet, `fc` of the
ResNets, `classifier.1` of MobileNetV2). Replacing it with `nn.Identity` turns the model into a
backbone that returns features (N, D); putting a Linear(D, K) back makes it a classifier again,
so a self-supervised backbone plus a linear probe is an ordinary registry model with an ordinary
state dict.
"""

from __future__ import annotations

from torch import nn


def head_path(model: nn.Module) -> str:
    """Dotted name of the classifier: the last nn.Linear (or the Identity that replaced it)."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier")
    return linears[-1]


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parents, leaf = path.split(".")
    node = model
    for name in parents:
        node = getattr(node, name)
    return node, leaf


def set_head(model: nn.Module, path: str, head: nn.Module) -> None:
    parent, leaf = _parent(model, path)
    setattr(parent, leaf, head)


def strip_head(model: nn.Module) -> tuple[str, int]:
    """Replace the classifier with Identity in place; returns (its path, feature dimension D)."""
    path = head_path(model)
    parent, leaf = _parent(model, path)
    linear = getattr(parent, leaf)
    setattr(parent, leaf, nn.Identity())
    return path, linear.in_features
