"""The typed report (api_schema.Report) against real reports written before it existed
(tests/fixtures/reports/, see its README), and the keys of a report the pipeline writes now."""

import json
from pathlib import Path

import pytest

from api_schema import JobSpec, JobSummary, Report
from scdd.pipeline import run_distillation
from scdd.cli import describe_report
from tests.conftest import TEST_LIMIT, tiny_job

FIXTURES = Path(__file__).parent / "fixtures"
OLD_REPORTS = sorted((FIXTURES / "reports").glob("*.json"))


def old_report(name: str) -> dict:
    return json.loads((FIXTURES / "reports" / name).read_text())


def tiny_job_key_paths(report: dict) -> set[str]:
    """The key paths of a report of a tiny job, less the test split cut it adds (conftest.TEST_LIMIT) and the
    normalisation facts added since the old reports were written (issue 26)."""
    assert report["dataset"]["test_limit"] == TEST_LIMIT
    return key_paths(report) - {"dataset.test_limit", "dataset.mean", "dataset.std", "dataset.normalization"}


def key_paths(value, prefix: str = "") -> set[str]:
    """Every key of a JSON document as a dotted path; list items share `[]`."""
    paths = set()
    if isinstance(value, dict):
        for key, item in value.items():
            paths |= {prefix + key} | key_paths(item, f"{prefix}{key}.")
    elif isinstance(value, list):
        for item in value:
            paths |= key_paths(item, f"{prefix}[].")
    return paths


@pytest.mark.parametrize("path", OLD_REPORTS, ids=lambda path: path.stem)
def test_an_old_report_loads_and_writes_back_unchanged(path):
    old = json.loads(path.read_text())
    assert Report.model_validate(old).to_json_dict() == old


def test_an_old_report_reads_as_typed_numbers():
    report = Report.model_validate(old_report("scdd-kd-ranking.json"))
    val = report.validate_
    assert val.ior == val.gain_top1 == val.dd_ranking.ior == -22.77
    assert val.dd_ranking.lrs == 0.1266 and val.dd_ranking.hard_protocol.temperature is None
    assert val.protocol.temperature == 4.0 and val.protocol.crop_scale == (0.5, 1.0)
    assert report.teacher.ssl.method == "moco_v2" and report.teacher.ssl.epoch_losses == [3.6929]
    assert [row.layer for row in report.teacher.bn_running_var] == ["features.1", "features.5", "features.9"]
    assert report.summary() == JobSummary(teacher_top1=74.5, images=6, student_top1=val.student.top1,
                                          baseline_top1=56.1, ior=-22.77, output=report.output)

    partial = Report.model_validate(old_report("sre2l-partial.json"))
    assert partial.partial and partial.validate_ is None and partial.recover.images == 3
    assert partial.summary().student_top1 is None and partial.summary().images == 3

    ray = Report.model_validate(old_report("scdd-ray-2-workers.json"))
    assert ray.recover.workers == 2 and ray.validate_.student.workers == 2
    assert [e.epoch for e in ray.validate_.student.epochs] == [1, 2] and ray.validate_.baseline.resumed_at_epoch is None


def test_the_printed_summary_says_which_test_images_the_accuracies_are_on():
    old = Report.model_validate(old_report("scdd-kd-ranking.json"))
    assert old.dataset.test_limit is None
    assert describe_report(old).count("on the whole real test split") == 2  # teacher and student
    cut = old.model_copy(update={"dataset": old.dataset.model_copy(update={"test_limit": 200, "test_images": 600})})
    assert describe_report(cut).count("on 600 real test images (dataset.test_limit 200 per class)") == 2


def test_the_summary_of_an_old_report_is_the_one_its_job_finished_with():
    event = json.loads((FIXTURES / "events" / "job_finished-scdd-ray-2-workers.json").read_text())
    report = Report.model_validate(old_report("scdd-ray-2-workers.json"))
    assert report.summary().model_dump() == event["summary"]


def test_the_pipeline_writes_the_keys_of_an_old_partial_report(tmp_path, fmnist_root):
    """The spec that wrote fixtures/reports/sre2l-partial.json, run again."""
    out = tmp_path / "sre2l-partial"
    spec = tiny_job(fmnist_root, out, recover={"ipc": 2, "iterations": 3, "batch_size": 3, "init": "real"},
                    validate={"enabled": True, "epochs": 1},
                    output={"url": str(out), "teacher_cache": str(tmp_path / "cache")})
    report = run_distillation(JobSpec.model_validate(spec), max_units=1)
    written = json.loads((out / "report.json").read_text())
    assert written == report.to_json_dict()
    assert tiny_job_key_paths(written) == key_paths(old_report("sre2l-partial.json"))


@pytest.mark.slow
def test_the_pipeline_writes_the_keys_of_an_old_full_report(tmp_path, fmnist_root):
    """The spec that wrote fixtures/reports/scdd-kd-ranking.json (SSL teacher, supervised relabel
    teacher, baseline, DD-Ranking), run again."""
    out = tmp_path / "scdd-kd-ranking"
    spec = tiny_job(fmnist_root, out, method="scdd",
                    recover={"ipc": 2, "iterations": 3, "batch_size": 3, "init": "noise"},
                    validate={"enabled": True, "epochs": 1, "dd_ranking": True, "full_data_epochs": 1,
                              "relabel_teacher": "supervised"},
                    output={"url": str(out), "teacher_cache": str(tmp_path / "cache")})
    spec["teacher"] = {"epochs": 1, "batch_size": 64, "probe": {"epochs": 2},
                       "ssl": {"epochs": 1, "batch_size": 64, "queue_size": 256}}
    report = run_distillation(JobSpec.model_validate(spec))
    written = json.loads((out / "report.json").read_text())
    assert written == report.to_json_dict()
    assert tiny_job_key_paths(written) == key_paths(old_report("scdd-kd-ranking.json"))


def test_the_reports_student_protocol_has_the_fields_of_the_protocol_that_ran():
    """api_schema cannot import scdd (it is the layer below), so the report's copy of the protocol's fields is
    kept in step here."""
    from dataclasses import fields

    from api_schema.report import StudentProtocol
    from scdd.validate.protocol import Protocol

    assert set(StudentProtocol.model_fields) == {field.name for field in fields(Protocol)}
