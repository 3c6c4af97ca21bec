"""Per-layer summary of a teacher's BatchNorm running variance.

SC-DD's observation (arXiv 2404.07976, Sec. 3): the BN statistics of self-supervised models vary
more across channels than those of supervised ones, so they carry more information for recovery.
The report shows these numbers for every method so users can see it on their data.
"""

from __future__ import annotations

from torch import nn

from scdd.recover.bn_loss import bn_layers


def bn_variance_summary(model: nn.Module) -> list[dict]:
    rows = []
    names = {id(m): name for name, m in model.named_modules()}
    for layer in bn_layers(model):
        var = layer.running_var.detach().float().cpu()
        rows.append({
            "layer": names.get(id(layer), "?"),
            "channels": var.numel(),
            "mean": round(float(var.mean()), 6),
            "std": round(float(var.std()), 6) if var.numel() > 1 else 0.0,
            "min": round(float(var.min()), 6),
            "max": round(float(var.max()), 6),
        })
    return rows
