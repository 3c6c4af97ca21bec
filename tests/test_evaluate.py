"""kind evaluate (`scdd evaluate`): students trained on a distilled set that exists, and validate.students."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from api_schema import JobSpec, Report
from scdd.data import load_dataset
from scdd.errors import DataError
from scdd.pipeline import run_distillation
from scdd.validate.external_set import index_external_set
from scdd_cli import main
from tests.conftest import tiny_job

CLASSES = [0, 1]  # T-shirt/top, Trouser
NAMES = ("T-shirt/top", "Trouser")


def tiny_sections(fmnist_root) -> dict:
    """What the earlier run and the evaluation share: the data, the student protocol (and tiny_job's teacher of
    1 epoch, resources and seed)."""
    return {
        "method": "sre2l",
        "dataset": {"root": str(fmnist_root), "classes": CLASSES, "train_limit": 100, "test_limit": 40},
        "validate": {"enabled": True, "epochs": 30, "baseline": True},
    }


def test_scdd_evaluate_on_a_runs_output_reproduces_its_student_and_baseline(tmp_path, fmnist_root, capsys):
    shared = tiny_sections(fmnist_root)
    distill = JobSpec.model_validate(tiny_job(fmnist_root, tmp_path / "run", **shared,
                                              recover={"init": "real", "ipc": 2, "iterations": 0}))
    made = run_distillation(distill)
    assert made.complete and made.recover.images == 4 and made.validate_.student.top1 != 50  # not chance

    config = tmp_path / "evaluate.yaml"
    spec = distill.to_dict()
    config.write_text(yaml.safe_dump({key: spec[key] for key in ("method", "dataset", "teacher", "validate",
                                                                 "resources", "seed")}))
    code = main(["evaluate", "--config", str(config), "--images", str(tmp_path / "run"),
                 "--out", str(tmp_path / "judged"), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = Report.model_validate(json.loads((tmp_path / "judged/report.json").read_text()))
    assert report.kind == "evaluate" and report.teacher is None and report.recover is None
    assert report.evaluated.images == 4 and report.evaluated.classes == 2
    assert report.evaluated.images_url == str(tmp_path / "run")
    # the same images in the manifest's order, the same (cached) relabel teacher, the same protocol and seed
    assert report.validate_.relabel_teacher.source == "cached"
    assert report.validate_.student.top1 == made.validate_.student.top1
    assert report.validate_.baseline.top1 == made.validate_.baseline.top1  # 2 random real images per class again
    assert report.validate_.baseline.images == 4
    assert (tmp_path / "judged/teacher/relabel.pt").exists() and not (tmp_path / "judged/images").exists()
    assert "scdd evaluate:" in printed and "set       4 images of 2 classes" in printed


def write_folder(root, folders: dict[str, int], size: int = 20, mode: str = "RGB") -> None:
    """An ImageFolder of random PNGs: `folders` maps a class folder to its number of images."""
    rng = np.random.default_rng(0)
    for folder, count in folders.items():
        (root / folder).mkdir(parents=True)
        for i in range(count):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / folder / f"{i}.png")


def test_an_image_folder_of_pngs_evaluates_with_three_students(tmp_path, fmnist_root):
    """RGB 20 px PNGs in folders named after the classes (in reverse of sorted order on disk is irrelevant: by name)
    become 1-channel 28 px images; three architectures train on them, each beside its own baseline."""
    write_folder(tmp_path / "set", {"Trouser": 3, "T-shirt_top": 3})
    sections = tiny_sections(fmnist_root)
    sections["validate"] = {**sections["validate"], "mode": "hard", "students": ["convnet_in", "convnet_d1_w32",
                                                                                   "convnet"]}
    spec = JobSpec.model_validate({**tiny_job(fmnist_root, tmp_path / "out", **sections),
                                   "kind": "evaluate", "evaluate": {"images": str(tmp_path / "set")}})
    assert spec.job_id().startswith("fashion-mnist-evaluate-")
    report = run_distillation(spec)
    validate = report.validate_
    assert [row.arch for row in validate.students] == ["convnet_in", "convnet_d1_w32", "convnet"]
    first = validate.students[0]
    assert (first.top1, first.top5, first.total) == (validate.student.top1, validate.student.top5, 80)
    assert first.baseline_top1 == validate.baseline.top1 and first.ior == validate.ior
    for row in validate.students:
        assert 0 <= row.top1 <= 100 and row.ior == round(row.top1 - row.baseline_top1, 2)
    assert len({row.baseline_top1 for row in validate.students}) >= 2  # each arch its own baseline run
    assert validate.protocol.student_arch == "convnet_in" and validate.relabel_teacher is None
    assert report.evaluated.images == 6 and report.summary().images == 6

    found = index_external_set(str(tmp_path / "set"), load_dataset(spec.dataset, 0).info, spec)
    assert found.counts == (3, 3) and [e["label"] for e in found.entries] == [0, 0, 0, 1, 1, 1]
    assert found.entries[0]["path"] == "T-shirt_top/0.png"


def test_sets_that_do_not_fit_the_dataset_fail_with_one_clear_line(tmp_path, fmnist_root, capsys):
    spec = JobSpec.model_validate({"kind": "evaluate", "evaluate": {"images": str(tmp_path)},
                                   "dataset": {"root": str(fmnist_root), "classes": CLASSES}})
    info = load_dataset(spec.dataset, 0).info
    cases = {
        "three": ({"a": 1, "b": 1, "c": 1}, "has 3 class folders (a, b, c) and the dataset has 2 classes"),
        "unknown": ({"Trouser": 1, "Sneaker": 1}, "class folder 'Sneaker' of"),
        "empty": ({"Trouser": 2}, "has no images of class 'T-shirt/top'"),
        "sorted": ({"x": 2, "y": 1}, None),  # no name matches and the count fits: sorted order
    }
    for name, (folders, message) in cases.items():
        write_folder(tmp_path / name, folders, size=28, mode="L")
        if message is None:
            found = index_external_set(str(tmp_path / name), info, spec)
            assert found.counts == (2, 1)
            continue
        with pytest.raises(DataError, match="^.*" + message.replace("(", r"\(").replace(")", r"\)")):
            index_external_set(str(tmp_path / name), info, spec)
    with pytest.raises(DataError, match="is not a folder"):
        index_external_set(str(tmp_path / "missing"), info, spec)

    code = main(["evaluate", "--images", str(tmp_path / "three"), "--data-dir", str(fmnist_root), "--classes", "0,1",
                 "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("scdd: error: ") and "3 class folders" in err
