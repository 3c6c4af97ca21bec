import json
import subprocess
import sys

import pytest

import scdd
from scdd.cli import DISTILL_FLAGS
from scdd_cli import main as scdd_main


def scdd_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "scdd_cli", *args], capture_output=True, text=True, timeout=timeout)


def test_version():
    result = scdd_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"scdd {scdd.__version__}"


def test_distill_help_explains_every_flag():
    result = scdd_cli("distill", "--help")
    assert result.returncode == 0
    for flag in [*DISTILL_FLAGS, "--config", "--no-validate"]:
        assert flag in result.stdout


def test_distill_end_to_end_on_fashion_mnist(tmp_path, fmnist_root):
    out = tmp_path / "run"
    args = (
        "distill", "--method", "sre2l", "--data-dir", str(fmnist_root), "--classes", "0,Trouser,2", "--train-limit", "60",
        "--teacher-epochs", "1", "--ipc", "2", "--iterations", "5", "--validate-epochs", "2", "--test-limit", "200",
        "--device", "cpu", "--amp", "off", "--out", str(out), "--quiet",
    )
    result = scdd_cli(*args)
    assert result.returncode == 0, result.stderr
    assert f"output    {out}" in result.stdout and "validate  convnet student, kd 2 epochs" in result.stdout
    assert "baseline  same protocol on 6 random real images" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["recover"]["images"] == 6
    assert report["dataset"]["train_images"] == 180 and report["dataset"]["test_images"] == 600
    assert report["dataset"]["test_limit"] == 200 and "on 600 real test images (dataset.test_limit 200 per class)" in result.stdout
    assert report["validate"]["student"]["total"] == 600 and 0 <= report["validate"]["student"]["top1"] <= 100
    assert set(report["stage_seconds"]) == {"load", "squeeze", "recover", "write", "validate", "baseline"}
    assert len(list((out / "images").rglob("*.png"))) == 6

    again = scdd_cli(*args)  # the same command resumes: teacher and units reused, nothing rewritten
    assert again.returncode == 0, again.stderr
    assert "(resumed)" in again.stdout and "convnet (resumed)" in again.stdout  # the output's own teacher
    assert json.loads((out / "report.json").read_text())["recover"]["units_run"] == 0


def test_config_file_with_flag_override(tmp_path, fmnist_root, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(f"dataset:\n  root: {fmnist_root}\n  classes: [1, 2]\nrecover:\n  ipc: 7\n")
    assert scdd_main(["distill", "--config", str(config), "--ipc", "2", "--print-spec"]) == 0
    out = capsys.readouterr().out
    assert "ipc: 2" in out and "- 1\n  - 2" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--teacher-arch", "vgg11"], "teacher.arch: Input should be 'convnet'"),
        (["--ipc", "0"], "recover.ipc: Input should be greater than or equal to 1"),
        (["--data-dir", "/nonexistent/fm"], "Fashion-MNIST folder /nonexistent/fm does not exist"),
        (["--classes", "0,Socks"], "unknown class 'Socks'"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--init", "bogus"], "recover.init: Input should be 'herding', 'kmeans', 'noise', 'real' or 'selected'"),
        (["--init", "selected", "--ipc", "200"], "recover.select.candidates (100) must be >= recover.ipc (200)"),
        (["--preset", "longest"], "validate.preset: Input should be 'quick' or 'long'"),
    ],
)
def test_bad_input_gives_a_clear_error_without_traceback(args, message, capsys):
    # in this process (the console script's own `main`; test_distill_end_to_end runs the real one): a process start
    # per case cost more than the cases
    code = scdd_main(["distill", "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err


def test_distill_scdd_end_to_end_writes_every_report_key(tmp_path, fmnist_root):
    out = tmp_path / "scdd"
    result = scdd_cli(
        "distill", "--method", "scdd", "--data-dir", str(fmnist_root), "--classes", "0,1,8", "--train-limit", "80",
        "--ssl-epochs", "1", "--probe-epochs", "5", "--teacher-epochs", "1", "--ipc", "2", "--iterations", "5",
        "--validate-epochs", "3", "--mix", "mixup", "--temperature", "2", "--device", "cpu", "--amp", "off",
        "--relabel-teacher", "supervised", "--test-limit", "200", "--out", str(out), "--quiet",
    )
    assert result.returncode == 0, result.stderr
    assert "moco_v2 backbone + linear probe" in result.stdout
    report = json.loads((out / "report.json").read_text())
    teacher = report["teacher"]
    assert teacher["source"] == "trained" and teacher["ssl"]["source"] == "pretrained"
    assert len(teacher["ssl"]["epoch_losses"]) == 1 and 0 <= teacher["probe"]["top1"] <= 100
    assert [row["layer"] for row in teacher["bn_running_var"]] == ["features.1", "features.5", "features.9"]
    assert all({"mean", "std", "min", "max", "channels"} <= set(row) for row in teacher["bn_running_var"])
    val = report["validate"]
    assert val["protocol"] == {
        "mode": "kd", "preset": "quick", "student_arch": "convnet", "epochs": 3, "batch_size": 64, "optimizer": "adamw",
        "lr": 0.001, "weight_decay": 0.01, "temperature": 2.0, "mix": "mixup", "mix_alpha": 1.0, "crop_scale": [0.5, 1.0],
        "ema_decay": 0.0, "schedule_span": 1.0,
    }
    for key in ("student", "baseline"):
        assert {"top1", "top5", "total"} <= set(val[key]) and val[key]["total"] == 600
    assert val["ior"] == val["gain_top1"] == round(val["student"]["top1"] - val["baseline"]["top1"], 2)
    assert f"IOR {val['ior']:+.2f} points" in result.stdout
    assert val["relabel_teacher"]["source"] == "trained" and 0 <= val["relabel_teacher"]["top1"] <= 100
    assert set(report["stage_seconds"]) == {"load", "squeeze", "recover", "write", "validate", "baseline"}
    assert (out / "teacher" / "teacher.pt").exists() and (out / "teacher" / "relabel.pt").exists()

    # A second job with the same squeeze settings (and another cut of the test split) reuses the cached teacher.
    again = scdd_cli(
        "distill", "--method", "scdd", "--data-dir", str(fmnist_root), "--classes", "0,1,8", "--train-limit", "80",
        "--ssl-epochs", "1", "--probe-epochs", "5", "--teacher-epochs", "1", "--ipc", "1", "--iterations", "5",
        "--validate-mode", "hard", "--validate-epochs", "2", "--test-limit", "100", "--device", "cpu", "--amp", "off",
        "--out", str(tmp_path / "second"), "--quiet",
    )
    assert again.returncode == 0, again.stderr
    second = json.loads((tmp_path / "second" / "report.json").read_text())
    assert second["teacher"]["source"] == "cached" and second["teacher"]["digest"] == teacher["digest"]
    assert second["teacher"]["bn_running_var"] == teacher["bn_running_var"]
    assert second["validate"]["protocol"]["student_arch"] == "convnet_in" and "relabel_teacher" not in second["validate"]
