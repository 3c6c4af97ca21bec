"""Recover throughput of one teacher: the published loop, scdd in fp32 eager, scdd with `auto` options.

  yardstick  bench/published_loop.py (SRe2L as published: fp32, eager, one crop per batch)
  fp32       scdd's loop (scdd.recover.synthesize), fp32, eager, contiguous
  auto       scdd's loop with what ResourcesSpec's defaults (amp, channels_last, compile: auto)
             resolve to on this device, compiled where the shape's workload is large enough to pay

All three run the same batch (one image of each of `batch` classes) from the same noise under the
published settings (lr 0.25, r_bn 0.01). The yardstick and fp32 rows run before `auto`, so a slow
compile cannot take their numbers away.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

from gpu_check_parts.config import PUBLISHED_LR, PUBLISHED_R_BN, CheckConfig, ModelPlan, Shape
from gpu_check_parts.flops import recover_flops_per_image
from gpu_check_parts.measure import Deadline, Measured, measure
from gpu_check_parts.report import PartFailed, Row, one_line
from gpu_check_parts.specs import section
from gpu_check_parts.teachers import synthetic_info, synthetic_teacher
from published_loop import yardstick
from scdd.recover import BNStatLoss, prepare_teacher, synthesize
from scdd.recover.synthesize import jitter_pixels
from scdd.runtime import Runtime, resolve_runtime

MIB = 2**20
Loop = Callable[[int], object]  # runs the loop for n iterations


def recover_spec(iterations: int, batch: int) -> SimpleNamespace:
    """RecoverSpec's defaults (noise init) with the published lr and BN weight."""
    return section("RecoverSpec", init="noise", iterations=iterations, batch_size=batch, lr=PUBLISHED_LR,
                   r_bn=PUBLISHED_R_BN)


def auto_runtime(device: torch.device) -> Runtime:
    """What ResourcesSpec's defaults (amp, channels_last, compile: auto) resolve to on `device`."""
    return resolve_runtime(section("ResourcesSpec", device=str(device)))


def describe(runtime: Runtime, compiled: bool) -> str:
    amp = str(runtime.amp_dtype).replace("torch.", "") if runtime.amp_dtype else "fp32"
    parts = [amp, "channels-last" if runtime.channels_last else "contiguous", "compiled" if compiled else "eager"]
    return ", ".join(parts)


class RecoverBench:
    """One synthetic teacher of `shape` and the loops that recover a batch through it."""

    def __init__(self, cfg: CheckConfig, shape: Shape, arch: str):
        self.cfg, self.shape = cfg, shape
        self.teacher: nn.Module = synthetic_teacher(arch, shape, cfg.limits, cfg.device, cfg.seed)
        self.image_shape = (3, shape.image_size, shape.image_size)
        self.bounds = synthetic_info(shape).pixel_bounds()
        self.targets = torch.arange(cfg.limits.batch) % shape.classes
        self.flops = recover_flops_per_image(self.teacher, self.image_shape, cfg.device)

    def spec(self, iterations: int) -> SimpleNamespace:
        return recover_spec(iterations, self.cfg.limits.batch)

    def published(self) -> Loop:
        def run(iterations: int) -> None:
            spec = self.spec(iterations)
            yardstick(self.teacher, self.targets, spec, self.bounds, self.image_shape,
                      jitter_pixels(spec, self.shape.image_size), self.cfg.seed)

        return run

    def ours(self, runtime: Runtime) -> tuple[Loop, bool]:
        """scdd's loop under `runtime`, and whether `auto` compiled the teacher for this workload."""
        image_iterations = self.cfg.limits.batch * self.shape.workload.iterations
        if runtime.should_compile(image_iterations):
            torch.compiler.reset()  # compile this teacher afresh, not with dynamic shapes learnt from the last one
        runner = prepare_teacher(self.teacher, runtime, image_iterations)
        bn_loss = BNStatLoss(self.teacher, self.spec(1).first_bn_multiplier)

        def run(iterations: int) -> None:
            with bn_loss:
                synthesize(runner, self.targets, self.spec(iterations), self.bounds, self.image_shape, runtime,
                           torch.Generator().manual_seed(self.cfg.seed), bn_loss)

        return run, runner is not self.teacher


def recover_rows(cfg: CheckConfig, shape: Shape, plan: ModelPlan, budget_s: float) -> list[Row]:
    """A row per loop; a loop that fails (a compile error, say) leaves the others' rows standing."""
    deadline = Deadline(budget_s)
    bench = RecoverBench(cfg, shape, plan.arch)
    plain = Runtime(cfg.device, None, False, "off")
    auto = auto_runtime(cfg.device)
    loops = (
        ("yardstick", lambda: (bench.published(), False), "published loop, fp32, eager"),
        ("fp32", lambda: bench.ours(plain), describe(plain, False)),
        ("auto", lambda: bench.ours(auto), None),
    )
    rows: list[Row] = []
    failures: list[str] = []
    yard_rate = None
    for index, (loop, make, note) in enumerate(loops):
        share = min(cfg.limits.measure_s, deadline.left() / (len(loops) - index))
        try:
            run, compiled = make()
            result = measure(run, cfg.device, cfg.limits, share)
        except Exception as exc:  # the next loop may still run
            failures.append(f"{loop}: {one_line(exc)}")
            rows.append(Row(case=loop, note=f"failed: {one_line(exc)}"))
            continue
        rate = result.rate * cfg.limits.batch
        if loop == "yardstick":
            yard_rate = rate
        rows.append(_row(bench, loop, rate, yard_rate, result, compiled, note or describe(auto, compiled)))
    if failures:
        raise PartFailed("; ".join(failures), rows)
    return rows


def _row(bench: RecoverBench, case: str, rate: float, yard_rate: float | None, result: Measured, compiled: bool,
         note: str) -> Row:
    batch = bench.cfg.limits.batch
    return Row(
        case=case, rate=rate, vs_yardstick=rate / yard_rate if yard_rate else None, tflops=rate * bench.flops / 1e12,
        mib_per_image=result.peak_bytes / MIB / batch if result.peak_bytes is not None else None,
        compile_s=result.one_time_s() if compiled else None,
        workload_h=bench.shape.workload.image_iterations / rate / 3600,
        note=f"{note}; {result.units} it; {bench.flops / 1e9:.2f} GFLOP/img-it",
    )
