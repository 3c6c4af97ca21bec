"""KD validation and the random-real baseline on Ray Train: a `TorchTrainer` with W workers (DDP;
NCCL on GPUs, gloo on CPU).

Every worker loads what it trains on itself — the distilled PNGs from the artifact store, or the
same seeded random real subset — and the relabel teacher from the store; its DistributedSampler
part of each epoch goes through `scdd.validate.train_student` with the student DDP-wrapped, so a
step's global batch is the protocol's. After every epoch the ranks report the mean loss through
`ray.train.report`, rank 0 with a checkpoint (student, optimiser, schedule and sampler state) kept
under `state/train/` of the job's output; a failed worker makes Ray Train restart the group, which
resumes from the last checkpoint (at most `max_failures` times). The test split is evaluated
sharded (every W-th sample per rank, counts all-reduced), so the accuracy equals one process's.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from api_schema import JobSpec
from scdd.artifacts import decode_png
from scdd.data import load_dataset
from scdd.errors import JobCancelled, WorkerFailedError
from scdd.evaluate import evaluate
from scdd.models import create_model, model_from_checkpoint
from scdd.progress import Progress, SilentProgress
from scdd.recover import freeze
from scdd.runtime import resolve_runtime
from scdd.shard import Shard
from scdd.store import ArtifactStore
from scdd.validate import Protocol, random_real_subset, train_student
from scdd.validate.train import EpochEnd
from workers.cluster import connect, wants_gpus
from workers.control import RemoteProgress

STATE_FILE = "state.pt"


@dataclass(frozen=True)
class TrainFault:
    """Test hook: rank `rank` kills its process (SIGKILL) at step `step` of epoch `epoch` of `stage`,
    once per output (a marker in the store remembers it fired)."""

    rank: int
    epoch: int
    step: int = 1
    # Ray Train's controller takes in reported checkpoints by polling the workers; a crash right
    # after a report can beat the poll, and the restart then begins from the checkpoint before.
    delay_s: float = 3.0
    stage: str = "validate"


@dataclass(frozen=True)
class StudentTask:
    """One student training run, as each Ray Train worker gets it (small; data comes from disk/store)."""

    stage: str  # "validate" (the distilled images) or "baseline" (the random real subset)
    spec: JobSpec
    store: ArtifactStore
    protocol: Protocol
    relabel_path: str | None
    fault: TrainFault | None = None
    control: Any = None  # workers.control.JobControl: progress relay and cancel flag
    check_s: float = 0.5  # how often a worker asks the control actor whether the job is cancelled


def distilled_set(store: ArtifactStore, channels: int, normalize) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of the output's manifest, read back as a user gets them."""
    entries = store.read_json("manifest.json")["images"]
    pixels = torch.stack([decode_png(store.read_bytes(e["path"]), channels) for e in entries])
    return normalize(pixels), torch.tensor([e["label"] for e in entries])


class FaultProgress:
    """Progress that fires a TrainFault (test hook) and otherwise forwards."""

    def __init__(self, inner: Progress, task: StudentTask, rank: int, marker: str) -> None:
        self.inner, self.task, self.rank, self.marker = inner, task, rank, marker
        self.steps_per_epoch, self.done = 1, 0

    def start(self, stage: str, total: int, unit: str) -> None:
        self.steps_per_epoch = max(1, total // self.task.protocol.epochs)
        self.inner.start(stage, total, unit)

    def advance(self, n: int = 1, **metrics: Any) -> None:
        self.done += n
        fault = self.task.fault
        if (fault is not None and n and fault.rank == self.rank and fault.stage == self.task.stage
                and not self.task.store.exists(self.marker)
                and self.done == fault.epoch * self.steps_per_epoch + fault.step):
            self.task.store.write_json(self.marker, {"rank": self.rank, "epoch": fault.epoch, "step": fault.step})
            time.sleep(fault.delay_s)
            os.kill(os.getpid(), signal.SIGKILL)
        self.inner.advance(n, **metrics)

    def finish(self) -> None:
        self.inner.finish()


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker for one `StudentTask`."""
    task: StudentTask = config["task"]
    spec, protocol = task.spec, task.protocol
    context = ray.train.get_context()
    shard = Shard(context.get_world_rank(), context.get_world_size())
    device = ray.train.torch.get_device()
    torch.set_num_threads(spec.resources.threads or 1)
    runtime = resolve_runtime(spec.resources.model_copy(update={"device": "cuda" if device.type == "cuda" else "cpu"}))
    data = load_dataset(spec.dataset, spec.seed)
    info = data.info
    if task.stage == "baseline":
        images, labels = random_real_subset(data.train, spec.recover.ipc, info.num_classes, spec.seed)
    else:
        images, labels = distilled_set(task.store, info.channels, info.normalize)
    teacher = None
    if protocol.mode == "kd":
        teacher, _ = model_from_checkpoint(task.store.read_bytes(task.relabel_path), task.store.url_of(task.relabel_path))
        freeze(teacher, runtime)
    torch.manual_seed(spec.seed)  # the same initialisation as the single-process stage
    student = create_model(protocol.student_arch, info.num_classes, info.channels, info.image_size)
    resume, history = None, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved = torch.load(os.path.join(folder, STATE_FILE), weights_only=False)
        student.load_state_dict(saved["model"])
        resume, history = saved["train"], saved["history"]
    student.to(device, memory_format=runtime.memory_format())
    model = ray.train.torch.prepare_model(student, move_to_device=False) if shard.world_size > 1 else student

    def report(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        with tempfile.TemporaryDirectory() as folder:
            saved_checkpoint = None
            if shard.rank == 0 and state is not None:
                torch.save({"model": student.state_dict(), "train": state, "history": history},
                           os.path.join(folder, STATE_FILE))
                saved_checkpoint = Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=saved_checkpoint)

    def on_epoch_end(end: EpochEnd) -> None:
        loss = float(shard.sum(torch.tensor([end.loss], device=device))[0]) / shard.world_size
        history.append({"epoch": end.epoch + 1, "loss": round(loss, 6)})
        report({"epoch": end.epoch + 1, "loss": loss}, end.state)

    progress: Progress = RemoteProgress(task.control, shard.rank, task.check_s) if task.control is not None else SilentProgress()
    progress = FaultProgress(progress, task, shard.rank, f"state/train/{task.stage}/fault-fired.json")
    try:
        train_student(model, images, labels, protocol, teacher, runtime, spec.seed, progress, task.stage,
                      shard=shard, resume=resume, on_epoch_end=on_epoch_end)
    except JobCancelled:
        if shard.rank == 0:
            task.store.write_json(result_path(task.stage), {"status": "cancelled"})
        return  # ends this run without a failure (no restart)
    accuracy = evaluate(student, data.test, runtime, shard=shard)
    if shard.rank == 0:
        task.store.write_json(result_path(task.stage), {"status": "done", **accuracy.to_dict(), "history": history,
                                                        "resumed_at_epoch": None if resume is None else resume["epoch"] + 1})
    report({"epoch": protocol.epochs, **accuracy.to_dict()}, None)


def result_path(stage: str) -> str:
    return f"state/train/{stage}/result.json"


def ray_student_stage(spec: JobSpec, store: ArtifactStore, max_failures: int = 2, fault: TrainFault | None = None,
                      control: Any = None, check_s: float = 0.5):
    """A `scdd.pipeline.StudentStage` that trains on Ray Train with `spec.resources.workers` workers."""

    def fit(stage: str, images: torch.Tensor, labels: torch.Tensor, protocol: Protocol, relabel: Any,
            relabel_path: str | None) -> dict:
        connect()
        workers = spec.resources.workers
        use_gpu = wants_gpus(spec.resources.device, workers)
        task = StudentTask(stage, spec, store, protocol, relabel_path, fault, control, check_s)
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"task": task},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": spec.resources.threads or 1,
                                                               **({"GPU": 1} if use_gpu else {})}),
            run_config=RunConfig(name=stage, storage_path=checkpoint_root(store),
                                 failure_config=FailureConfig(max_failures=max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=1)),
        )
        store.write_json(result_path(stage), {"status": "running"})
        result = trainer.fit()
        if result.error is not None:
            raise WorkerFailedError(f"{stage} training on Ray Train failed after {max_failures} restarts: "
                                    f"{type(result.error).__name__}: {str(result.error).splitlines()[0][:300]}")
        outcome = store.read_json(result_path(stage))
        if outcome["status"] == "cancelled":
            raise JobCancelled(f"cancelled during {stage}")
        return {"top1": outcome["top1"], "top5": outcome["top5"], "total": outcome["total"], "workers": workers,
                "epochs": outcome["history"], "resumed_at_epoch": outcome["resumed_at_epoch"]}

    return fit


def checkpoint_root(store: ArtifactStore) -> str:
    """Where Ray Train keeps the checkpoints: `state/train` of the output (a path for local stores)."""
    path = store.url_of("state/train")
    return os.path.abspath(path) if "://" not in path else path
