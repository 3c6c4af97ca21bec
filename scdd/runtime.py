"""Device, precision and memory-format choices, resolved once from the resources spec."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from api_schema import ResourcesSpec
from scdd.errors import SpecError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None for full precision
    channels_last: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self) -> dict:
        return {
            "device": str(self.device),
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
            "channels_last": self.channels_last,
        }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SpecError(f"device {name!r} was asked for but CUDA is not available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SpecError(
                f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible"
            )
    return device


def resolve_runtime(spec: ResourcesSpec) -> Runtime:
    """Pick the fast settings. `auto` turns an option on only where measurements showed it faster:
    bf16 autocast and channels-last on CUDA (see bench/recover_speed.py for the CPU numbers)."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = resolve_device(spec.device)
    on_cuda = device.type == "cuda"
    if spec.amp == "bf16" or (spec.amp == "auto" and on_cuda and torch.cuda.is_bf16_supported()):
        amp_dtype = torch.bfloat16
    else:
        amp_dtype = None
    channels_last = spec.channels_last == "on" or (spec.channels_last == "auto" and on_cuda)
    return Runtime(device=device, amp_dtype=amp_dtype, channels_last=channels_last)
