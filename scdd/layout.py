"""Where a job keeps what it writes, relative to its output (the artifact store of the job), for the
library and the Ray workers alike.

What a user gets:
- `images/<class dir>/<source index>_<round>.png`   the distilled set, a torchvision ImageFolder (`.jpg` with
                                                     output.image_format jpeg)
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
