"""bench/gpu_check.py, the one prepared GPU check, in its CPU mode (issue 17): every part reports a
status and positive numbers where it ran, without pydantic (the lent GPU machine may lack it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from api_schema import RecoverSpec, ResourcesSpec, ValidateSpec

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
PARTS = {"recover/resnet18@32", "recover/resnet18_small@8", "global/W=1", "global/W=2", "validate/kd", "ray/actor"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run of `bench/gpu_check.py --smoke` (`--device cpu --tiny`) with pydantic made unimportable."""
    root = tmp_path_factory.mktemp("gpu_check")
    (root / "hidden" / "pydantic").mkdir(parents=True)
    (root / "hidden" / "pydantic" / "__init__.py").write_text('raise ImportError("pydantic is hidden by the test")\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "hidden"), os.environ.get("PYTHONPATH")]))}
    out = root / "check.json"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--smoke", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    return proc, json.loads(out.read_text()) if out.exists() else None


def test_tiny_check_runs_every_part_without_pydantic(tiny_run):
    proc, document = tiny_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert document["environment"]["pydantic_importable"] is False
    assert "synthetic" in document["teachers"]
    parts = {part["part"]: part for part in document["parts"]}
    assert set(parts) == PARTS
    for name, part in parts.items():
        assert part["status"] == ("skipped" if name == "ray/actor" else "ok"), part
        assert part["seconds"] > 0 and part["budget_s"] > 0
        for row in part["rows"]:
            assert row["rate"] > 0, row
        assert name in proc.stdout  # the printed table
    assert "CUDA" in parts["ray/actor"]["cause"]


def test_tiny_check_reports_rates_flops_and_yardstick_ratio(tiny_run):
    _, document = tiny_run
    parts = {part["part"]: part for part in document["parts"]}
    for name in ("recover/resnet18@32", "recover/resnet18_small@8"):
        rows = parts[name]["rows"]
        assert [row["case"] for row in rows] == ["yardstick", "fp32", "auto"]
        assert rows[0]["vs_yardstick"] == 1.0
        for row in rows:
            assert row["tflops"] > 0 and row["workload_h"] > 0 and row["vs_yardstick"] > 0
            assert row["mib_per_image"] is None and row["compile_s"] is None  # CPU, eager below the compile threshold
    for name in ("global/W=1", "global/W=2"):
        assert "gloo" in parts[name]["rows"][0]["note"]
    assert parts["validate/kd"]["rows"][0]["unit"] == "img/s" and parts["validate/kd"]["rows"][0]["tflops"] > 0


def _sections_as_dicts(value):
    if hasattr(value, "__dict__"):
        return {key: _sections_as_dicts(item) for key, item in vars(value).items()}
    return value


def test_schema_sections_hold_the_pydantic_defaults(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from gpu_check_parts.specs import section

    recover = section("RecoverSpec", init="noise", iterations=300, lr=0.25, r_bn=0.1)
    assert _sections_as_dicts(recover) == RecoverSpec(init="noise").model_dump()
    assert _sections_as_dicts(section("ResourcesSpec")) == ResourcesSpec().model_dump()
    assert _sections_as_dicts(section("ValidateSpec")) == ValidateSpec().model_dump()
    with pytest.raises(ValueError, match="has no field"):
        section("RecoverSpec", itertions=3)


def _main(monkeypatch, *argv: str) -> int:
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_check

    return gpu_check.main(list(argv))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bad_device_and_full_mode_on_cpu_give_one_line_errors(monkeypatch, capsys, tmp_path):
    assert _main(monkeypatch, "--device", "cuda", "--out", str(tmp_path / "x.json")) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert _main(monkeypatch, "--device", "cpu", "--out", str(tmp_path / "x.json")) == 2
    assert "--device cpu --tiny" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert _main(monkeypatch, "--device", "cpu", "--tiny", "--out", str(blocker / "x.json")) == 2
    error = capsys.readouterr().err
    assert "cannot write --out" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()
