"""Time a loop by its rate: a warm call, a calibration call, then a measured call sized to the budget.

`run(n)` runs the loop for n units (iterations or epochs). The warm call pays the one-time costs
(torch.compile, cuDNN's and the allocator's first calls); the calibration call, as long and warm,
sizes the measured call; the rate is the measured call's units over its seconds. It includes what a
call costs once (drawing the initial noise, copying the result back): about 0.1 s, a few per cent
of a measured call at the GPU sizes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from gpu_check_parts.config import Limits


class Deadline:
    """Seconds left of a part's budget."""

    def __init__(self, seconds: float):
        self._end = time.perf_counter() + seconds

    def left(self) -> float:
        return max(0.0, self._end - time.perf_counter())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[int], object], units: int, device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    run(units)
    synchronize(device)
    return time.perf_counter() - started


@dataclass(frozen=True)
class Measured:
    rate: float  # units per second
    units: int  # units of the measured call
    seconds: float  # of the measured call
    first_call_s: float  # the warm call, with one-time costs (torch.compile, autotuning)
    calibration_s: float  # the calibration call (`warm` units)
    peak_bytes: Optional[int]  # device memory the measured call allocated beyond what was held before it

    def one_time_s(self) -> float:
        """What the first call cost beyond a warm call of the same length (compile time)."""
        return max(0.0, self.first_call_s - self.calibration_s)


def measure(run: Callable[[int], object], device: torch.device, limits: Limits, share_s: float,
            warm: Optional[int] = None) -> Measured:
    """Rate of `run` in units per second, its measured call sized to `share_s` seconds."""
    warm = warm or limits.warm_iterations
    first = timed(run, warm, device)
    calibration = timed(run, warm, device)
    per_unit = calibration / warm
    units = int(min(limits.max_iterations, max(limits.min_iterations, share_s / per_unit)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    seconds = timed(run, units, device)
    peak = torch.cuda.max_memory_allocated(device) - held if device.type == "cuda" else None
    return Measured(units / seconds, units, seconds, first, calibration, peak)
