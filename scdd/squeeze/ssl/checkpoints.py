"""Import self-supervised checkpoints into a registry backbone.

Formats (detected from the file, or named in the spec):
  moco_v2      {"state_dict": {"module.encoder_q.<backbone key>": ...}}; encoder_k and queue ignored
  moco_v3      {"state_dict": {"module.base_encoder.<backbone key>": ...}}; momentum encoder and predictor ignored
  dino         {"teacher": {"backbone.<key>" | "module.backbone.<key>": ...}, "student": {...}}; the teacher is used
  swav         {"module.<key>": ...} or {"state_dict": ...}; "projection_head" and "prototypes" dropped
  torchvision  a plain state dict (optionally under "state_dict", or "model" as torchvision's reference script
               saves it, optionally with "module."); a MoCo linear-eval file (main_lincls.py) reads as this
Projection heads sit where the classifier was (e.g. MoCo's `fc` MLP) and are dropped with it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scdd.errors import CheckpointError
from scdd.models.checkpoint import check_fits, read_checkpoint, top_level_keys

FORMATS = ("moco_v2", "moco_v3", "dino", "swav", "torchvision")


def _tensors(obj: Any) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}


def detect_format(obj: dict) -> str:
    if isinstance(obj.get("teacher"), dict) or isinstance(obj.get("student"), dict):
        return "dino"
    keys = list(_tensors(obj))
    if any(k.startswith("module.encoder_q.") for k in keys):
        return "moco_v2"
    if any(k.startswith("module.base_encoder.") for k in keys):
        return "moco_v3"
    if any("prototypes" in k or "projection_head" in k for k in keys):
        return "swav"
    return "torchvision"


def _with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _strip_module(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def backbone_state(obj: dict, fmt: str, source: str) -> dict[str, torch.Tensor]:
    """The backbone's weights in the checkpoint, keyed as in the registry model (head keys included)."""
    if fmt == "moco_v2":
        state = _with_prefix(_tensors(obj), "module.encoder_q.")
    elif fmt == "moco_v3":
        state = _with_prefix(_tensors(obj), "module.base_encoder.")
    elif fmt == "dino":
        part = obj.get("teacher") if isinstance(obj.get("teacher"), dict) else obj.get("student")
        state = _with_prefix(_strip_module(_tensors(part or {})), "backbone.")
    elif fmt == "swav":
        state = {k: v for k, v in _strip_module(_tensors(obj)).items()
                 if not k.startswith(("projection_head.", "prototypes."))}
    elif fmt == "torchvision":
        state = _strip_module(_tensors(obj))
    else:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; use one of: auto, {', '.join(FORMATS)}")
    if not state:
        raise CheckpointError(
            f"checkpoint {source} holds no backbone weights in the {fmt} layout (its top-level keys: "
            f"{top_level_keys(obj)}); check the file or name its format (checkpoint_format: {', '.join(FORMATS)})"
        )
    return state


def import_backbone(backbone: nn.Module, head: str, data: bytes, source: str, fmt: str = "auto") -> str:
    """Load a self-supervised checkpoint into `backbone` (its classifier at `head` replaced by
    Identity); returns the format used. Keys under `head` (projection heads) are dropped."""
    obj = read_checkpoint(data, source)
    fmt = detect_format(obj) if fmt == "auto" else fmt
    state = {k: v for k, v in backbone_state(obj, fmt, source).items() if not k.startswith(head + ".")}
    check_fits(backbone, state, f"{fmt} checkpoint {source} for the backbone",
               "Check teacher.arch, the input channels and teacher.ssl.checkpoint_format")
    backbone.load_state_dict(state)
    return fmt
