"""KD validation step rate: scdd.validate.train_student on random images of the ImageNet shape.

The student trains under the `quick` KD protocol (AdamW, CutMix, soft labels of a synthetic relabel
teacher of the same architecture) with the check's batch size, on the `auto` runtime (bf16 and
channels-last where they resolve on). Rate: student images per second over whole epochs.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from gpu_check_parts.config import CheckConfig
from gpu_check_parts.flops import kd_flops_per_image
from gpu_check_parts.measure import measure
from gpu_check_parts.recover_rate import MIB, auto_runtime, describe
from gpu_check_parts.report import Row
from gpu_check_parts.specs import section
from gpu_check_parts.teachers import synthetic_teacher
from scdd.data.base import PixelSet
from scdd.models import create_model
from scdd.progress import SilentProgress
from scdd.recover import freeze
from scdd.validate import resolve_protocol, train_student

WARM_EPOCHS = 1


def validate_rows(cfg: CheckConfig, budget_s: float) -> list[Row]:
    shape, limits, device = cfg.imagenet, cfg.limits, cfg.device
    runtime = auto_runtime(device)
    teacher = freeze(synthetic_teacher(cfg.student, shape, limits, device, cfg.seed), runtime)
    torch.manual_seed(cfg.seed)
    student = create_model(cfg.student, shape.classes, 3, shape.image_size).to(device)
    image_shape = (3, shape.image_size, shape.image_size)
    generator = torch.Generator().manual_seed(cfg.seed)
    pixels = torch.randint(0, 256, (limits.kd_images, *image_shape), generator=generator, dtype=torch.uint8)
    labels = torch.arange(limits.kd_images) % shape.classes
    images = PixelSet(pixels, labels, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).to(device)
    spec = section("ValidateSpec", student_arch=cfg.student, batch_size=limits.batch)
    protocol = resolve_protocol(spec, limits.kd_images)
    flops = kd_flops_per_image(student, teacher, image_shape, device)

    def run(epochs: int) -> None:
        train_student(student, images, replace(protocol, epochs=epochs), teacher, runtime, cfg.seed,
                      SilentProgress())

    result = measure(run, device, limits, min(limits.measure_s, budget_s / 3), warm=WARM_EPOCHS)
    rate = result.rate * limits.kd_images
    return [Row(
        case=f"{cfg.student} {shape.image_size}px student", rate=rate, unit="img/s", tflops=rate * flops / 1e12,
        mib_per_image=result.peak_bytes / MIB / protocol.batch_size if result.peak_bytes is not None else None,
        note=f"{describe(runtime, False)}; {protocol.optimizer}, {protocol.mix}, batch {protocol.batch_size}; "
             f"{result.units} epochs of {limits.kd_images} images; {flops / 1e9:.2f} GFLOP/img",
    )]
