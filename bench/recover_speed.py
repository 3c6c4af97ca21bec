"""Recover throughput: scdd's loop against a yardstick of the published SRe2L loop, same process.

For each teacher (ConvNet, small-image ResNet-18; trained briefly on real Fashion-MNIST so the BN
statistics are realistic) and a batch of 100 images it runs:
  yardstick  the published loop (bench/published_loop.py): one RandomResizedCrop + flip for the
             whole batch, one roll, BN variance by permute-and-copy, fp32, eager, a loss.item() per step
  fp32       scdd: per-image crop/flip/roll in one grid_sample, var_mean statistics, fp32, eager
  fast       scdd with the speed options this machine's `auto` resolves to
             (torch.compile + channels-last + bf16 autocast where bf16 is native); `--amp off` keeps it fp32
             (compiled, channels-last), so the figure of a machine without native bf16 can be taken on one with it,
             and `--amp bf16` forces autocast; the first line names the CPU's bf16 support
and prints image-iterations per second, the ratio to the yardstick, and the CE and BN losses of
each loop's final images, all measured the same way (fp32, eager, same initial noise) in two views:
`aug` is the mean over 20 fixed draws of the per-image augmentation (the objective recover
optimises, and what a student sees in training), `plain` is the images without augmentation. Compile time is paid once per run and listed apart (inductor caches compiled
kernels on disk, so a second run of the script compiles faster).

    python bench/recover_speed.py [--iterations 100] [--models convnet resnet18_small] [--amp auto|off|bf16]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from api_schema import DatasetSpec, RecoverSpec, ResourcesSpec, TeacherSpec
from scdd import augment
from scdd.data import load_dataset
from scdd.models import create_model
from scdd.progress import SilentProgress
from scdd.recover import BNStatLoss, freeze, prepare_teacher, synthesize
from scdd.runtime import Runtime, fast_bf16, resolve_runtime
from scdd.squeeze import train_supervised

from published_loop import yardstick  # bench/published_loop.py

BATCH = 100


@torch.no_grad()
def losses_of(teacher, images, targets, first_bn_multiplier) -> tuple[float, float]:
    with BNStatLoss(teacher, first_bn_multiplier) as bn:
        ce = F.cross_entropy(teacher(images.float().contiguous()), targets)
        return ce.item(), bn.loss().item()


@torch.no_grad()
def final_losses(teacher, images, targets, spec: RecoverSpec, jitter: int, draws: int = 20) -> tuple[float, ...]:
    """(CE aug, BN aug, CE plain, BN plain) of finished images; the same draws for every loop."""
    generator = torch.Generator().manual_seed(1234)
    ce_aug = bn_aug = 0.0
    for _ in range(draws):
        params = augment.sample_params(
            len(images), images.shape[-1], crop=True, scale=spec.augment.crop_scale, ratio=spec.augment.crop_ratio,
            flip=True, jitter=jitter, generator=generator,
        )
        ce, bn = losses_of(teacher, augment.apply(images.float(), params), targets, spec.first_bn_multiplier)
        ce_aug, bn_aug = ce_aug + ce / draws, bn_aug + bn / draws
    return (ce_aug, bn_aug, *losses_of(teacher, images, targets, spec.first_bn_multiplier))


def ours(teacher, targets, spec, bounds, size, runtime: Runtime, seed):
    runner = prepare_teacher(teacher, runtime, len(targets) * spec.iterations)
    compile_seconds = 0.0
    with BNStatLoss(teacher, spec.first_bn_multiplier) as bn:
        if runner is not teacher:  # pay the one-time compile (forward and backward graphs) outside the timing
            started = time.perf_counter()
            warm = spec.model_copy(update={"iterations": 2})
            synthesize(runner, targets, warm, bounds, (1, size, size), runtime, torch.Generator().manual_seed(seed), bn)
            compile_seconds = time.perf_counter() - started
        started = time.perf_counter()
        result = synthesize(runner, targets, spec, bounds, (1, size, size), runtime, torch.Generator().manual_seed(seed), bn)
        seconds = time.perf_counter() - started
    return seconds, result.images, compile_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--models", nargs="+", default=["convnet", "resnet18_small"])
    parser.add_argument("--train-limit", type=int, default=300, help="teacher training images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--r-bn", type=float, default=0.01, help="BN-loss weight (0.01: SRe2L's published value)")
    parser.add_argument("--amp", choices=["auto", "off", "bf16"], default="auto",
                        help="bf16 autocast of the `fast` loop: auto (where this machine has it natively), off (the "
                        "compiled fp32 path of a machine without it), bf16")
    args = parser.parse_args()

    data = load_dataset(DatasetSpec(train_limit=args.train_limit), seed=args.seed)
    info = data.info
    low, high = info.pixel_bounds()
    targets = torch.arange(BATCH) % info.num_classes
    spec = RecoverSpec(iterations=args.iterations, batch_size=BATCH, r_bn=args.r_bn)
    jitter = info.image_size // 8
    plain = Runtime(torch.device("cpu"), None, False, "off")
    fast = resolve_runtime(ResourcesSpec(compile="on", amp=args.amp))
    native = "native bf16 (AVX512-BF16 or AMX)" if fast_bf16(torch.device("cpu")) else "no native bf16"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU with {native}, batch {BATCH}, "
          f"{args.iterations} iterations; fast = {fast.describe()} (--amp {args.amp})")
    header = (f"{'model':<15} {'loop':<10} {'img-it/s':>9} {'x yard':>7} {'CE aug':>7} {'BN aug':>8} "
              f"{'CE plain':>8} {'BN plain':>8} {'compile s':>9}")

    def row(name, loop, rate, ratio, losses, compile_s):
        ce_a, bn_a, ce_p, bn_p = losses
        return f"{name:<15} {loop:<10} {rate:9.1f} {ratio:7.2f} {ce_a:7.4f} {bn_a:8.3f} {ce_p:8.4f} {bn_p:8.3f} {compile_s:>9}"

    rows = []
    for name in args.models:
        torch.manual_seed(args.seed)
        teacher = create_model(name, info.num_classes, info.channels, info.image_size)
        train_supervised(teacher, data, TeacherSpec(epochs=1), plain, args.seed, SilentProgress())
        freeze(teacher, plain)
        image_shape = (info.channels, info.image_size, info.image_size)
        y_sec, y_images = yardstick(teacher, targets, spec, (low, high), image_shape, jitter, args.seed)
        y_losses = final_losses(teacher, y_images, targets, spec, jitter)
        y_rate = BATCH * args.iterations / y_sec
        rows.append(row(name, "yardstick", y_rate, 1.0, y_losses, "-"))
        for label, runtime in (("fp32", plain), ("fast", fast)):
            sec, images, comp = ours(teacher, targets, spec, (low, high), info.image_size, runtime, args.seed)
            freeze(teacher, plain)
            losses = final_losses(teacher, images, targets, spec, jitter)
            rate = BATCH * args.iterations / sec
            rows.append(row(name, label, rate, rate / y_rate, losses, f"{comp:.1f}"))
    print("\n".join([header, *rows]))


if __name__ == "__main__":
    main()
