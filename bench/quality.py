"""Distillation quality on Fashion-MNIST: every set against random real images under the identical protocol.

For each seed and IPC, every row runs the pipeline (squeeze once per seed and method, cached; recover;
validate) and the random-real baseline is trained once per (seed, IPC, preset, mode) with the same student,
protocol and relabel teacher (the supervised teacher for every row, so rows differ only in their images) —
unless the log already holds it for that seed (it is deterministic; `--rerun-baselines` trains it anyway).
scdd rows log their MoCo epochs (`--ssl-epochs`; bench/ssl_backbone.py pretrains and caches the backbone
they then reuse), gvbsm rows their backbones; the table names both.
Top-1 is on the whole 10 000-image test split; the table gives mean ± half-range over seeds, IOR (the row's
mean minus random real's mean, DD-Ranking's improvement over random) and the mean seconds of a row's
recover + validation. Every run is appended to a JSON-lines file. The defaults were chosen on held-out
training images (bench/init_study.py), never on this test split.

    python bench/quality.py                          # the README's table (times: docs/benchmarks-and-findings.md)
    python bench/quality.py --quick                  # a few minutes: IPC 1 and 10, one seed, short schedules
    python bench/quality.py --ipc 50 --rows sre2l/herding --seeds 0 1 2
    python bench/quality.py --table-from bench/results/quality.jsonl   # the table of every logged run
    python bench/quality.py --smoke                  # seconds: 2 classes, 30 images each, IPC 1, schedules of 1-2

`--teachers-of-seed 0` makes every seed use the teachers seed 0 trained (cached), so seeds vary the picked
images, the random subset and the student only; without it every seed trains its own teachers.

`--ensemble convnet,convnet_d2_w32,convnet_d1_w32` sets the backbones of gvbsm rows (teacher.ensemble; the
default has WRN-16-2, whose training on all 60 000 images takes long on a CPU).

`--relabel-arch resnet18_small` judges the sets with soft labels from a supervised teacher of another
architecture (trained once on all training images with `--teacher-epochs`, cached) than the one the sets
were recovered and picked with; the random-real baseline gets the same soft labels. Its rows are logged and
tabled apart (`[relabel resnet18_small]`). `--relabel-ssl-epochs 12` does the same with SC-DD's teacher (the MoCo v2
backbone of 12 epochs plus its linear probe, seed 0) that `python bench/ssl_backbone.py --epochs 12` cached: the
strongest teacher here, to see whether a better labeller widens the gap between picked and random images
(`[relabel scdd[MoCo 12 ep]]`).

A row is `<method>/<init>` (method sre2l, scdd or gvbsm; init noise, real, selected, herding) with an optional
`@quick` (the quick preset instead of the long one); `random` is the baseline and always runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from api_schema import JobSpec
from scdd.models import checkpoint_bytes
from scdd.pipeline import run_distillation

from benchlib import apply_smoke, smoke_into_temp  # bench/benchlib.py

DEFAULT_ROWS = ["sre2l/noise", "scdd/noise", "sre2l/real", "sre2l/selected", "sre2l/herding", "scdd/herding",
                "scdd/herding@quick"]
SMOKE = {"ipc": [1], "seeds": [0], "rows": ["sre2l/noise", "scdd/herding@quick"], "hard_ipc": [1],
         "hard_rows": ["sre2l/noise"], "teacher_epochs": 1, "ssl_epochs": 1}


def dataset_cuts(args) -> dict:
    """The training (and, smoke only, class and test) images a run uses: all, 1000 a class for --quick."""
    if args.smoke:
        return {"train_limit": 30, "test_limit": 30, "classes": [0, 1]}
    return {"train_limit": 1000 if args.quick else None}  # None: all 60 000 training images


def teacher_files(method: str, args, out: Path) -> dict:
    """--teachers-of-seed S: the recovery and relabel teachers that seed S trained (and cached), as checkpoints."""
    if args.teachers_of_seed is None:
        return {}
    owner = job(f"{method}/noise", 1, args.teachers_of_seed, "kd", False, args, out, shared_teachers=False)
    cache = out / "teachers"
    recovery, relabel = cache / f"{owner.teacher_digest()}.pt", cache / f"{owner.supervised_teacher_digest()}.pt"
    for path in (recovery, relabel):
        if not path.exists():
            raise SystemExit(f"{path} is missing: run seed {args.teachers_of_seed} first (it trains the teachers)")
    return {"teacher": str(recovery), "relabel": str(relabel)}


def other_relabel_teacher(args, out: Path) -> tuple[str, float]:
    """--relabel-arch: a supervised teacher of that architecture on the rows' training images (cached), saved as a
    checkpoint that names its architecture; returns its path and test top-1."""
    from scdd.data import load_dataset
    from scdd.evaluate import evaluate
    from scdd.progress import ConsoleProgress
    from scdd.runtime import resolve_runtime
    from scdd.squeeze.teachers import TeacherCache, recovery_teacher

    spec = JobSpec.model_validate({"method": "sre2l", "seed": 0, "dataset": dataset_cuts(args),
                                   "teacher": {"arch": args.relabel_arch, "epochs": args.teacher_epochs}})
    path = out / "teachers" / f"relabel-{args.relabel_arch}-e{args.teacher_epochs}.pt"
    data = load_dataset(spec.dataset, spec.seed)
    runtime = resolve_runtime(spec.resources)
    teacher = recovery_teacher(spec, data, TeacherCache(str(out / "teachers")), runtime, ConsoleProgress())
    info = data.info
    path.write_bytes(checkpoint_bytes(teacher.model, arch=args.relabel_arch, num_classes=info.num_classes,
                                      in_channels=info.channels, image_size=info.image_size))
    return str(path), evaluate(teacher.model, data.test, runtime).top1


def ssl_relabel_teacher(args, out: Path) -> tuple[str, float]:
    """--relabel-ssl-epochs E: the SC-DD teacher bench/ssl_backbone.py cached (MoCo v2 E epochs + probe, seed 0);
    returns its checkpoint and test top-1."""
    from scdd.data import load_dataset
    from scdd.evaluate import evaluate
    from scdd.models import model_from_checkpoint
    from scdd.runtime import resolve_runtime
    from ssl_backbone import scdd_spec  # bench/ssl_backbone.py: the spec whose teacher it cached

    spec = scdd_spec(args.relabel_ssl_epochs, 1000 if args.quick else None, args.teacher_epochs)
    path = out / "teachers" / f"{spec.teacher_digest()}.pt"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run python bench/ssl_backbone.py --epochs {args.relabel_ssl_epochs} first")
    model, _meta = model_from_checkpoint(path.read_bytes(), str(path))
    runtime = resolve_runtime(spec.resources)
    return str(path), evaluate(model.to(runtime.device), load_dataset(spec.dataset, spec.seed).test, runtime).top1


class Relabel(NamedTuple):
    """A relabel teacher every row and baseline share instead of the supervised ConvNet."""

    checkpoint: str
    top1: float  # on the test split
    name: str  # in the log and the table
    folder_tag: str  # in the runs' output folders: runs judged by another teacher keep their own


def relabel_override(args, out: Path) -> Relabel | None:
    """--relabel-arch or --relabel-ssl-epochs; None: the supervised ConvNet of each row's spec."""
    if args.relabel_arch and args.relabel_ssl_epochs:
        raise SystemExit("pass --relabel-arch or --relabel-ssl-epochs, not both")
    if args.relabel_arch:
        return Relabel(*other_relabel_teacher(args, out), args.relabel_arch, f"-relabel-{args.relabel_arch}")
    if args.relabel_ssl_epochs:
        epochs = args.relabel_ssl_epochs
        return Relabel(*ssl_relabel_teacher(args, out), f"scdd[MoCo {epochs} ep]", f"-relabel-moco{epochs}")
    return None


def job(row: str, ipc: int, seed: int, mode: str, baseline: bool, args, out: Path, shared_teachers: bool = True) -> JobSpec:
    method, init = row.split("@")[0].split("/")
    shared = teacher_files(method, args, out) if shared_teachers and seed != args.teachers_of_seed else {}
    preset = "quick" if row.endswith("@quick") else "long"
    relabel = args.relabel.checkpoint if args.relabel else shared.get("relabel")
    validate = {"mode": mode, "preset": preset, "baseline": baseline, "relabel_teacher": "supervised",
                **({"relabel_checkpoint": relabel} if relabel else {})}
    if args.quick or args.smoke:
        validate["epochs"] = 2 if args.smoke else 30 if mode == "kd" else 60
    recover = {"ipc": ipc, "init": init, "select": {"candidates": max(100, 2 * ipc)}}
    if args.smoke:
        recover["iterations"] = 2
    elif args.quick and init == "noise":
        recover["iterations"] = 100
    return JobSpec.model_validate({
        "method": method,
        "seed": seed,
        "dataset": dataset_cuts(args),
        "teacher": {"epochs": args.teacher_epochs, "ssl": {"epochs": args.ssl_epochs},
                    **({"ensemble": args.ensemble.split(",")} if args.ensemble else {}),
                    **({"checkpoint": shared["teacher"]} if shared else {})},
        "recover": recover,
        "validate": validate,
        "output": {"url": str(out / f"{row.replace('/', '-').replace('@', '-')}{teacher_tag(method, args)}-{mode}"
                                      f"{args.relabel.folder_tag if args.relabel else ''}-ipc{ipc}-seed{seed}"),
                   "teacher_cache": str(out / "teachers")},
    })


def teacher_tag(method: str, args) -> str:
    """What sets a row's teacher apart in its output folder's name (runs of other teachers stay where they are)."""
    if method == "scdd" and args.ssl_epochs != 2:
        return f"-moco{args.ssl_epochs}"
    if method == "gvbsm" and args.ensemble:
        return "-" + args.ensemble.replace(",", "+")
    return ""


def cell(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {(max(values) - min(values)) / 2:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ipc", type=int, nargs="+")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS)
    parser.add_argument("--hard-ipc", type=int, nargs="*", default=[1, 10], help="IPCs with hard-label rows too")
    parser.add_argument("--hard-rows", nargs="*", default=["sre2l/herding"], help="rows run with hard labels")
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--ssl-epochs", type=int, default=2)
    parser.add_argument("--teachers-of-seed", type=int,
                        help="every seed uses the teachers this seed trained (so seeds vary images and students only)")
    parser.add_argument("--ensemble", help="gvbsm rows: comma-separated backbones (teacher.ensemble)")
    parser.add_argument("--relabel-arch", help="soft labels from a supervised teacher of this architecture instead")
    parser.add_argument("--relabel-ssl-epochs", type=int,
                        help="soft labels from the SC-DD teacher with this many MoCo epochs (bench/ssl_backbone.py)")
    parser.add_argument("--out", default="bench/out/quality")
    parser.add_argument("--log", default="bench/results/quality.jsonl")
    parser.add_argument("--table-from", metavar="JSONL", help="print the table of the runs in this log and exit")
    parser.add_argument("--rerun-baselines", action="store_true",
                        help="train the random-real baseline even where --log holds it for the seed (it is deterministic)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, every code path of a run: " + ", ".join(f"{k} {v}" for k, v in SMOKE.items())
                        + ", 2 classes of 30 images, 2 recover iterations and student epochs; --out and --log go to a "
                        "temporary folder")
    args = parser.parse_args(argv)
    if args.smoke:
        apply_smoke(parser, args, SMOKE)
        smoke_into_temp(parser, args, "quality")
    ipcs = args.ipc or ([1, 10] if args.quick else [1, 10, 50])
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    out = Path(args.out)

    if args.table_from:
        print_table([json.loads(line) for line in open(args.table_from) if line.strip()], args.quick)
        return
    records: list[dict] = []
    logged = logged_baselines([json.loads(line) for line in open(args.log) if line.strip()] if Path(args.log).exists() else [])
    args.relabel = relabel_override(args, out)
    relabel = args.relabel.name if args.relabel else None
    if args.relabel:
        print(f"relabel teacher {relabel}: test top-1 {args.relabel.top1:.2f}", flush=True)
    plan = [(mode, row) for mode in ("kd", "hard") for row in (args.rows if mode == "kd" else args.hard_rows)]
    for seed in seeds:
        for ipc in ipcs:
            baselines_done: set[tuple] = set()
            for mode, row in plan:
                if mode == "hard" and ipc not in args.hard_ipc:
                    continue
                preset = "quick" if row.endswith("@quick") else "long"
                key = (ipc, mode, preset, relabel)
                baseline = (preset, mode) not in baselines_done and (args.rerun_baselines or seed not in logged.get(key, {}))
                baselines_done.add((preset, mode))
                started = time.perf_counter()
                report = run_distillation(job(row, ipc, seed, mode, baseline, args, out))
                stages, val = report.stage_seconds, report.validate_
                record = {"seed": seed, "ipc": ipc, "row": row, "mode": mode, "preset": preset, "quick": args.quick,
                          "student_top1": val.student.top1, "teacher_top1": report.teacher.top1,
                          "seconds": round(stages.get("recover", 0) + stages.get("validate", 0), 1)}
                if val.baseline:
                    record["random_top1"] = val.baseline.top1
                elif seed in logged.get(key, {}):
                    record["random_logged"] = logged[key][seed]  # for the table of this run only
                if row.startswith("scdd/"):
                    record["ssl_epochs"] = args.ssl_epochs
                if row.startswith("gvbsm/") and args.ensemble:
                    record["ensemble"] = args.ensemble
                if relabel:
                    record.update(relabel=relabel, relabel_top1=args.relabel.top1)
                records.append(record)
                Path(args.log).parent.mkdir(parents=True, exist_ok=True)
                with open(args.log, "a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"seed {seed} ipc {ipc:3d} {mode:4s} {row:20s}: student {val.student.top1:.2f}%"
                      + (f", random real {val.baseline.top1:.2f}%" if val.baseline else "")
                      + f"  ({time.perf_counter() - started:.0f} s)", flush=True)

    print_table(records, args.quick)


def row_label(r: dict) -> str:
    """The row's name in the table: scdd rows say how long their MoCo backbone trained (when logged), gvbsm rows
    their backbones when not the default."""
    method, rest = r["row"].split("/", 1)
    if method == "scdd" and r.get("ssl_epochs"):
        method += f"[MoCo {r['ssl_epochs']} ep]"
    if method == "gvbsm" and r.get("ensemble"):
        method += f"[{r['ensemble']}]"
    return f"{method}/{rest}"


def random_key(r: dict) -> tuple:
    """What a random-real baseline depends on: IPC, labels, preset and relabel teacher (not the row)."""
    return (r["ipc"], r["mode"], r["preset"], r.get("relabel"))


def logged_baselines(records: list[dict]) -> dict[tuple, dict[int, float]]:
    """random real top-1 per random_key and seed (the latest run of each; the baseline is deterministic)."""
    found: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in records:
        if "random_top1" in r and not r.get("quick"):
            found[random_key(r)][r["seed"]] = r["random_top1"]
    return found


def print_table(records: list[dict], quick: bool) -> None:
    """The markdown table of `records` (runs as bench/results/quality.jsonl holds them): per row the mean over
    seeds (the latest run of each seed), IOR against the random-real baseline of the same seeds."""
    top1: dict[tuple, dict[int, float]] = defaultdict(dict)
    seconds: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        mode = r["mode"] + (f" [relabel {r['relabel']}]" if r.get("relabel") else "")
        top1[(r["ipc"], row_label(r), mode)][r["seed"]] = r["student_top1"]
        seconds[(r["ipc"], row_label(r), mode)].append(r["seconds"])
        random_top1 = r.get("random_top1", r.get("random_logged"))  # random_logged: a baseline reused from the log
        if random_top1 is not None:
            top1[(r["ipc"], "random" + ("@quick" if r["preset"] == "quick" else ""), mode)][r["seed"]] = random_top1
    seeds = sorted({r["seed"] for r in records})
    print(f"\nFashion-MNIST, ConvNet students, top-1 % on the full test split, seeds {seeds}"
          + (" (quick mode: 1000 train images per class, short schedules)" if quick else ""))
    print("| IPC | labels | images | preset | seeds | top-1 | IOR (points) | s |")
    print("|---:|---|---|---|---|---:|---:|---:|")
    for ipc in sorted({r["ipc"] for r in records}):
        modes = dict.fromkeys(key[2] for key in top1 if key[0] == ipc)
        for mode in sorted(modes, key=lambda m: (m.startswith("hard"), m)):
            rows = list(dict.fromkeys(key[1] for key in top1 if key[2] == mode and key[0] == ipc
                                      and not key[1].startswith("random")))
            for source in ["random", "random@quick", *rows]:
                by_seed = top1.get((ipc, source, mode))
                if not by_seed:
                    continue
                preset = "quick" if source.endswith("@quick") else "long"
                base = top1.get((ipc, "random" + ("@quick" if preset == "quick" else ""), mode), {})
                ior = "—"
                common = sorted(set(by_seed) & set(base))
                if common and not source.startswith("random"):
                    gains = [by_seed[s] - base[s] for s in common]
                    ior = f"{statistics.mean(gains):+.2f}"
                    if len(gains) > 1:
                        ior += f" (per seed {', '.join(f'{g:+.2f}' for g in gains)})"
                secs = seconds.get((ipc, source, mode))
                label = source.split("@")[0]
                print(f"| {ipc} | {mode} | {label} | {preset} | {','.join(map(str, sorted(by_seed)))} | "
                      f"{cell(list(by_seed.values()))} | {ior} | {f'{statistics.mean(secs):.0f}' if secs else '—'} |")


if __name__ == "__main__":
    main()
