"""Recover throughput: scdd's loop against a yardstick of the published SRe2L loop, same process.

For each teacher (ConvNet and small-stem ResNet-18 at Fashion-MNIST's 28 px, the ImageNet-stem ResNet-18 at 64 px;
trained briefly on real Fashion-MNIST, resized where a size is given, so the BN statistics are realistic) and a batch
of 100 images it runs:
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
optimises, and what a student sees in training), `plain` is the images without augmentation. Compile time is paid
once per run and listed apart (inductor caches compiled kernels on disk, so a second run of the script compiles
faster). Each run writes a JSON result; docs/benchmarks-and-findings.md's tables are rendered from such files
(`scripts/gen_bench_docs.py`, or `--table-from`), each fast row against the goal of its precision (>= 5x the
yardstick with bf16, >= 2x without).

    python bench/recover_speed.py [--iterations 100] [--models convnet resnet18_small resnet18@64] [--amp auto|off|bf16]
    python bench/recover_speed.py --smoke                     # seconds: the code path, no meaningful numbers
    python bench/recover_speed.py --table-from bench/results/recover_speed-*.json
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
from scdd.runtime import Runtime, resolve_runtime
from scdd.squeeze import train_supervised

from benchlib import (apply_smoke, commit_of, describe_host, host, read_results, step_phases_ms,  # bench/benchlib.py
                      write_result)
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


def ours(teacher, targets, spec, bounds, size, runtime: Runtime, seed, profile_steps: int = 0):
    """Seconds of scdd's loop, its images and compile seconds; with `profile_steps`, also a torch.profiler summary of
    that many more steps (after the timed run, so the timing is the profiler's overhead free)."""
    runner = prepare_teacher(teacher, runtime, len(targets) * spec.iterations)
    compile_seconds, profile = 0.0, None
    with BNStatLoss(teacher, spec.first_bn_multiplier) as bn:
        if runner is not teacher:  # pay the one-time compile (forward and backward graphs) outside the timing
            started = time.perf_counter()
            warm = spec.model_copy(update={"iterations": 2})
            synthesize(runner, targets, warm, bounds, (1, size, size), runtime, torch.Generator().manual_seed(seed), bn)
            compile_seconds = time.perf_counter() - started
        started = time.perf_counter()
        result = synthesize(runner, targets, spec, bounds, (1, size, size), runtime, torch.Generator().manual_seed(seed), bn)
        seconds = time.perf_counter() - started
        if profile_steps:
            short = spec.model_copy(update={"iterations": profile_steps})
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                synthesize(runner, targets, short, bounds, (1, size, size), runtime, torch.Generator().manual_seed(seed), bn)
            profile = summarise_profile(prof, profile_steps)
    return seconds, result.images, compile_seconds, profile


def summarise_profile(prof, steps: int, top: int = 8) -> dict:
    """Milliseconds per step of each phase of scdd/recover/synthesize.py's step (its record_function ranges: the
    augmentation; the teacher's forward, in which the BN hooks gather their statistics; the BN loss; the backward;
    the optimizer step and clamp) and the ops that take the most self time."""
    events = prof.key_averages()
    ops = sorted((e for e in events if not e.key.startswith("recover.")), key=lambda e: -e.self_cpu_time_total)
    total_self = sum(e.self_cpu_time_total for e in events) or 1.0
    return {"steps": steps, "phase_ms": step_phases_ms(events, steps),
            "top_ops": [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1000 / steps, 3),
                         "share": round(e.self_cpu_time_total / total_self, 3)} for e in ops[:top]]}


GOAL = {True: 5.0, False: 2.0}  # the fast loop's speed-up over the yardstick, with and without bf16 (issue 28)
SMOKE = {"iterations": 2, "models": ["convnet"], "train_limit": 20, "compile": "off"}  # compiling alone takes 20 s


def model_and_size(name: str) -> tuple[str, int | None]:
    """`resnet18@64` -> (resnet18, 64); `convnet` -> (convnet, None: Fashion-MNIST's 28 px)."""
    arch, _, size = name.partition("@")
    return arch, int(size) if size else None


def measure(args) -> dict:
    fast = resolve_runtime(ResourcesSpec(compile=args.compile, amp=args.amp))
    plain = Runtime(torch.device("cpu"), None, False, "off")
    spec = RecoverSpec(iterations=args.iterations, batch_size=BATCH, r_bn=args.r_bn)
    print(f"{describe_host(host())}, {torch.get_num_threads()} threads, batch {BATCH}, "
          f"{args.iterations} iterations; fast = {fast.describe()} (--amp {args.amp}, --compile {args.compile})", flush=True)
    rows, datasets = [], {}
    for name in args.models:
        arch, size = model_and_size(name)
        if size not in datasets:
            datasets[size] = load_dataset(DatasetSpec(train_limit=args.train_limit, **({"image_size": size} if size else {})),
                                          seed=args.seed)
        data = datasets[size]
        info = data.info
        low, high = info.pixel_bounds()
        targets = torch.arange(BATCH) % info.num_classes
        jitter = info.image_size // 8
        torch.manual_seed(args.seed)
        teacher = create_model(arch, info.num_classes, info.channels, info.image_size)
        train_supervised(teacher, data, TeacherSpec(epochs=1), plain, args.seed, SilentProgress())
        freeze(teacher, plain)
        image_shape = (info.channels, info.image_size, info.image_size)
        y_sec, y_images = yardstick(teacher, targets, spec, (low, high), image_shape, jitter, args.seed)
        y_rate = BATCH * args.iterations / y_sec
        common = {"model": arch, "size": info.image_size}
        rows.append({**common, "loop": "yardstick", "rate": y_rate, "ratio": 1.0,
                     **losses_dict(final_losses(teacher, y_images, targets, spec, jitter)), "compile_s": None})
        for label, runtime in (("fp32", plain), ("fast", fast)):
            sec, images, comp, profile = ours(teacher, targets, spec, (low, high), info.image_size, runtime, args.seed,
                                              args.profile)
            freeze(teacher, plain)
            rate = BATCH * args.iterations / sec
            rows.append({**common, "loop": label, "rate": rate, "ratio": rate / y_rate,
                         **losses_dict(final_losses(teacher, images, targets, spec, jitter)), "compile_s": comp or None,
                         **({"profile": profile} if profile else {})})
    return {"settings": {"iterations": args.iterations, "batch": BATCH, "r_bn": args.r_bn, "train_limit": args.train_limit,
                         "seed": args.seed, "amp": args.amp, "compile": args.compile, "models": args.models},
            "fast": fast.describe(), "rows": rows}  # the CPU's bf16 support: the document's host


def losses_dict(losses: tuple[float, ...]) -> dict:
    return dict(zip(("ce_aug", "bn_aug", "ce_plain", "bn_plain"), losses))


def precision_of(doc: dict) -> str:
    bf16 = doc["fast"]["amp"] == "bfloat16"
    compiled = "compiled" if doc["fast"]["compile"] == "on" else "eager"
    return f"*fast* = {compiled}, channels-last, {'bf16 autocast' if bf16 else 'fp32'} (`--amp {doc['settings']['amp']}`)"


def table(documents: list[dict]) -> str:
    """One markdown table per run: the machine, the fast loop's precision, and each model's three loops against the
    issue's goal for that precision (>= 5x the yardstick with bf16, >= 2x without); then any profiles."""
    parts = []
    for doc in documents:
        goal = GOAL[doc["fast"]["amp"] == "bfloat16"]
        parts.append(f"{precision_of(doc)}; {describe_host(doc['host'])}, {doc['host'].get('threads')} threads; "
                     f"{doc['date']}, {commit_of(doc)}; {doc['settings']['iterations']} iterations of a batch "
                     f"of {doc['settings']['batch']}.\n")
        parts.append("| model | px | loop | image-it/s | × yardstick | goal | CE aug | BN aug | CE plain | BN plain | "
                     "compile (once) |")
        parts.append("|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|")
        for row in doc["rows"]:
            met = "" if row["loop"] != "fast" or doc["smoke"] else \
                f"≥ {goal:g}× met" if row["ratio"] >= goal else f"≥ {goal:g}× **missed**"
            ratio = f"**{row['ratio']:.2f}**" if row["loop"] == "fast" else f"{row['ratio']:.2f}"
            compile_s = f"{row['compile_s']:.1f} s" if row["compile_s"] else "–"
            parts.append(f"| {row['model']} | {row['size']} | {row['loop']} | {row['rate']:.1f} | {ratio} | {met} | "
                         f"{row['ce_aug']:.4f} | {row['bn_aug']:.3f} | {row['ce_plain']:.4f} | {row['bn_plain']:.3f} | "
                         f"{compile_s} |")
        parts.append("")
        profiled = [row for row in doc["rows"] if row.get("profile")]
        if profiled:
            parts.append(profile_table(doc, profiled))
    return "\n".join(parts).rstrip() + "\n"


def profile_table(doc: dict, rows: list[dict]) -> str:
    """Per profiled loop: ms per step in each phase of the step, the convolutions' share (oneDNN forward and backward
    kernels, which compiling does not change), the bound that puts on the speed-up, and the ops with the most self
    time."""
    steps = rows[0]["profile"]["steps"]
    yardstick = {(r["model"], r["size"]): r for r in doc["rows"] if r["loop"] == "yardstick"}
    lines = [f"torch.profiler, {steps} steps after the timed run, ms per step ({precision_of(doc)}; *forward* includes the "
             "BN hooks' statistics, *bn loss* their distance to the running statistics; *conv* is the self time of the "
             "convolution ops, forward and backward, and *bound* the speed-up over the yardstick if everything else in "
             "the step took no time):\n",
             "| model | px | loop | augment | forward | bn loss | backward | optimizer | conv | bound | "
             "ops with the most self time |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        profile, ms = row["profile"], row["profile"]["phase_ms"]
        conv_ms = sum(op["self_ms"] for op in profile["top_ops"] if "convolution" in op["op"])
        conv_share = sum(op["share"] for op in profile["top_ops"] if "convolution" in op["op"])
        yard_step_ms = 1000 * doc["settings"]["batch"] / yardstick[(row["model"], row["size"])]["rate"]
        ops = ", ".join(f"`{short_op(op['op'])}` {op['share']:.0%}" for op in profile["top_ops"][:3])
        lines.append(f"| {row['model']} | {row['size']} | {row['loop']} | {ms['augment']:.1f} | {ms['forward']:.1f} | "
                     f"{ms['bn_loss']:.1f} | {ms['backward']:.1f} | {ms['optimizer']:.1f} | {conv_ms:.0f} "
                     f"({conv_share:.0%}) | {yard_step_ms / conv_ms:.2f}× | {ops} |")
    return "\n".join(lines) + "\n"


def short_op(name: str) -> str:
    """An op's name for the table: a compiled graph's call is named by what it is, not by its hash."""
    return "inductor graph (fused BN, ReLU, statistics)" if "CompiledFxGraph" in name else name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--models", nargs="+", default=["convnet", "resnet18_small", "resnet18@64"],
                        help="registry models, each at Fashion-MNIST's 28 px or at `@<px>` (resized)")
    parser.add_argument("--train-limit", type=int, default=300, help="teacher training images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--r-bn", type=float, default=0.01, help="BN-loss weight (0.01: SRe2L's published value)")
    parser.add_argument("--amp", choices=["auto", "off", "bf16"], default="auto",
                        help="bf16 autocast of the `fast` loop: auto (where this machine has it natively), off (the "
                        "compiled fp32 path of a machine without it), bf16")
    parser.add_argument("--compile", choices=["on", "off"], default="on",
                        help="torch.compile the fast loop (on: what `auto` does for a unit this large)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after each scdd loop's timed run, profile this many more steps (torch.profiler): ms per "
                        "step of each phase and the ops with the most self time, printed and kept in the JSON")
    parser.add_argument("--out", help="the JSON result (default bench/results/recover_speed-<date>.json; a --smoke run "
                        "writes only where --out says)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: the ConvNet, 2 iterations, 20 images per class, not compiled")
    parser.add_argument("--table-from", nargs="+", metavar="JSON", help="print the tables of these result files and exit")
    args = parser.parse_args(argv)
    if args.table_from:
        print(table(read_results(args.table_from)), end="")
        return
    if args.smoke:
        apply_smoke(parser, args, SMOKE)
    document = measure(args)
    print(table([{**document, "host": host(), "date": "now", "commit": "this tree", "smoke": args.smoke}]), end="")
    write_result("recover_speed", document, args.out, args.smoke)


if __name__ == "__main__":
    main()
