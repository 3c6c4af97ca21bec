"""Device, precision, memory-format and compile choices, resolved once from the resources spec."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from scdd.errors import SpecError

if TYPE_CHECKING:  # annotations only: the compute path imports without pydantic (bench/gpu_check.py)
    from api_schema import ResourcesSpec

# Below this many image-iterations per recover unit, compiling costs more than it saves.
COMPILE_MIN_IMAGE_ITERATIONS = 2000


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None for full precision
    channels_last: bool
    compile: str = "off"  # "on", "off" or "auto" (decided per workload by `should_compile`)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def should_compile(self, image_iterations_per_unit: int) -> bool:
        if self.compile == "auto":
            return image_iterations_per_unit >= COMPILE_MIN_IMAGE_ITERATIONS
        return self.compile == "on"

    def describe(self) -> dict:
        return {
            "device": str(self.device),
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
            "channels_last": self.channels_last,
            "compile": self.compile,
        }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SpecError(f"device {name!r} was asked for but CUDA is not available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SpecError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 compute is native here (otherwise emulated, and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_runtime(spec: ResourcesSpec) -> Runtime:
    """Pick the fast settings; `auto` turns an option on only where bench/recover_speed.py measured it faster."""
    if spec.threads and spec.workers == 1:  # with workers, `threads` is each worker's share (workers/recover.py)
        torch.set_num_threads(spec.threads)
    device = resolve_device(spec.device)
    use_bf16 = spec.amp == "bf16" or (spec.amp == "auto" and fast_bf16(device))
    channels_last = spec.channels_last != "off"
    return Runtime(device=device, amp_dtype=torch.bfloat16 if use_bf16 else None, channels_last=channels_last, compile=spec.compile)


def compiled(model: nn.Module) -> nn.Module:
    """torch.compile, or the model itself (with a warning) where compiling is unavailable."""
    try:
        return torch.compile(model)
    except Exception as exc:  # e.g. no C++ compiler, unsupported Python
        warnings.warn(f"torch.compile unavailable ({exc}); running eagerly", RuntimeWarning, stacklevel=2)
        return model
