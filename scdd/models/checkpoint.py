"""Save and load model checkpoints: scdd's own, and the files users have.

Files are read with `torch.load(weights_only=True)` (tensors and plain containers only, so a file cannot
run code) with one class allowed besides: `argparse.Namespace`, in which torchvision's reference script
stores its arguments. Formats, told apart by their keys:

  scdd              {"state_dict", "arch", "num_classes", "in_channels", "image_size", "mean"?, "std"?, ...}:
                    names its model and the data it was made for (`is_scdd_checkpoint`, `model_from_checkpoint`)
  MoCo linear eval  {"arch": "resnet50", "state_dict": {"module.<key>": ...}, "epoch", "best_acc1", "optimizer"}
                    (main_lincls.py of facebookresearch/moco and moco-v3)
  torchvision       {"model": <state dict>, "args": Namespace(model="resnet50", ...), "optimizer", "lr_scheduler",
                    "epoch", "model_ema"?, "scaler"?} (references/classification/train.py)
  bare              a state dict, or one under "state_dict" / "model" / "model_state_dict"
DataParallel/DDP `module.` prefixes are dropped. A foreign file's architecture name (`named_arch`) is mapped
to the registry (`registry_arch`); `load_foreign` loads it into that model or the one the job names.
"""

from __future__ import annotations

import argparse
import io
import re
import threading
from typing import Any, Callable

import torch
from torch import nn

from scdd.errors import CheckpointError

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
SHAPE_KEYS = ("num_classes", "in_channels", "image_size")
_SAFE_GLOBALS_LOCK = threading.Lock()  # torch's safe_globals context swaps a process-wide list


def _show(keys: list[str], limit: int = 8) -> str:
    return (", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")) if keys else "none"


def top_level_keys(obj: dict) -> str:
    return _show([str(k) for k in obj])


def _torch_load(data: bytes) -> Any:
    serialization = torch.serialization
    if hasattr(serialization, "safe_globals"):  # torch >= 2.5
        with _SAFE_GLOBALS_LOCK, serialization.safe_globals([argparse.Namespace]):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if hasattr(serialization, "add_safe_globals"):
        serialization.add_safe_globals([argparse.Namespace])
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def read_checkpoint(data: bytes, source: str) -> dict[str, Any]:
    try:
        obj = _torch_load(data)
    except Exception as exc:  # torch raises many types for a bad file
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused:
            raise CheckpointError(
                f"cannot read checkpoint {source}: it holds a pickled {refused.group(1)} object, and scdd reads only "
                f"tensors, plain containers and argparse.Namespace (torch.load weights_only, so a file cannot run "
                f"code); save the weights alone: torch.save({{'state_dict': model.state_dict()}}, path)") from None
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
        why = next((line for line in lines if line.startswith("WeightsUnpickler error:")), lines[0])
        raise CheckpointError(
            f"cannot read checkpoint {source}: {type(exc).__name__}: {why[:200]}; pass a file written by torch.save"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {source} holds a {type(obj).__name__}, not a state dict")
    return obj


def extract_state_dict(obj: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    top = obj
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(
            f"checkpoint {source} holds no tensors (its top-level keys: {top_level_keys(top)}); expected a state dict, "
            f"bare or under {' / '.join(_WRAPPER_KEYS)}")
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
        return _show(keys, 10)

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


def is_scdd_checkpoint(obj: dict[str, Any]) -> bool:
    """A file scdd saved: it names its model and the shape it was built for (a foreign file may name an arch only)."""
    return "arch" in obj and all(key in obj for key in SHAPE_KEYS)


def named_arch(obj: dict[str, Any]) -> str | None:
    """The architecture a foreign checkpoint names: `arch` (MoCo's main_lincls), `args.model` (torchvision's
    reference script); None where it names none."""
    if isinstance(obj.get("arch"), str):
        return obj["arch"]
    model = getattr(obj.get("args"), "model", None) if isinstance(obj.get("args"), argparse.Namespace) else None
    return model if isinstance(model, str) else None


def registry_arch(name: str) -> str | None:
    """The registry model a checkpoint's architecture name stands for (torchvision's names where they differ)."""
    from scdd.models.registry import MODELS
    from scdd.models.torchvision_models import TORCHVISION_NAMES

    return name if name in MODELS else TORCHVISION_NAMES.get(name)


def load_foreign(obj: dict[str, Any], source: str, build: Callable[[str], nn.Module], job_arch: str,
                 job_field: str, job_first: bool = False, fix_field: str | None = None) -> tuple[nn.Module, str]:
    """A checkpoint scdd did not save, loaded into a model `build(arch)` makes; returns it and the arch. The arch is
    the one the file names if the registry holds it and the weights fit it, else `job_arch` (the spec's
    `job_field`, e.g. "teacher.arch (--teacher-arch)"); with `job_first` (a name the user gave, not a default),
    `job_arch` where the weights fit it, else the file's. An error suggests setting `fix_field` (default: job_field)."""
    from scdd.models.registry import MODELS

    named = named_arch(obj)
    state = extract_state_dict(obj, source)
    mapped = registry_arch(named) if named else None
    errors: list[CheckpointError] = []
    for arch in dict.fromkeys(a for a in ((job_arch, mapped) if job_first else (mapped, job_arch)) if a):
        model = build(arch)
        named_by = "the file" if arch == mapped else job_field
        hint = f"Check the architecture ({arch}, named by {named_by}), the class count and the input channels"
        if any(k.startswith(("encoder_q.", "base_encoder.")) for k in state):
            hint += "; a MoCo pretraining checkpoint goes in teacher.ssl.checkpoint (method scdd)"
        try:
            check_fits(model, state, f"checkpoint {source} for a {arch}", hint)
        except CheckpointError as exc:
            errors.append(exc)
            continue
        model.load_state_dict(state)
        return model, arch
    if named and not mapped:
        raise CheckpointError(
            f"checkpoint {source} names the architecture {named!r}, which the model registry does not hold, and its "
            f"weights do not fit {job_arch} ({job_field}) either; set {fix_field or job_field} to the registry model "
            f"it is (one of: {', '.join(MODELS.names())})")
    raise errors[0]


def model_from_checkpoint(data: bytes, source: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from one of our checkpoints, whose metadata names the architecture and shape (an
    ensemble's: its members, scdd/models/ensemble.py)."""
    return scdd_model(read_checkpoint(data, source), source)


def scdd_model(obj: dict[str, Any], source: str) -> tuple[nn.Module, dict[str, Any]]:
    """`model_from_checkpoint` of a file already read."""
    from scdd.models.ensemble import ENSEMBLE, blank_ensemble
    from scdd.models.registry import create_model

    meta = {k: v for k, v in obj.items() if k not in _WRAPPER_KEYS}
    needed = ("arch", *SHAPE_KEYS)
    if not is_scdd_checkpoint(obj):
        raise CheckpointError(
            f"checkpoint {source} lacks the metadata {', '.join(needed)} that names its model (its top-level keys: "
            f"{top_level_keys(obj)}); save it with scdd")
    shape = tuple(meta[key] for key in SHAPE_KEYS)
    if meta["arch"] == ENSEMBLE:
        if not isinstance(meta.get("members"), list) or not meta["members"]:
            raise CheckpointError(f"checkpoint {source} is an ensemble without the list of its members; save it with scdd")
        model: nn.Module = blank_ensemble(meta["members"], *shape, conv_statistics=bool(meta.get("conv_statistics")))
    else:
        model = create_model(meta["arch"], *shape)
    state = extract_state_dict(obj, source)
    check_fits(model, state, f"checkpoint {source} for the model",
               "Check the architecture, class count and input channels")
    model.load_state_dict(state)
    return model, meta
