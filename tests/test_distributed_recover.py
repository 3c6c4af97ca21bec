"""Distributed recover on a real local Ray cluster (2 CPUs, gloo): slices, manifest, layout, faults."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from torchvision.datasets import ImageFolder

from api_schema import JobSpec
from scdd.errors import OutputConflictError, ResourceError, SpecError, WorkerFailedError
from scdd.pipeline import run_distillation
from scdd.recover import class_slices, plan_units
from tests.conftest import cpus_free_soon, tiny_job
from workers.backend import RayBackend, RayOptions
from workers.recover import FaultInjection

TWO_WORKERS = {"workers": 2, "threads": 1}


def distributed_job(fmnist_root, out, teacher, classes=(0, 1, 2, 3), **recover):
    spec = tiny_job(fmnist_root, out, teacher, resources=TWO_WORKERS,
                    recover={"ipc": 2, "iterations": 5, "batch_size": 4, **recover})
    spec["dataset"]["classes"] = list(classes)
    return JobSpec.model_validate(spec)


@pytest.fixture(scope="module")
def four_class_teacher(tmp_path_factory, fmnist_root):
    """A ConvNet teacher trained briefly on 4 Fashion-MNIST classes."""
    from api_schema import DatasetSpec, TeacherSpec
    from scdd.data import load_dataset
    from scdd.models import checkpoint_bytes, create_model
    from scdd.progress import SilentProgress
    from scdd.runtime import Runtime
    from scdd.squeeze import train_supervised

    data = load_dataset(DatasetSpec(root=str(fmnist_root), classes=[0, 1, 2, 3], train_limit=100), seed=0)
    torch.manual_seed(0)
    model = create_model("convnet", 4, 1, 28)
    train_supervised(model, data, TeacherSpec(epochs=1, batch_size=64), Runtime(torch.device("cpu"), None, False), 0,
                     SilentProgress())
    path = tmp_path_factory.mktemp("teacher4") / "teacher.pt"
    path.write_bytes(checkpoint_bytes(model))
    return path


def read_manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def image_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "images").rglob("*.png"))}


@pytest.fixture(scope="module")
def global_run(ray_local, tmp_path_factory, fmnist_root, four_class_teacher):
    out = tmp_path_factory.mktemp("global") / "run"
    spec = distributed_job(fmnist_root, out, four_class_teacher)
    return out, run_distillation(spec, backend=RayBackend(spec))


def test_plan_gives_each_worker_its_own_balanced_slice():
    assert class_slices(10, 3) == [range(0, 4), range(4, 7), range(7, 10)]
    units = plan_units(num_classes=5, ipc=2, batch_size=1, workers=2)  # a batch of 1 class per worker
    assert [u.shares for u in units[:3]] == [((0,), (3,)), ((1,), (4,)), ((2,), ())]
    assert [u.shares for u in plan_units(5, 1, 2, workers=2)] == [((0, 1), (3, 4)), ((2,), ())]
    assert sorted((label, u.round) for u in units for label in u.labels) == [(c, r) for c in range(5) for r in range(2)]
    assert plan_units(5, 2, 2, workers=1) == plan_units(5, 2, 2)
    with pytest.raises(SpecError, match="at most 5 workers"):
        plan_units(5, 1, 2, workers=6)


def test_two_workers_recover_every_class_from_the_worker_that_owns_it(global_run):
    out, report = global_run
    manifest = read_manifest(out)
    assert manifest["complete"] and report.complete
    assert len(manifest["images"]) == 2 * 4 == report.recover.images
    assert (report.recover.workers, report.recover.bn_sync) == (2, "global")
    owner = {0: 0, 1: 0, 2: 1, 3: 1}  # slices (0, 1) and (2, 3)
    assert {(e["label"], e["worker"]) for e in manifest["images"]} == set(owner.items())
    assert sorted((e["label"], e["round"]) for e in manifest["images"]) == [(c, r) for c in range(4) for r in range(2)]
    for entry in manifest["images"]:
        data = (out / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
    assert len(ImageFolder(str(out / "images"))) == 8
    record = json.loads((out / "state/units/r00000-b00000.json").read_text())
    assert (record["workers"], record["bn_sync"], len(record["entries"])) == (2, "global", 4)


def test_distributed_output_has_the_single_process_layout(global_run, tmp_path, fmnist_root, four_class_teacher):
    out, _ = global_run
    single = tmp_path / "single"
    spec = distributed_job(fmnist_root, single, four_class_teacher).to_dict()
    spec["resources"]["workers"] = 1
    run_distillation(JobSpec.model_validate(spec))

    def layout(root: Path) -> set[str]:
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.parts[len(root.parts)] != "state"}

    assert layout(out) == layout(single)
    assert {k for k in read_manifest(out)} == {k for k in read_manifest(single)}


def test_local_bn_sync_gives_other_images_than_global(global_run, tmp_path, fmnist_root, four_class_teacher):
    out, report = global_run
    local_out = tmp_path / "local"
    spec = distributed_job(fmnist_root, local_out, four_class_teacher, bn_sync="local")
    local_report = run_distillation(spec, backend=RayBackend(spec))
    assert local_report.recover.bn_sync == "local"
    global_images, local_images = image_bytes(out), image_bytes(local_out)
    assert global_images.keys() == local_images.keys()
    # Same seeds, same teacher: only the BN statistics differ, and with them every image.
    assert all(global_images[path] != local_images[path] for path in global_images)
    assert local_report.recover.final_bn != pytest.approx(report.recover.final_bn, rel=1e-3)


def test_killed_worker_is_replaced_and_the_run_resumes_without_rewriting(ray_local, tmp_path, fmnist_root, fmnist_teacher_ckpt):
    # 3 classes on 2 workers: slices (0, 1) and (2,); batches of 1 class per worker, so rank 1 has
    # an empty share in every second unit. It dies before its third unit.
    def job(out):
        return distributed_job(fmnist_root, out, fmnist_teacher_ckpt, classes=(0, 1, 2), ipc=3, batch_size=1)

    out = tmp_path / "faulty"
    spec = job(out)
    faulty = RayBackend(spec, options=RayOptions(recover_fault=FaultInjection(rank=1, after_units=2)))
    report = run_distillation(spec, backend=faulty)
    assert report.complete and report.recover.images == 9
    (restart,) = report.recover.restarts
    assert restart.unit == "r00001-b00000" and "worker 1 died" in restart.cause
    manifest = read_manifest(out)
    paths = [e["path"] for e in manifest["images"]]
    assert len(paths) == len(set(paths)) == 9
    # Nothing of the two units finished before the crash was written again after it.
    before = {e["path"] for u in ("r00000-b00000", "r00000-b00001")
              for e in json.loads((out / f"state/units/{u}.json").read_text())["entries"]}
    assert len(before) == 3
    for path in (out / "images").rglob("*.png"):
        rel = path.relative_to(out).as_posix()
        assert (path.stat().st_mtime < restart.time) == (rel in before)
    for part in (out / "state/parts").glob("r00000-*.json"):
        assert part.stat().st_mtime < restart.time

    # The resumed run made the same images as an uninterrupted one.
    straight = job(tmp_path / "straight")
    run_distillation(straight, backend=RayBackend(straight))
    assert image_bytes(out) == image_bytes(tmp_path / "straight")


def test_a_unit_that_keeps_failing_ends_the_run_with_its_name(ray_local, tmp_path, fmnist_root, fmnist_teacher_ckpt):
    spec = distributed_job(fmnist_root, tmp_path / "doomed", fmnist_teacher_ckpt, classes=(0, 1, 2), ipc=1, batch_size=2)
    doomed = RayBackend(spec, options=RayOptions(recover_retries=1,
                                                 recover_fault=FaultInjection(rank=0, after_units=0, groups=10)))
    with pytest.raises(WorkerFailedError, match=r"unit r00000-b00000 \(round 0, batch 0\) failed 2 times"):
        run_distillation(spec, backend=doomed)
    assert cpus_free_soon(ray_local) == 2  # every group's actors and bundles were released


def test_more_workers_than_the_cluster_holds_is_a_clear_error(ray_local, tmp_path, fmnist_root, fmnist_teacher_ckpt):
    spec = tiny_job(fmnist_root, tmp_path / "big", fmnist_teacher_ckpt, resources={"workers": 3, "threads": 1})
    spec = JobSpec.model_validate(spec)
    with pytest.raises(ResourceError, match="cannot place 3 workers"):
        run_distillation(spec, backend=RayBackend(spec, options=RayOptions(placement_timeout_s=2)))


def test_pipeline_refuses_workers_without_a_distributed_stage(tmp_path, fmnist_root, fmnist_teacher_ckpt):
    spec = JobSpec.model_validate(tiny_job(fmnist_root, tmp_path / "x", fmnist_teacher_ckpt, resources=TWO_WORKERS))
    with pytest.raises(SpecError, match="runs on Ray: pass backend="):
        run_distillation(spec)


@pytest.fixture(scope="module")
def gvbsm_ensemble_ckpt(tmp_path_factory, fmnist_root, fmnist_teacher_ckpt) -> Path:
    """A G-VBSM ensemble checkpoint: the 3-class ConvNet teacher and a ConvNet-D1-W32 trained one epoch, with the
    real-data statistics of their convolution inputs."""
    from api_schema import DatasetSpec, TeacherSpec
    from scdd.data import load_dataset
    from scdd.models import Ensemble, checkpoint_bytes, create_model, load_weights, model_metadata
    from scdd.progress import SilentProgress
    from scdd.runtime import Runtime
    from scdd.squeeze import train_supervised
    from scdd.squeeze.conv_stats import collect_conv_statistics

    data = load_dataset(DatasetSpec(root=str(fmnist_root), classes=[0, 1, 2], train_limit=200), seed=0)
    runtime = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)
    convnet = create_model("convnet", 3, 1, 28)
    load_weights(convnet, fmnist_teacher_ckpt.read_bytes(), str(fmnist_teacher_ckpt))
    small = create_model("convnet_d1_w32", 3, 1, 28)
    train_supervised(small, data, TeacherSpec(epochs=1, batch_size=64), runtime, 0, SilentProgress())
    ensemble = Ensemble([convnet.eval(), small], ["convnet", "convnet_d1_w32"], conv_statistics=True)
    for member, statistics in zip(ensemble.members, ensemble.conv_statistics):
        collect_conv_statistics(member, statistics, data, runtime)
    path = tmp_path_factory.mktemp("gvbsm") / "ensemble.pt"
    path.write_bytes(checkpoint_bytes(ensemble, **model_metadata(ensemble), num_classes=3, in_channels=1, image_size=28))
    return path


def test_cli_workers_flag_joins_the_cluster_at_ray_address(ray_local, tmp_path, fmnist_root, gvbsm_ensemble_ckpt):
    """`distill --workers 2` on a cluster, with G-VBSM's objective: the workers rebuild the ensemble from the
    store and match both backbones' BatchNorm and convolution statistics in rotation, globally."""
    out = tmp_path / "cli"
    address = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_ADDRESS": address}
    done = subprocess.run(
        [sys.executable, "-m", "scdd_cli", "distill", "--data-dir", str(fmnist_root), "--classes", "0,1,2",
         "--train-limit", "50", "--method", "gvbsm", "--teacher-checkpoint", str(gvbsm_ensemble_ckpt), "--ipc", "1",
         "--init", "noise", "--iterations", "3", "--device", "cpu", "--amp", "off", "--no-validate",
         "--workers", "2", "--threads", "1", "--out", str(out), "--events", str(tmp_path / "events.jsonl")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"joined the Ray cluster at {address}" in done.stderr
    assert "2 workers, bn_sync global" in done.stdout
    assert "batchnorm+convolution statistics" in done.stdout and "(EMA 0.8), 2 backbones in rotation" in done.stdout
    assert {e["worker"] for e in read_manifest(out)["images"]} == {0, 1}
    assert "scdd: recover done in" in done.stderr
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events[0]["type"] == "job_started" and events[-1]["status"] == "succeeded"


def test_resuming_a_run_with_recover_steps_on_another_worker_count_is_refused(global_run, fmnist_root,
                                                                             four_class_teacher):
    out, _ = global_run
    spec = distributed_job(fmnist_root, out, four_class_teacher).to_dict()
    assert spec["recover"]["iterations"] > 0  # the images depend on the worker count (JobSpec.resume_refusal)
    spec["resources"]["workers"] = 1  # other slices, seeds and shared statistics: the stored units cannot go on
    with pytest.raises(OutputConflictError, match="holds a run of a different spec"):
        run_distillation(JobSpec.model_validate(spec))


@pytest.mark.parametrize(("init", "iterations"), [("real", 2), ("herding", 0)])
def test_two_workers_start_from_the_planned_real_pixels(init, iterations, ray_local, tmp_path, fmnist_root,
                                                         four_class_teacher):
    """A real-pixel init on 2 workers: each plans its class slice and every image starts from the stored plan,
    with the origin the single-process run records; kept as they are (0 iterations), the images (and grid.png)
    are the single-process bytes. The teacher's accuracy, counted per shard, is the single-process one."""
    spec = distributed_job(fmnist_root, tmp_path / "ray", four_class_teacher, init=init, iterations=iterations,
                           select={"candidates": 6, "crops": 2})
    ray_report = run_distillation(spec, backend=RayBackend(spec))
    single = spec.to_dict()
    single["resources"]["workers"], single["output"]["url"] = 1, str(tmp_path / "single")
    single_report = run_distillation(JobSpec.model_validate(single))
    # The teacher's accuracy: each worker counted its shard of the test split, the driver added the counts.
    assert ray_report.teacher.top1 == single_report.teacher.top1 and ray_report.teacher.total == single_report.teacher.total
    ray_images, single_images = image_bytes(tmp_path / "ray"), image_bytes(tmp_path / "single")
    assert ray_images.keys() == single_images.keys()
    if iterations == 0:
        assert ray_images == single_images
        # grid.png, rendered on a worker from the stored images, is the in-process one
        assert (tmp_path / "ray/grid.png").read_bytes() == (tmp_path / "single/grid.png").read_bytes()
    else:  # refined: each worker draws its own augmentations, so only the starting pixels agree
        assert ray_images != single_images
    ray_entries = {e["path"]: e for e in read_manifest(tmp_path / "ray")["images"]}
    single_entries = {e["path"]: e for e in read_manifest(tmp_path / "single")["images"]}
    assert {p: e["origin"] for p, e in ray_entries.items()} == {p: e["origin"] for p, e in single_entries.items()}
    assert {e["worker"] for e in ray_entries.values()} == {0, 1}
    assert all(e["origin"]["init"] == init for e in ray_entries.values())


def closed_port() -> int:
    with socket.socket() as sock:  # bound, then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_ray_address_that_does_not_answer_fails_at_once_naming_the_fix(tmp_path, fmnist_root):
    address = f"127.0.0.1:{closed_port()}"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "scdd_cli", "distill", "--data-dir", str(fmnist_root), "--classes", "0,1",
         "--train-limit", "20", "--method", "sre2l", "--ipc", "1", "--no-validate", "--workers", "2",
         "--out", str(tmp_path / "out"), "--quiet"],
        env={**os.environ, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"the Ray cluster at RAY_ADDRESS={address} does not answer" in done.stderr and "unset it" in done.stderr
    assert time.monotonic() - started < 60  # the time to import and train the tiny teacher, not Ray's retries


def test_without_ray_address_a_new_local_cluster_starts_whatever_the_bootstrap_record_says():
    """A stopped `ray start` head (e.g. `scdd serve`'s) leaves Ray's record of the "current cluster" behind;
    a local run must not try to join it."""
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths live below it
    try:
        (temp / "ray").mkdir()
        (temp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{closed_port()}")
        env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
        done = subprocess.run(
            [sys.executable, "-c", "from workers.cluster import connect; import ray; print(connect()); ray.shutdown()"],
            env={**env, "RAY_TMPDIR": str(temp)}, capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "started a local Ray cluster" in done.stdout
    finally:
        shutil.rmtree(temp, ignore_errors=True)
