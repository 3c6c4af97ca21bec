"""Where a job keeps what it writes, relative to its output (the artifact store of the job), for the
library and the Ray workers alike.

What a user gets:
- `images/<class dir>/<source index>_<round>.png`   the distilled set, a torchvision ImageFolder (`.jpg` with
                                                     output.image_format jpeg); `class_folders` names the class
                                                     dirs (a name that cannot be a folder of every store and URL
                                                     is stored under a safe one; the manifest maps them back)
- `manifest.json`                                    every image (class, round, sha256, size, origin)
- `report.json`                                      the report (`api_schema.Report`)
- `grid.png`                                         a preview, one row per class
- `teacher/teacher.pt`, `teacher/relabel.pt`         the recovery teacher; the KD relabel teacher when another

What a run keeps to resume (`state/`):
- `state/spec.json`                                  the spec's recover digest: a different spec is refused
- `state/init/c<class>.pt`, `state/init/c<class>.json`  real-pixel initial images of a class and their provenance
- `state/init/planned.json`                          every class's initialisation is planned
- `state/plan.json`                                  the worker count the recover units are cut for (its first recover)
- `state/units/r<round>-b<batch>.json`               one record per finished recover unit
- `state/parts/r<round>-b<batch>-w<rank>.json`       a distributed recover worker's share of a unit
- `state/train/<stage>/...`                          Ray Train stages: initial and final weights, checkpoints, result

The teacher cache (`output.teacher_cache`) is another store: `<digest>.pt` per trained teacher, and
`full-data/<key>.json` per full-data accuracy of DD-Ranking.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

IMAGES_DIR = "images"
MANIFEST = "manifest.json"
REPORT = "report.json"
GRID = "grid.png"
TEACHER_PATH = "teacher/teacher.pt"
RELABEL_PATH = "teacher/relabel.pt"

SPEC_RECORD = "state/spec.json"
INIT_DIR = "state/init"
INIT_DONE = f"{INIT_DIR}/planned.json"
PLAN_RECORD = "state/plan.json"
UNITS_DIR = "state/units"
PARTS_DIR = "state/parts"
TRAIN_DIR = "state/train"

FULL_DATA_DIR = "full-data"  # in the teacher cache


def init_pixels_path(label: int) -> str:
    return f"{INIT_DIR}/c{label:05d}.pt"


def init_origins_path(label: int) -> str:
    return f"{INIT_DIR}/c{label:05d}.json"


def unit_record_path(unit_name: str) -> str:
    return f"{UNITS_DIR}/{unit_name}.json"


def part_record_path(unit_name: str, rank: int) -> str:
    return f"{PARTS_DIR}/{unit_name}-w{rank:03d}.json"


def train_path(stage: str, name: str) -> str:
    """A file of Ray Train stage `stage` (validate, baseline, squeeze-ssl, ...)."""
    return f"{TRAIN_DIR}/{stage}/{name}"


def full_data_record_path(key: str) -> str:
    return f"{FULL_DATA_DIR}/{key}.json"


# A class folder may not hold what the job service refuses in an artifact path (service/artifacts.py check_relative:
# a second URL encoding `%`, a backslash, control characters) nor a `/`; "", "." and ".." name no folder.
_UNSAFE_FOLDER = re.compile(r"[\\%/\x00-\x1f\x7f]")
_NOT_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
ENCODED_NAME_CHARS = 48  # of the class name kept (sanitised) in an encoded folder name


def safe_folder(name: str) -> bool:
    """Whether class name `name` can be its own output folder: one path segment the service lists, serves and zips,
    in UTF-8."""
    if name in ("", ".", "..") or _UNSAFE_FOLDER.search(name):
        return False
    try:
        name.encode()
    except UnicodeEncodeError:  # a file name's undecodable bytes (surrogates): not UTF-8
        return False
    return True


def class_folders(names: Sequence[str]) -> tuple[str, ...]:
    """The output folder of each class of a dataset (`names`: all its classes, in source order, so a class's folder
    does not depend on the subset a job chooses). A safe name (`safe_folder`) is its own folder, so the outputs of
    ordinary names keep their layout; any other becomes `c<source index:05d>-<the name, sanitised>` (only
    [A-Za-z0-9._-]), made unique against every other folder of the dataset, deterministic. The manifest records
    each class's name beside its folder (`classes[].name` / `.dir`); an encoded folder may sort out of class order,
    so sets are read back through the manifest, not by sorting folders."""
    taken = {name for name in names if safe_folder(name)}
    folders = []
    for index, name in enumerate(names):
        if safe_folder(name):
            folders.append(name)
            continue
        base = f"c{index:05d}-{_NOT_SAFE_CHARS.sub('_', name).strip('._')[:ENCODED_NAME_CHARS] or 'class'}"
        folder, n = base, 1
        while folder in taken:
            folder, n = f"{base}-{n}", n + 1
        taken.add(folder)
        folders.append(folder)
    return tuple(folders)
