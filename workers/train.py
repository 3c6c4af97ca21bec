"""Training stages on Ray Train: KD validation, the random-real baseline, and squeeze's supervised
and self-supervised training, each a `TorchTrainer` with W workers (DDP; NCCL on GPUs, gloo on CPU).

Every worker loads what it trains on itself (the real data from disk; the distilled PNGs and the
relabel teacher from the artifact store; the module to train from its initial weights in the store)
and runs the library's own loop (`train_student`, `train_supervised`, a registered SSL method) with
`TrainHooks`: its DistributedSampler part of each epoch, the module DDP-wrapped, so a step's global
batch is the single-process one. After every epoch the ranks report the mean loss through
`ray.train.report`, rank 0 with a checkpoint of the loop's whole state kept under `state/train/`
of the job's output; when a worker fails, Ray Train restarts the group, which resumes from the last
checkpoint (at most `max_failures` times). Rank 0 writes the outcome (accuracy, or the trained
weights) to the store, where the driver reads it. The test split is evaluated sharded (every W-th
sample per rank, counts all-reduced), so the accuracy equals one process's.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn

from api_schema import JobSpec, TeacherSpec
from api_schema.report import StudentScore
from scdd.data import RealData, load_dataset
from scdd.data.loader import decode_workers
from scdd.errors import JobCancelled, WorkerFailedError
from scdd.evaluate import evaluate
from scdd.layout import TRAIN_DIR, train_path
from scdd.models import checkpoint_bytes, create_model, load_weights, model_from_checkpoint, strip_head
from scdd.progress import Progress, SilentProgress
from scdd.recover import freeze
from scdd.runtime import Runtime, resolve_runtime
from scdd.shard import EpochEnd, Shard, TrainHooks
from scdd.squeeze.methods import Trainers
from scdd.squeeze.ssl import SSL_METHODS
from scdd.squeeze.supervised import train_supervised
from scdd.store import ArtifactStore
from scdd.validate import Protocol, train_student
from scdd.validate.soft_labels import SoftLabelRequest, SoftLabelWriter, write_index
from scdd.validate.student_images import student_images
from workers.cluster import DEFAULT_PLACEMENT_TIMEOUT_S, connect, wait_for_placement, wants_gpus
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
class TrainTask:
    """One training run, as each Ray Train worker gets it (small; data comes from disk and store)."""

    kind: str  # "student", "supervised" or "ssl"
    stage: str  # names the run: validate, baseline, squeeze-supervised[-<arch>], squeeze-ssl
    spec: JobSpec
    store: ArtifactStore
    teacher: TeacherSpec | None = None  # supervised: what to train (a gvbsm member's arch); None: spec.teacher
    protocol: Protocol | None = None  # student
    source: str | None = None  # student: the images it trains on (scdd/validate/student_images.py)
    relabel_path: str | None = None  # student, kd
    soft_labels: SoftLabelRequest | None = None  # student, kd: store the teacher's soft labels (each rank its own)
    ssl_method: str | None = None  # ssl
    feature_dim: int | None = None  # ssl: the backbone's feature size
    fault: TrainFault | None = None
    control: Any = None  # workers.control.JobControl: progress relay and cancel flag
    check_s: float = 0.5  # how often a worker asks the control actor whether the job is cancelled
    checkpoint_every_s: float = 30.0  # report and checkpoint at most this often (and after the last epoch)

    @property
    def epochs(self) -> int:
        if self.kind == "student":
            return self.protocol.epochs
        return self.spec.teacher.ssl.epochs if self.kind == "ssl" else self.teacher_spec.epochs

    @property
    def teacher_spec(self) -> TeacherSpec:
        return self.teacher or self.spec.teacher

    def path(self, name: str) -> str:
        return train_path(self.stage, name)


class FaultProgress:
    """Progress that fires a TrainFault (test hook) and otherwise forwards."""

    def __init__(self, inner: Progress, task: TrainTask, rank: int) -> None:
        self.inner, self.task, self.rank = inner, task, rank
        self.steps_per_epoch, self.done = 1, 0

    def start(self, stage: str, total: int, unit: str) -> None:
        self.steps_per_epoch = max(1, total // max(1, self.task.epochs))
        self.inner.start(stage, total, unit)

    def advance(self, n: int = 1, **metrics: Any) -> None:
        self.done += n
        fault, marker = self.task.fault, self.task.path("fault-fired.json")
        if (fault is not None and n and fault.rank == self.rank and fault.stage == self.task.stage
                and self.done == fault.epoch * self.steps_per_epoch + fault.step and not self.task.store.exists(marker)):
            self.task.store.write_json(marker, {"rank": self.rank, "epoch": fault.epoch, "step": fault.step})
            time.sleep(fault.delay_s)
            os.kill(os.getpid(), signal.SIGKILL)
        self.inner.advance(n, **metrics)

    def finish(self) -> None:
        self.inner.finish()


def run_student(task: TrainTask, data: RealData, runtime: Runtime, hooks: TrainHooks, progress: Progress) -> dict:
    """One rank of a student run: it reads only its shard of the images (scdd/validate/student_images.py)."""
    spec, protocol, info = task.spec, task.protocol, data.info
    workers = decode_workers(spec.resources.threads)
    images = student_images(task.source, spec, data, task.store, hooks.shard, workers)
    teacher = None
    if protocol.mode == "kd":
        teacher, _ = model_from_checkpoint(task.store.read_bytes(task.relabel_path), task.store.url_of(task.relabel_path))
        freeze(teacher, runtime)
    torch.manual_seed(spec.seed)  # the same initialisation as the single-process stage
    student = create_model(protocol.student_arch, info.num_classes, info.channels, info.image_size)
    writer = None
    if task.soft_labels is not None:  # each rank writes its own files (scdd/validate/soft_labels.py)
        parallel = hooks.shard is not None and hooks.shard.world_size > 1
        writer = SoftLabelWriter(task.store, task.soft_labels.epochs, task.soft_labels.topk,
                                 hooks.shard.rank if parallel else None, hooks.shard.world_size if parallel else 1)
    train_student(student, images, protocol, teacher, runtime, spec.seed, progress, task.stage, hooks,
                  soft_labels=writer)
    return evaluate(student, data.test, runtime, shard=hooks.shard, workers=workers).to_dict()


def initial_model(task: TrainTask, data: RealData, headless: bool) -> nn.Module:
    """The module the driver asked to train: the registry model, head stripped for SSL, with the
    initial weights the driver stored."""
    info = data.info
    model = create_model(task.teacher_spec.arch, info.num_classes, info.channels, info.image_size)
    if headless:
        strip_head(model)
    load_weights(model, task.store.read_bytes(task.path("initial.pt")), task.store.url_of(task.path("initial.pt")))
    return model


def run_supervised(task: TrainTask, data: RealData, runtime: Runtime, hooks: TrainHooks, progress: Progress) -> dict:
    model = initial_model(task, data, headless=False)
    train_supervised(model, data, task.teacher_spec, runtime, task.spec.seed, progress, hooks)
    if hooks.shard.rank == 0:
        task.store.write_bytes(task.path("final.pt"), checkpoint_bytes(model))
    return {}


def run_ssl(task: TrainTask, data: RealData, runtime: Runtime, hooks: TrainHooks, progress: Progress) -> dict:
    backbone = initial_model(task, data, headless=True)
    details = SSL_METHODS.get(task.ssl_method)(backbone, task.feature_dim, data, task.spec.teacher.ssl, runtime,
                                                task.spec.seed, progress, hooks)
    if hooks.shard.rank == 0:
        task.store.write_bytes(task.path("final.pt"), checkpoint_bytes(backbone))
    return {"details": details}


RUNNERS = {"student": run_student, "supervised": run_supervised, "ssl": run_ssl}


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker for one `TrainTask`."""
    task: TrainTask = config["task"]
    spec = task.spec
    context = ray.train.get_context()
    shard = Shard(context.get_world_rank(), context.get_world_size())
    device = ray.train.torch.get_device()
    torch.set_num_threads(spec.resources.threads or 1)
    runtime = resolve_runtime(spec.resources.model_copy(update={"device": "cuda" if device.type == "cuda" else "cpu"}))
    data = load_dataset(spec.dataset, spec.seed)
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = torch.load(os.path.join(folder, STATE_FILE), weights_only=True)  # tensors and containers only

    last_report = [time.monotonic()]
    unreported: list[dict[str, float]] = []

    def on_epoch_end(end: EpochEnd) -> None:
        # The epoch's mean loss over the ranks. A report costs about 2 s here (Ray Train's
        # controller takes it in by polling), more than a short epoch, so the ranks report, each
        # time with a checkpoint, every `checkpoint_every_s` and after the last epoch, carrying
        # the per-epoch metrics since the last report. The decision travels with the loss sum, so
        # all ranks agree on it.
        due = float(time.monotonic() - last_report[0] >= task.checkpoint_every_s or end.epoch + 1 == task.epochs)
        total = shard.sum(torch.tensor([end.loss, due], device=device))
        loss = float(total[0]) / shard.world_size
        hooks.losses[-1] = end.state["losses"][-1] = loss
        unreported.append({"epoch": end.epoch + 1, "loss": loss})
        if float(total[1]) == 0:
            return
        last_report[0] = time.monotonic()
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if shard.rank == 0:
                torch.save(end.state, os.path.join(folder, STATE_FILE))
                saved = Checkpoint.from_directory(folder)
            ray.train.report({"epoch": end.epoch + 1, "loss": loss, "epochs": list(unreported)}, checkpoint=saved)
        unreported.clear()

    def wrap(module: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(module, move_to_device=False) if shard.world_size > 1 else module

    hooks = TrainHooks(shard, wrap, resume, on_epoch_end)
    progress: Progress = RemoteProgress(task.control, shard.rank, task.check_s) if task.control else SilentProgress()
    try:
        outcome = RUNNERS[task.kind](task, data, runtime, hooks, FaultProgress(progress, task, shard.rank))
    except JobCancelled:
        if shard.rank == 0:
            task.store.write_json(task.path("result.json"), {"status": "cancelled"})
        return  # ends this run without a failure (no restart)
    if shard.rank == 0:
        losses = [{"epoch": i + 1, "loss": round(loss, 6)} for i, loss in enumerate(hooks.losses)]
        task.store.write_json(task.path("result.json"), {
            "status": "done", **outcome, "history": losses,
            "resumed_at_epoch": None if resume is None else resume["epoch"] + 1,
        })


class RayTraining:
    """Runs `TrainTask`s on Ray Train with `spec.resources.workers` workers: the students of the validate
    stage (`fit_student`) and squeeze's training loops (`trainers`), for `workers.backend.RayBackend`."""

    def __init__(self, spec: JobSpec, store: ArtifactStore, max_failures: int = 2, fault: TrainFault | None = None,
                 control: Any = None, check_s: float = 0.5, checkpoint_every_s: float = 30.0,
                 placement_timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S):
        """`placement_timeout_s`: how long a stage waits for the cluster to place its workers before it fails
        (`RayOptions.placement_timeout_s`)."""
        self.spec, self.store, self.max_failures = spec, store, max_failures
        self.fault, self.control, self.check_s = fault, control, check_s
        self.checkpoint_every_s = checkpoint_every_s
        self.placement_timeout_s = placement_timeout_s

    def run(self, kind: str, stage: str, workers: int | None = None, **fields: Any) -> dict:
        """One run of `workers` ranks (None: resources.workers); several may run at once from threads (each
        a run of its own name `stage`)."""
        connect()
        resources = self.spec.resources
        workers = workers or resources.workers
        use_gpu = wants_gpus(resources.device)
        task = TrainTask(kind, stage, self.spec, self.store, fault=self.fault, control=self.control,
                         check_s=self.check_s, checkpoint_every_s=self.checkpoint_every_s, **fields)
        per_worker = {"CPU": resources.threads or 1, **({"GPU": 1} if use_gpu else {})}
        # Ray Train waits for its workers' placement without end: wait here, bounded, for the same bundles
        # (an autoscaler starts the nodes meanwhile), release them, and fail with the fixes when they never come.
        wait_for_placement([dict(per_worker) for _ in range(workers)], self.placement_timeout_s,
                           f"{stage} (Ray Train)")
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"task": task},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                         resources_per_worker=per_worker),
            run_config=RunConfig(name=stage, storage_path=checkpoint_root(self.store),
                                 failure_config=FailureConfig(max_failures=self.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=1)),
        )
        self.store.write_json(task.path("result.json"), {"status": "running"})
        result = trainer.fit()
        if result.error is not None:
            raise WorkerFailedError(f"{stage} training on Ray Train failed after {self.max_failures} restarts: "
                                    f"{type(result.error).__name__}: {str(result.error).splitlines()[0][:300]}")
        outcome = self.store.read_json(task.path("result.json"))
        if outcome["status"] == "cancelled":
            raise JobCancelled(f"cancelled during {stage}")
        return outcome

    def fit_student(self, stage: str, protocol: Protocol, relabel_path: str | None, source: str | None = None,
                    workers: int | None = None, soft_labels: SoftLabelRequest | None = None) -> StudentScore:
        """A student of the validate stage (scdd/validate/stage.py), a run named `stage`, on `workers` ranks (None:
        all): the workers read the images of `source` themselves (the distilled ones from the store, real ones from
        disk) and, in KD, the relabel teacher at `relabel_path`."""
        workers = workers or self.spec.resources.workers
        outcome = self.run("student", stage, workers, protocol=protocol, relabel_path=relabel_path, source=source,
                           soft_labels=soft_labels)
        if soft_labels is not None:  # the ranks wrote their files: one index for all
            soft_labels.facts = write_index(self.store, soft_labels.topk, workers, protocol.to_dict())
        return StudentScore(top1=outcome["top1"], top5=outcome["top5"], total=outcome["total"],
                            workers=workers, epochs=outcome["history"],
                            resumed_at_epoch=outcome["resumed_at_epoch"])

    def trainers(self) -> Trainers:
        return Trainers(supervised=self._supervised, ssl=self._ssl)

    def _supervised(self, model: nn.Module, data: RealData, spec: TeacherSpec, runtime: Runtime, seed: int,
                    progress: Progress) -> nn.Module:
        # Each architecture trains as its own run (its own checkpoints): a gvbsm ensemble trains several.
        stage = "squeeze-supervised" if spec.arch == self.spec.teacher.arch else f"squeeze-supervised-{spec.arch}"
        self.store.write_bytes(train_path(stage, "initial.pt"), checkpoint_bytes(model))
        self.run("supervised", stage, teacher=spec)
        final = train_path(stage, "final.pt")
        load_weights(model, self.store.read_bytes(final), self.store.url_of(final))
        return model.to(runtime.device, memory_format=runtime.memory_format()).eval()

    def _ssl(self, method: str) -> Callable[..., dict]:
        def pretrain(backbone: nn.Module, feature_dim: int, data: RealData, spec: Any, runtime: Runtime, seed: int,
                     progress: Progress) -> dict:
            stage = "squeeze-ssl"
            self.store.write_bytes(train_path(stage, "initial.pt"), checkpoint_bytes(backbone))
            outcome = self.run("ssl", stage, ssl_method=method, feature_dim=feature_dim)
            final = train_path(stage, "final.pt")
            load_weights(backbone, self.store.read_bytes(final), self.store.url_of(final))
            backbone.to(runtime.device, memory_format=runtime.memory_format())
            return {**outcome["details"], "workers": self.spec.resources.workers}

        SSL_METHODS.get(method)  # an unknown name fails here, in the driver, with the registry's message
        return pretrain


def checkpoint_root(store: ArtifactStore) -> str:
    """Where Ray Train keeps the checkpoints: `state/train` of the output (a path for local stores)."""
    path = store.url_of(TRAIN_DIR)
    return os.path.abspath(path) if "://" not in path else path
