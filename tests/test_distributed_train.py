"""Ray Train stages and the job driver on a real local Ray cluster (2 CPUs, gloo), real Fashion-MNIST."""

import json
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from api_schema import DatasetSpec, JobSpec
from scdd.data import load_dataset
from scdd.data.base import TensorImageDataset
from scdd.evaluate import evaluate
from scdd.models import create_model
from scdd.runtime import Runtime
from scdd.shard import Shard
from tests.conftest import TEST_LIMIT, cpus_free_soon, tiny_job
from workers.driver import run_job
from workers.events import ListSink
from workers.backend import RayOptions
from workers.recover import FaultInjection
from workers.train import TrainFault

CPU = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)
UNEVEN = 1001  # test samples: not a multiple of the 2 workers


def uneven_test_set(root: str) -> TensorImageDataset:
    test = load_dataset(DatasetSpec(root=root, classes=[0, 1, 2]), seed=0).test
    return TensorImageDataset(test.images[:UNEVEN], test.labels[:UNEVEN], (0.286,), (0.353,))


def eval_worker(rank: int, rendezvous: str, root: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = create_model("convnet", 3, 1, 28)
    accuracy = evaluate(model, uneven_test_set(root), CPU, batch_size=64, shard=Shard(rank, 2))
    torch.save(accuracy, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_sharded_evaluation_equals_single_process_on_an_uneven_split(tmp_path, fmnist_root):
    mp.spawn(eval_worker, args=(str(tmp_path / "rendezvous"), str(fmnist_root), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    single = evaluate(create_model("convnet", 3, 1, 28), uneven_test_set(str(fmnist_root)), CPU, batch_size=64)
    assert single.total == UNEVEN and 0 < single.correct1 < UNEVEN
    for rank in range(2):
        shared = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert (shared.correct1, shared.correct5, shared.total) == (single.correct1, single.correct5, single.total)
        assert shared.top1 == single.top1
    assert list(Shard(0, 2).indices(5)) + list(Shard(1, 2).indices(5)) == [0, 2, 4, 1, 3]


def job(fmnist_root, out, teacher, **recover) -> JobSpec:
    return JobSpec.model_validate(tiny_job(
        fmnist_root, out, teacher, resources={"workers": 2, "threads": 1},
        recover={"ipc": 3, "iterations": 6, "batch_size": 2, **recover},
        validate={"enabled": True, "epochs": 12, "baseline": True},
    ))


def test_killed_training_worker_resumes_from_its_checkpoint(ray_local, tmp_path, fmnist_root, fmnist_teacher_ckpt):
    spec = job(fmnist_root, tmp_path / "run", fmnist_teacher_ckpt)
    spec = JobSpec.model_validate({**spec.to_dict(), "validate": {**spec.to_dict()["validate"], "baseline": False,
                                                                   "epochs": 6}})
    options = RayOptions(train_fault=TrainFault(rank=1, epoch=3, step=1), checkpoint_every_s=0)
    result = run_job(spec, ListSink(), options=options)
    assert result.status == "succeeded", result.error
    student = result.report.validate_.student
    assert json.loads((tmp_path / "run/state/train/validate/fault-fired.json").read_text())["epoch"] == 3
    assert student.resumed_at_epoch == 3  # the restarted group went on after the 3rd epoch's checkpoint
    assert student.workers == 2  # a data-parallel (DDP) student
    assert [h.epoch for h in student.epochs] == list(range(1, 7))


def test_cancel_mid_recover_stops_quickly_and_releases_everything(ray_local, tmp_path, fmnist_root, fmnist_teacher_ckpt):
    sink = ListSink()
    asked: list[float] = []

    def should_cancel() -> bool:  # once the first unit is stored, i.e. while the workers iterate on the next
        if any(e["type"] == "progress" and e["stage"] == "recover" for e in sink.events):
            asked.append(time.time())
            return True
        return False

    spec = job(fmnist_root, tmp_path / "run", fmnist_teacher_ckpt, iterations=150)
    result = run_job(spec, sink, should_cancel)
    stopped_after = time.time() - asked[0]
    assert result.status == "cancelled" and stopped_after < 5
    assert sink.events[-1]["type"] == "job_finished" and sink.events[-1]["status"] == "cancelled"
    assert cpus_free_soon(ray_local) == 2  # actors, placement groups and the control actor are gone
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert manifest["partial"] and not manifest["complete"]
    assert 1 <= len(list((tmp_path / "run/state/units").glob("*.json"))) < 3  # of the 3 units (3 rounds x 1 batch)


def test_cancel_while_the_workers_start_does_not_wait_for_them(ray_local, tmp_path, fmnist_root, fmnist_teacher_ckpt):
    sink = ListSink()
    asked: list[float] = []

    def should_cancel() -> bool:  # as soon as recover starts: the actors are still importing torch
        if any(e["type"] == "stage_started" and e["stage"] == "recover" for e in sink.events):
            asked.append(time.time())
            return True
        return False

    result = run_job(job(fmnist_root, tmp_path / "run", fmnist_teacher_ckpt), sink, should_cancel)
    assert result.status == "cancelled" and time.time() - asked[0] < 5
    assert cpus_free_soon(ray_local) == 2
    assert not list((tmp_path / "run/state/units").glob("*.json"))


def test_a_failing_stage_ends_the_job_with_the_stage_unit_and_cause(ray_local, tmp_path, fmnist_root, fmnist_teacher_ckpt):
    spec = job(fmnist_root, tmp_path / "run", fmnist_teacher_ckpt)
    options = RayOptions(recover_retries=0, recover_fault=FaultInjection(rank=0, after_units=1, groups=5))
    sink = ListSink()
    result = run_job(spec, sink, options=options)
    assert result.status == "failed"
    assert "recover stage failed: recover unit r00001-b00000" in result.error and "worker 0 died" in result.error
    assert [e["type"] for e in sink.events[-2:]] == ["error", "job_finished"]
    assert (tmp_path / "run/state/units/r00000-b00000.json").exists()  # what was written stays


def test_run_job_with_two_workers_squeezes_on_ray_train_and_reports_events_in_order(ray_local, tmp_path, fmnist_root):
    """One whole 2-worker job (one Ray job's cost for what were two tests): SC-DD's MoCo pretraining and a G-VBSM
    ensemble as the relabel teacher train on Ray Train, the validation workers load the ensemble from the store,
    two student architectures (validate.students) and their baselines train side by side, one worker each, and
    the events come in order."""
    spec = tiny_job(fmnist_root, tmp_path / "run", None, resources={"workers": 2, "threads": 1},
                    validate={"enabled": True, "epochs": 12, "baseline": True, "relabel_teacher": "ensemble",
                              "students": ["convnet", "convnet_d1_w32"]},
                    method="scdd", output={"url": str(tmp_path / "run"), "teacher_cache": str(tmp_path / "cache")})
    spec["teacher"] = {"epochs": 2, "batch_size": 64, "probe": {"epochs": 5}, "ensemble": ["convnet_d1_w32"],
                       "ssl": {"epochs": 2, "batch_size": 64, "queue_size": 256}}
    sink = ListSink()
    result = run_job(JobSpec.model_validate(spec), sink)
    assert result.status == "succeeded" and result.error is None, result.error
    report = result.report
    assert report.complete and report.recover.workers == 2
    teacher = report.teacher
    # MoCo v2 pretraining ran on 2 DDP workers, then the probe here: the teacher separates 3 classes.
    assert teacher.ssl.workers == 2 and len(teacher.ssl.epoch_losses) == 2
    assert teacher.top1 > 60
    # The relabel ensemble's member trained there too, as a run of its architecture (one member keeps this test short).
    for stage, epochs in (("squeeze-ssl", 2), ("squeeze-supervised-convnet_d1_w32", 2), ("validate", 12),
                          ("validate-convnet_d1_w32", 12), ("baseline-convnet_d1_w32", 12)):
        outcome = json.loads((tmp_path / f"run/state/train/{stage}/result.json").read_text())
        assert outcome["status"] == "done" and len(outcome["history"]) == epochs
    relabel = report.validate_.relabel_teacher
    assert relabel.members == ["convnet_d1_w32"] and relabel.top1 > 45, relabel

    events = sink.events
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "job_started" and events[-1]["type"] == "job_finished"
    assert events[-1]["status"] == "succeeded" and events[-1]["summary"]["images"] == 9
    stages = [e["stage"] for e in events if e["type"] == "stage_started"]
    assert stages == ["load", "squeeze", "recover", "write", "squeeze", "validate", "baseline"]
    fractions = [e["job_fraction"] for e in events if e["type"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] <= 1
    recover_events = [e for e in events if e["type"] == "progress" and e["stage"] == "recover"]
    assert recover_events[-1]["fraction"] == 1 and {"round", "images_written", "ce", "bn"} <= set(recover_events[-1])
    assert any(e["type"] == "progress" and e["stage"] == "validate" and "loss" in e for e in events)

    # KD validation, two students side by side on one worker each: per-epoch losses reported, loss falls,
    # accuracy above chance (3 classes); the cross-architecture table holds both, each beside its baseline.
    student = report.validate_.student
    assert student.workers == 1 and [h.epoch for h in student.epochs] == list(range(1, 13))
    losses = [h.loss for h in student.epochs]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert student.top1 > 40 and student.total == 3 * TEST_LIMIT
    assert report.validate_.baseline.workers == 1
    table = report.validate_.students
    assert [row.arch for row in table] == ["convnet", "convnet_d1_w32"] and table[0].top1 == student.top1
    assert all(row.baseline_top1 is not None and row.ior == round(row.top1 - row.baseline_top1, 2) for row in table)
