"""The named recipes on Fashion-MNIST beside scdd's defaults and random real images, under each recipe's own student
protocol and under the `long` preset (issue 26).

For each seed and row (a recipe, or `defaults`: scdd's own spec), one job runs the row's recover and validates the
set under the row's protocol beside random real images under the same protocol (the job's own IOR); then an
evaluate job (`kind: evaluate`, no recover) trains the `long` preset's student on the same images, with soft labels
from the same relabel teacher (the job's saved teacher file) and random real images beside it. Every run is
appended to a JSON-lines log (with the relabel teacher's top-1, the device and each stage's seconds); the table gives,
per set of cuts, mean ± half-range over seeds of the relabel teacher's top-1, the set's top-1, random real's, the IOR
and each seed's IOR.

What a CPU cannot afford is cut the same way for every row and printed with the table: the teacher's epochs
(`--teacher-epochs`, a recipe's own 50-200 epochs of a ResNet-18 on 60 000 images would take a day on 2 cores) and
the training images per class (`--train-limit`); `--recover-iterations` / `--student-epochs` cut those too where
given (by default each recipe keeps its own). The ImageNet recipes run at Fashion-MNIST's 28 px.

    python bench/recipes.py                                   # IPC 10, seeds 0 1 2, the CIFAR recipes + defaults
    python bench/recipes.py --rows sre2l-cifar --seeds 0      # one row, one seed
    python bench/recipes.py --device cuda --teacher-epochs 50 --train-limit 6000   # a GPU: the cuts lifted
    python bench/recipes.py --smoke                           # seconds: 2 classes, IPC 1, every schedule cut to 1-2
    python bench/recipes.py --table-from bench/results/recipes.jsonl

Runs append to `--log` (bench/results/recipes.jsonl); a run the log already holds for the same row, seed and cuts is
not run again, so the table can be built over several sessions, a seed at a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

from api_schema import JobSpec
from scdd.layout import RELABEL_PATH, REPORT, TEACHER_PATH
from scdd.pipeline import run_distillation

from benchlib import apply_smoke, describe_host, host, smoke_into_temp  # bench/benchlib.py

DEFAULT_ROWS = ["sre2l-cifar", "scdd-cifar100", "defaults"]
SMOKE = {"rows": ["sre2l-cifar", "defaults"], "seeds": [0], "ipc": 1, "classes": [0, 1], "teacher_epochs": 1,
         "train_limit": 20, "test_limit": 20, "recover_iterations": 2, "student_epochs": 2}


def distill_spec(row: str, seed: int, args, out: Path) -> dict:
    """The job of `row` for `seed`: the recipe (or scdd's defaults) with the bench's cuts."""
    spec: dict = {
        "seed": seed,
        "dataset": {"train_limit": args.train_limit, "image_size": 28, "test_limit": args.test_limit},
        "teacher": {"epochs": args.teacher_epochs, "ssl": {"epochs": args.teacher_epochs}},
        "recover": {"ipc": args.ipc},
        "validate": {},
        "resources": {"device": args.device, "compile": "off", "threads": args.threads},
        "output": {"url": str(out / f"{row}-ipc{args.ipc}-s{seed}"), "teacher_cache": str(out / "teachers")},
    }
    if row != "defaults":
        spec["recipe"] = row
    else:
        spec["validate"]["preset"] = "long"  # scdd's defaults are judged under their own (the README's) protocol
    if args.recover_iterations is not None and row != "defaults":
        spec["recover"]["iterations"] = args.recover_iterations
    if args.student_epochs is not None:
        spec["validate"]["epochs"] = args.student_epochs
    if args.classes:
        spec["dataset"]["classes"] = args.classes
    return spec


def long_spec(job: JobSpec, output: Path, args) -> dict:
    """The evaluate job: the `long` preset's student on the set `output` holds, soft labels from its relabel teacher."""
    teacher = output / (RELABEL_PATH if (output / RELABEL_PATH).exists() else TEACHER_PATH)
    data = job.to_dict()["dataset"]
    validate = {"preset": "long", "relabel_teacher": "supervised", "relabel_checkpoint": str(teacher)}
    if args.student_epochs is not None:
        validate["epochs"] = args.student_epochs
    return {"kind": "evaluate", "seed": job.seed, "dataset": data, "evaluate": {"images": str(output)},
            "validate": validate, "resources": {"device": args.device, "compile": "off", "threads": args.threads},
            "output": {"url": str(output) + "-long", "teacher_cache": str(output.parent / "teachers")}}


def record(report, row: str, protocol: str, seed: int, seconds: float, args) -> dict:
    """One run's log line: its scores, its relabel teacher, where (machine, device) and how long it ran, and the
    bench's cuts."""
    validate = report.validate_
    teacher = report.teacher.top1 if report.teacher else None  # None: an evaluate job recovers nothing
    relabel = validate.relabel_teacher.top1 if validate.relabel_teacher else None
    return {"row": row, "protocol": protocol, "seed": seed, "ipc_images": validate.images,
            "student": validate.protocol.student_arch, "epochs": validate.protocol.epochs,
            "top1": validate.student.top1, "random_top1": validate.baseline.top1, "ior": validate.ior,
            "teacher_top1": teacher, "relabel_top1": relabel if relabel is not None else teacher,
            "recipe": report.recipe.name if report.recipe else None, "device": report.runtime.device,
            "amp": report.runtime.amp, "machine": describe_host(host()),
            "seconds": round(seconds, 1), "stage_seconds": {k: round(v, 1) for k, v in report.stage_seconds.items()},
            "threads": args.threads, "cuts": cuts(args)}


def logged(log: Path, args) -> dict[tuple[str, int], dict[str, dict]]:
    """The runs `log` already holds under the same cuts, by (row, seed) and protocol: a later invocation goes on from
    them, so the table can be built a seed at a time (the log is committed with the results)."""
    done: dict[tuple[str, int], dict[str, dict]] = defaultdict(dict)
    if log.exists():
        for line in log.read_text().splitlines():
            entry = json.loads(line) if line.strip() else None
            if entry and entry.get("cuts") == cuts(args):
                done[(entry["row"], entry["seed"])][entry["protocol"]] = entry
    return done


def run(args) -> list[dict]:
    """Every (seed, row) the log does not hold yet. Each run is logged as soon as it ends, so a bench stopped during a
    recipe's `long` evaluation keeps the recipe's own run; the next invocation runs only what is missing (the set is
    made again, identically, where its output folder is gone)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    done = logged(log, args)
    results = []

    def keep(entry: dict) -> None:
        with log.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        results.append(entry)
        print(f"  {entry['row']:20s} {entry['protocol']:6s} seed {entry['seed']}: top-1 {entry['top1']:.2f}, random "
              f"real {entry['random_top1']:.2f}, IOR {entry['ior']:+.2f} ({entry['seconds']:.0f} s)", flush=True)

    for seed in args.seeds:
        for row in args.rows:
            # a recipe under its own protocol, then under `long`; the defaults' own protocol is the long preset
            wanted = ["long"] if row == "defaults" else ["recipe", "long"]
            own = wanted[0]
            have = done.get((row, seed), {})
            results += have.values()
            if all(protocol in have for protocol in wanted):
                print(f"  {row:20s} seed {seed}: in {log} already", flush=True)
                continue
            spec = JobSpec.model_validate(distill_spec(row, seed, args, out))
            if own not in have or not (Path(spec.output.url) / REPORT).exists():
                start = time.perf_counter()
                report = run_distillation(spec)
                if own not in have:
                    keep(record(report, row, own, seed, time.perf_counter() - start, args))
            if wanted[1:] and "long" not in have:
                start = time.perf_counter()
                evaluated = run_distillation(JobSpec.model_validate(long_spec(spec, Path(spec.output.url), args)))
                keep(record(evaluated, row, "long", seed, time.perf_counter() - start, args))
    return results


def cuts(args) -> dict:
    return {"teacher_epochs": args.teacher_epochs, "train_limit": args.train_limit, "test_limit": args.test_limit,
            "recover_iterations": args.recover_iterations, "student_epochs": args.student_epochs, "ipc": args.ipc}


def table(results: list[dict]) -> str:
    """One table per set of cuts the runs were made with (rows are never averaged across cuts), each under a line
    naming the cuts, the machines, devices and torch threads of its runs (the seconds depend on them)."""
    by_cuts: dict[str, list[dict]] = defaultdict(list)
    for entry in results:
        by_cuts[json.dumps(entry.get("cuts"), sort_keys=True)].append(entry)
    parts = []
    for cut, entries in sorted(by_cuts.items()):
        threads = sorted({str(e.get("threads")) for e in entries})
        devices = sorted({e.get("device", "cpu") for e in entries})  # runs logged before the field were all cpu
        machines = sorted({e.get("machine", "not recorded") for e in entries})
        parts.append(f"Cuts {cut}; machines: {'; '.join(machines)}; device {', '.join(devices)}, torch threads per "
                     f"run: {', '.join(threads)}."
                     f"\n\n{setting_table(entries)}")
    return "\n\n".join(parts)


def setting_table(results: list[dict]) -> str:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for entry in results:
        groups[(entry["row"], entry["protocol"])].append(entry)

    def spread(values: list[float]) -> str:
        return f"{statistics.mean(values):.2f} ± {(max(values) - min(values)) / 2:.2f}"

    def teacher(entries: list[dict]) -> str:  # runs logged before this field was recorded have none
        values = [e["relabel_top1"] for e in entries if e.get("relabel_top1") is not None]
        return spread(values) if len(values) == len(entries) else "—"

    lines = [("| row | student protocol | student | relabel teacher top-1 | top-1 | random real | IOR | IOR per seed "
              "| s per run |"),
             "|---|---|---|---:|---:|---:|---:|---|---:|"]
    for (row, protocol), entries in sorted(groups.items()):
        entries.sort(key=lambda e: e["seed"])
        iors = [e["ior"] for e in entries]
        amp = sorted({e.get("amp", "not recorded") for e in entries})  # autocast: off (fp32) or the dtype
        name = f"{entries[0]['student']}, {entries[0]['epochs']} ep, autocast {'/'.join(amp)}"
        lines.append(f"| {row} | {protocol} | {name} | {teacher(entries)} | {spread([e['top1'] for e in entries])} | "
                     f"{spread([e['random_top1'] for e in entries])} | {statistics.mean(iors):+.2f} | "
                     f"{', '.join(f'{v:+.2f}' for v in iors)} (seeds {', '.join(str(e['seed']) for e in entries)}) | "
                     f"{statistics.mean(e['seconds'] for e in entries):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS,
                        help="recipes (scdd-imagenet, scdd-cifar100, sre2l-imagenet, sre2l-tiny-imagenet, sre2l-cifar) "
                        "and/or defaults")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--teacher-epochs", type=int, default=3, help="every teacher's epochs (SSL too)")
    parser.add_argument("--train-limit", type=int, default=2000, help="training images per class")
    parser.add_argument("--test-limit", type=int, default=None, help="test images per class (default: all)")
    parser.add_argument("--recover-iterations", type=int, default=None, help="cut every recipe's recover steps")
    parser.add_argument("--student-epochs", type=int, default=None, help="cut every student's epochs")
    parser.add_argument("--classes", nargs="+", type=int, default=None)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help="where every job runs (cuda: a GPU; the CPU cuts can then be lifted)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of every run (None: torch's default, all cores); recorded with its seconds")
    parser.add_argument("--out", default="bench-out/recipes", help="where the jobs write (outputs, teachers)")
    parser.add_argument("--log", default="bench/results/recipes.jsonl",
                        help="every run, one JSON line; runs it holds (same cuts) are not run again")
    parser.add_argument("--smoke", action="store_true", help="seconds: 2 classes, IPC 1, one seed, schedules of 1-2; "
                        "--out and --log go to a temporary folder")
    parser.add_argument("--table-from", help="print the table of a JSON-lines log and exit")
    args = parser.parse_args(argv)
    if args.table_from:
        print(table([json.loads(line) for line in Path(args.table_from).read_text().splitlines() if line.strip()]))
        return
    if args.smoke:
        apply_smoke(parser, args, SMOKE)
        smoke_into_temp(parser, args, "recipes")
    print(f"bench/recipes.py: rows {args.rows}, seeds {args.seeds}, IPC {args.ipc}; cuts {cuts(args)}", flush=True)
    results = run(args)
    print(table(results))


if __name__ == "__main__":
    main()
