"""The data plane at ImageNet's shape, at a tiny size: 1000 classes through 2 Ray workers, the driver touching no
image; each rank reading only its shard; the default student following the resolution."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from api_schema import DatasetSpec, JobSpec, ValidateSpec
from scdd.artifacts import encode_png, grid_classes, read_distilled
from scdd.data import load_dataset
from scdd.models import checkpoint_bytes, create_model
from scdd.shard import Shard, TrainHooks, rank_batch
from scdd.store import ArtifactStore
from scdd.validate import random_real_subset, resolve_protocol
from tests.conftest import quick_resources

CLASSES = 1000


@pytest.fixture(scope="module")
def thousand_classes(tmp_path_factory) -> Path:
    """An ImageFolder of 1000 classes, 2 training and 1 validation 8 px images each."""
    root = tmp_path_factory.mktemp("imagenet-shaped")
    rng = np.random.default_rng(0)
    for split, count in (("train", 2), ("val", 1)):
        for c in range(CLASSES):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            base = np.array([c % 10, (c // 10) % 10, c // 100]) * 25
            for i in range(count):
                pixels = np.clip(base + rng.integers(0, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture
def no_images_in_this_process(monkeypatch):
    """Fails the test when this process (the driver) decodes an image or builds a set of pixels: every pass
    over images must run on the workers (separate processes, which this does not touch)."""
    from scdd import artifacts
    from scdd.data import base, imagefolder

    def refuse(*_args, **_kwargs):
        raise AssertionError("the driver touched images")

    monkeypatch.setattr(imagefolder.ImageFileDataset, "pixel", refuse)
    monkeypatch.setattr(artifacts, "decode_png", refuse)
    monkeypatch.setattr(base.PixelSet, "__post_init__", refuse)


def test_a_1000_class_job_on_2_workers_completes_without_the_driver_touching_images(
        ray_local, tmp_path, thousand_classes, no_images_in_this_process):
    from workers.driver import run_job
    from workers.events import ListSink

    torch.manual_seed(0)
    teacher = create_model("convnet_d1_w32", CLASSES, 3, 8)
    checkpoint = tmp_path / "teacher.pt"
    checkpoint.write_bytes(checkpoint_bytes(teacher, arch="convnet_d1_w32", num_classes=CLASSES, in_channels=3,
                                            image_size=8))
    spec = JobSpec.model_validate({
        "method": "sre2l",
        "dataset": {"name": "imagefolder", "root": str(thousand_classes), "image_size": 8},
        "teacher": {"arch": "convnet_d1_w32", "checkpoint": str(checkpoint)},
        "recover": {"init": "noise", "ipc": 2, "iterations": 1, "batch_size": 250},
        "validate": {"enabled": True, "epochs": 1, "student_arch": "convnet_d1_w32", "baseline": False},
        "resources": {**quick_resources(), "workers": 2, "threads": 1},
        "output": {"url": str(tmp_path / "run"), "grid_per_class": 2},
    })
    outcome = run_job(spec, ListSink())
    assert outcome.status == "succeeded", outcome.error
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert manifest["complete"] and len(manifest["images"]) == CLASSES * 2
    assert {(e["label"], e["round"]) for e in manifest["images"]} == {(c, r) for c in range(CLASSES) for r in range(2)}
    assert all((tmp_path / "run" / e["path"]).stat().st_size == e["bytes"] for e in manifest["images"])
    assert {e["worker"] for e in manifest["images"]} == {0, 1}
    report = outcome.report
    assert report.teacher.total == CLASSES  # counted on the workers, one validation image per class
    assert report.validate_.student.total == CLASSES  # each rank read its shard of the 2000 images from the store
    with Image.open(tmp_path / "run/grid.png") as grid:  # 100 of the 1000 classes, 2 images each
        assert grid.height == 100 * (64 + 2)


def test_shards_of_the_distilled_set_and_the_baseline_partition_the_set(tmp_path, fmnist_root):
    data = load_dataset(DatasetSpec(root=str(fmnist_root), classes=[0, 1, 2]))
    whole = random_real_subset(data.train, 5, 3, seed=1)
    parts = [random_real_subset(data.train, 5, 3, seed=1, shard=Shard(rank, 2)) for rank in range(2)]
    assert [len(p) for p in parts] == [8, 7] and all(p.set_size == 15 for p in parts)
    assert torch.equal(parts[0].pixels, whole.pixels[0::2]) and torch.equal(parts[1].pixels, whole.pixels[1::2])
    assert torch.equal(parts[1].labels, whole.labels[1::2])

    store = ArtifactStore(str(tmp_path))
    entries = []
    for i in range(7):
        path = f"images/c/{i}.png"
        store.write_bytes(path, encode_png(whole.pixels[i].float() / 255))
        entries.append({"path": path, "label": int(whole.labels[i])})
    read = read_distilled(store, entries, data.info)
    assert torch.equal(read.pixels, whole.pixels[:7]) and read.total is None
    shards = [read_distilled(store, entries, data.info, Shard(rank, 3)) for rank in range(3)]
    assert [len(s) for s in shards] == [3, 2, 2] and all(s.total == 7 for s in shards)
    assert torch.equal(shards[1].pixels, whole.pixels[[1, 4]])


def test_each_rank_walks_its_own_shard_padded_to_equal_steps():
    generator = torch.Generator()
    orders = [TrainHooks(shard=Shard(rank, 3)).shard_order(held, 10, 0, generator, 0)
              for rank, held in enumerate((4, 3, 3))]
    assert [len(o) for o in orders] == [4, 4, 4]  # ceil(10 / 3) steps' worth on every rank, as DDP needs
    assert sorted(orders[0].tolist()) == [0, 1, 2, 3] and sorted(set(orders[1].tolist())) == [0, 1, 2]
    alone = TrainHooks().shard_order(10, 10, 0, torch.Generator().manual_seed(3), 0)
    assert torch.equal(alone, torch.randperm(10, generator=torch.Generator().manual_seed(3)))  # as before sharding


def test_a_ranks_batch_has_a_floor_on_large_sets():
    assert rank_batch(64, 100, 2, 16) == 32  # the single-process global batch
    assert rank_batch(64, 50_000, 64, 16) == 16  # not 1 image per GPU
    assert rank_batch(64, 200, 64, 16) == 1  # a small set keeps the global batch
    assert rank_batch(8, 50_000, 64, 16) == 8  # never above the protocol's batch
    assert math.ceil(64 / 64) == rank_batch(64, 50_000, 64)


@pytest.mark.parametrize(("size", "mode", "student"), [
    (28, "kd", "convnet"), (28, "hard", "convnet_in"), (32, "kd", "resnet18_small"), (64, "hard", "convnet_in"),
    (224, "kd", "resnet18"), (224, "hard", "resnet18")])
def test_the_default_student_follows_the_resolution(size, mode, student):
    assert resolve_protocol(ValidateSpec(mode=mode), 100, size).student_arch == student
    assert resolve_protocol(ValidateSpec(mode=mode, student_arch="wrn16_2"), 100, size).student_arch == "wrn16_2"


def test_grid_shows_at_most_100_classes_spread_over_the_set():
    assert grid_classes(10) == list(range(10))
    shown = grid_classes(1000)
    assert len(shown) == 100 and shown[0] == 0 and shown[-1] == 999
