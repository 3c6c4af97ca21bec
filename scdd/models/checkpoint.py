"""Save and load model checkpoints, tolerant of the common wrappings.

Accepted files: a plain state dict, `{"state_dict": ...}` or `{"model": ...}` (ours adds metadata
beside it), with or without DataParallel/DDP `module.` prefixes.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn

from scdd.errors import CheckpointError

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


def read_checkpoint(data: bytes, source: str) -> dict[str, Any]:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise CheckpointError(
            f"cannot read checkpoint {source}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}; "
            f"pass a file written by torch.save"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {source} holds a {type(obj).__name__}, not a state dict")
    return obj


def extract_state_dict(obj: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"checkpoint {source} holds no tensors; expected a state dict")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], what: str, hint: str) -> None:
    """Raise a CheckpointError listing missing, unexpected and mis-shaped keys, if there are any."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if not (missing or unexpected or mismatched):
        return

    def show(keys: list[str]) -> str:
        return (", ".join(keys[:10]) + (f" ... ({len(keys)} in all)" if len(keys) > 10 else "")) if keys else "none"

    raise CheckpointError(
        f"{what} does not fit: missing keys: {show(missing)}; unexpected keys: {show(unexpected)}; "
        f"shape mismatches: {show(mismatched)}. {hint}"
    )


def load_weights(model: nn.Module, data: bytes, source: str) -> dict[str, Any]:
    """Load a checkpoint into `model` strictly; returns the file's other entries (metadata)."""
    obj = read_checkpoint(data, source)
    state = extract_state_dict(obj, source)
    check_fits(model, state, f"checkpoint {source} for the model", "Check the architecture, class count and input channels")
    model.load_state_dict(state)
    return {k: v for k, v in obj.items() if k not in _WRAPPER_KEYS}


def checkpoint_bytes(model: nn.Module, **metadata: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), **metadata}, buffer)
    return buffer.getvalue()


def model_from_checkpoint(data: bytes, source: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from one of our checkpoints, whose metadata names the architecture and shape (an
    ensemble's: its members, scdd/models/ensemble.py)."""
    from scdd.models.ensemble import ENSEMBLE, blank_ensemble
    from scdd.models.registry import create_model

    meta = {k: v for k, v in read_checkpoint(data, source).items() if k not in _WRAPPER_KEYS}
    needed = ("arch", "num_classes", "in_channels", "image_size")
    if any(key not in meta for key in needed):
        raise CheckpointError(f"checkpoint {source} lacks the metadata {needed} that names its model; save it with scdd")
    shape = (meta["num_classes"], meta["in_channels"], meta["image_size"])
    if meta["arch"] == ENSEMBLE:
        if not isinstance(meta.get("members"), list) or not meta["members"]:
            raise CheckpointError(f"checkpoint {source} is an ensemble without the list of its members; save it with scdd")
        model: nn.Module = blank_ensemble(meta["members"], *shape, conv_statistics=bool(meta.get("conv_statistics")))
    else:
        model = create_model(meta["arch"], *shape)
    load_weights(model, data, source)
    return model, meta
