"""Distillation quality on Fashion-MNIST: random real subset vs sre2l vs scdd, KD and hard labels.

For each seed, method and IPC the pipeline recovers the images once; each validation mode then
trains the same student on them, and (once per seed, IPC and mode) on a random real subset of the
same size. Top-1 is on the whole 10 000-image test split; the table gives mean +- spread (half the
range) over seeds and the mean wall time of a row's runs (recover + validation, teachers excluded:
they are trained once per seed and cached). Nothing is tuned on the test split.

    python bench/quality.py            # IPC 1, 10, 50 (hard labels: 1, 10); seeds 0, 1
    python bench/quality.py --quick    # IPC 1 and 10, one seed, short schedules: a few minutes

Hard-label runs at IPC 50 are left out by default (`--hard-ipc 1 10 50` adds them): the
instance-norm ConvNet trains at ~1 s per 256-image step on 2 CPU cores, so one such run and its
baseline take over 20 minutes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

from api_schema import JobSpec
from scdd.pipeline import run_distillation

ANCHORS = "published hard-label ConvNet anchors (IPC 1/10/50): DC 70.5/82.3/83.6, DSA 70.6/84.6/88.7, " \
          "IDC-I 70.7/85.3/89.1, KIP 73.8/86.8/87.8"


def job(method: str, ipc: int, seed: int, mode: str, args, out: Path) -> JobSpec:
    quick = args.quick
    validate = {"mode": mode, "baseline": method == "sre2l"}
    if quick:
        validate["epochs"] = 30 if mode == "kd" else 100
    return JobSpec.model_validate({
        "method": method,
        "seed": seed,
        "dataset": {"train_limit": 1000} if quick else {},
        "teacher": {"epochs": args.teacher_epochs, "ssl": {"epochs": args.ssl_epochs}},
        "recover": {"ipc": ipc, "iterations": 100 if quick else args.iterations},
        "validate": validate,
        "output": {"url": str(out / f"{method}-ipc{ipc}-seed{seed}"), "teacher_cache": str(out / "teachers")},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ipc", type=int, nargs="+")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--modes", nargs="+", default=["kd", "hard"])
    parser.add_argument("--hard-ipc", type=int, nargs="+", default=[1, 10], help="IPCs at which hard mode runs")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--ssl-epochs", type=int, default=2)
    parser.add_argument("--out", default="bench/out/quality")
    args = parser.parse_args()
    ipcs = args.ipc or ([1, 10] if args.quick else [1, 10, 50])
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    out = Path(args.out)

    top1: dict[tuple, list[float]] = defaultdict(list)
    seconds: dict[tuple, list[float]] = defaultdict(list)
    teachers: dict[str, list[float]] = defaultdict(list)
    for seed in seeds:
        for method in ("sre2l", "scdd"):
            for ipc in ipcs:
                for mode in args.modes:
                    if mode == "hard" and ipc not in args.hard_ipc:
                        continue
                    started = time.perf_counter()
                    report = run_distillation(job(method, ipc, seed, mode, args, out))
                    elapsed = time.perf_counter() - started
                    stages = report["stage_seconds"]
                    run_seconds = stages.get("recover", 0) + stages.get("validate", 0)
                    val = report["validate"]
                    top1[(ipc, method, mode)].append(val["student"]["top1"])
                    seconds[(ipc, method, mode)].append(run_seconds)
                    if "baseline" in val:
                        top1[(ipc, "random real", mode)].append(val["baseline"]["top1"])
                        seconds[(ipc, "random real", mode)].append(stages.get("baseline", 0))
                    if ipc == ipcs[0] and mode == args.modes[0]:  # one teacher per seed and method
                        teachers[method].append(report["teacher"]["top1"])
                    print(f"seed {seed} {method:5s} ipc {ipc:3d} {mode:4s}: student {val['student']['top1']:.2f}%"
                          + (f", random real {val['baseline']['top1']:.2f}%" if "baseline" in val else "")
                          + f"  ({elapsed:.0f} s)", flush=True)

    def cell(values: list[float]) -> str:
        if not values:
            return "—"
        if len(values) == 1:
            return f"{values[0]:.2f}"
        return f"{statistics.mean(values):.2f} ± {(max(values) - min(values)) / 2:.2f}"

    print(f"\nFashion-MNIST, ConvNet students, top-1 % on the full test split, seeds {seeds}"
          + (" (quick mode: 1000 train images per class, short schedules)" if args.quick else ""))
    for method, values in teachers.items():
        print(f"recovery teacher ({method}): top-1 {cell(values)}%")
    print(f"| IPC | images | {' | '.join(f'{m} top-1' for m in args.modes)} | {' | '.join(f'{m} s' for m in args.modes)} |")
    print("|---:|---|" + "---:|" * (2 * len(args.modes)))
    for ipc in ipcs:
        for source in ("random real", "sre2l", "scdd"):
            accs = " | ".join(cell(top1[(ipc, source, m)]) for m in args.modes)
            secs = " | ".join(f"{statistics.mean(seconds[(ipc, source, m)]):.0f}" if seconds[(ipc, source, m)] else "—"
                              for m in args.modes)
            print(f"| {ipc} | {source} | {accs} | {secs} |")
    print(f"\n{ANCHORS}")


if __name__ == "__main__":
    main()
