"""Named recipes (issue 26): every value a recipe sets reaches the job, a spec's own field overrides it, the report
records both, and tiny seeded runs through `scdd distill --recipe` draw recover's augmentation and train the student
the reference's way (the draws and the student's optimiser, schedule, crops and loss are recorded as they happen)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import scdd.augment
import scdd.shard
import scdd.validate.train
from api_schema import JobSpec
from api_schema.recipes import RECIPE_SOURCES, RECIPES, flatten, recipe_facts
from scdd_cli import main as scdd_main
from tests.conftest import TEST_LIMIT
from tests.test_data import make_imagefolder


def test_each_recipe_sets_its_values_and_names_a_source_for_each():
    for name, recipe in RECIPES.items():
        flat = flatten(recipe)
        assert set(flat) == set(RECIPE_SOURCES[name]), name
        spec = JobSpec(recipe=name).to_dict()
        facts = recipe_facts(name, spec)
        assert facts["overridden"] == {} and set(facts["set"]) == set(flat), name


def test_a_field_the_spec_sets_overrides_the_recipe_and_the_report_says_so():
    spec = JobSpec.model_validate({"recipe": "sre2l-cifar", "validate": {"epochs": 5}, "recover": {"augment": {"jitter": 2}}})
    assert spec.validate_.epochs == 5 and spec.recover.augment.jitter == 2
    assert spec.validate_.temperature == 30 and spec.recover.iterations == 1000 and spec.output.image_format == "jpeg"
    facts = recipe_facts("sre2l-cifar", spec.to_dict())
    assert facts["overridden"] == {"validate.epochs": 5, "recover.augment.jitter": 2}
    assert facts["set"]["validate.temperature"] == 30.0
    # the resolved spec round-trips (the service stores it, the Ray driver reads it back) to the same facts
    again = JobSpec.model_validate(spec.to_dict())
    assert again == spec and recipe_facts("sre2l-cifar", again.to_dict()) == facts


class Recorder:
    """Records recover's augmentation draws and the student's optimiser, schedule, crops and KD loss calls."""

    def __init__(self, monkeypatch):
        self.draws, self.optimizers, self.schedules, self.crops, self.kd = [], [], [], [], []
        sample, build, schedule = scdd.augment.sample_params, scdd.validate.train.build_optimizer, scdd.shard.lr_schedule
        draw_crops, kd_loss = scdd.validate.train.draw_crops, scdd.validate.train.kd_loss

        def sample_params(n, size, **kw):
            params = sample(n, size, **kw)
            if "per" in kw:  # recover's draws (the training loops' crop_flip leaves per and the direction out)
                self.draws.append((size, params))
            return params

        def build_optimizer(*args, **kw):
            self.optimizers.append(build(*args, **kw))
            return self.optimizers[-1]

        def lr_schedule(optimizer, epochs, steps_per_epoch, *args):
            self.schedules.append((epochs, steps_per_epoch, schedule(optimizer, epochs, steps_per_epoch, *args)))
            return self.schedules[-1][2]

        def crops(kind, *args):
            self.crops.append(kind)
            return draw_crops(kind, *args)

        def kd(student, teacher, temperature, t_squared=True):
            self.kd.append((temperature, t_squared))
            return kd_loss(student, teacher, temperature, t_squared)

        monkeypatch.setattr(scdd.augment, "sample_params", sample_params)
        monkeypatch.setattr(scdd.validate.train, "build_optimizer", build_optimizer)
        monkeypatch.setattr(scdd.shard, "lr_schedule", lr_schedule)
        monkeypatch.setattr(scdd.validate.train, "draw_crops", crops)
        monkeypatch.setattr(scdd.validate.train, "kd_loss", kd)


def run_recipe(tmp_path: Path, recipe: str, dataset: dict, **sections) -> dict:
    """`scdd distill --recipe RECIPE` in this process on a tiny config (the recipe's schedule lengths cut); the
    report."""
    config = {
        "dataset": {"train_limit": 40, "test_limit": TEST_LIMIT // 10, **dataset},
        "teacher": {"epochs": 1, "batch_size": 32, "ssl": {"epochs": 1, "batch_size": 32, "queue_size": 64},
                    "probe": {"epochs": 1}},
        "recover": {"ipc": 2, "iterations": 3},
        "validate": {"epochs": 2, "baseline": False},
        "resources": {"device": "cpu", "compile": "off", "channels_last": "off", "threads": 2},
        "output": {"url": str(tmp_path / "out")},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    assert scdd_main(["distill", "--recipe", recipe, "--config", str(path), "--quiet"]) == 0
    return json.loads((tmp_path / "out" / "report.json").read_text())


def student_lrs(recorder: Recorder) -> list[float]:
    """The student's learning-rate factor at the first step of each epoch, from the schedule it trained with."""
    epochs, steps, scheduler = recorder.schedules[-1]
    return [scheduler.lr_lambdas[0](epoch * steps) for epoch in range(epochs)]


@pytest.mark.parametrize("recipe", ["sre2l-cifar", "scdd-cifar100"])
def test_the_cifar_recipes_roll_forward_by_0_to_4_with_no_crop_or_flip_and_train_the_cifar_student(
        tmp_path, fmnist_root, monkeypatch, recipe):
    recorder = Recorder(monkeypatch)
    report = run_recipe(tmp_path, recipe, {"root": str(fmnist_root), "classes": [0, 1]})
    size = 28
    assert recorder.draws and all(s == size for s, _ in recorder.draws)
    rolls = set()
    for _, p in recorder.draws:
        assert torch.equal(p.x0, torch.zeros_like(p.x0)) and torch.equal(p.w, torch.full_like(p.w, float(size)))
        assert not p.flip.any()
        assert (p.roll_x == p.roll_x[0]).all() and (p.roll_y == p.roll_y[0]).all()  # one roll per batch
        rolls |= {int(p.roll_x[0]), int(p.roll_y[0])}
    assert rolls <= set(range(5))
    # the student: AdamW 1e-3 / 0.01 on every parameter, padded crops, MixUp, KL without T^2, per-epoch cosine
    optimizer = recorder.optimizers[-1]
    assert isinstance(optimizer, torch.optim.AdamW) and len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["weight_decay"] == 0.01
    assert set(recorder.crops) == {"padded"} and set(recorder.kd) == {(30.0, False)}
    span = 3.0 if recipe == "scdd-cifar100" else 1.0
    assert student_lrs(recorder) == pytest.approx([0.5 * (1 + math.cos(math.pi * e / (span * 2))) for e in range(2)])
    protocol = report["validate"]["protocol"]
    assert protocol["mix"] == "mixup" and protocol["mix_alpha"] == 0.8 and protocol["crop"] == "padded"
    assert report["recipe"]["name"] == recipe and report["recipe"]["set"]["recover.augment.jitter"] == 4
    assert report["recipe"]["overridden"]["recover.iterations"] == 3
    assert report["dataset"]["normalization"] == "measured"
    assert report["runtime"]["amp"] == "off"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert all(entry["path"].endswith(".jpg") for entry in manifest["images"])


def test_the_imagenet_recipe_draws_one_crop_and_flip_per_batch_and_rolls_one_way(tmp_path, monkeypatch):
    recorder = Recorder(monkeypatch)
    root = make_imagefolder(tmp_path / "data", classes=("ant", "bee"), per_class=6, size=(40, 40))
    size = 32
    report = run_recipe(tmp_path, "sre2l-imagenet", {"name": "imagefolder", "root": str(root), "image_size": size},
                        validate={"epochs": 2, "batch_size": 2, "baseline": False}, recover={"augment": {"jitter": 4}})
    crops = set()
    for s, p in recorder.draws:
        assert s == size
        for field in (p.x0, p.y0, p.w, p.h, p.flip, p.roll_x, p.roll_y):
            assert (field == field[0]).all()  # one draw shared by the batch
        assert 0 <= int(p.roll_x[0]) <= 4 and 0 <= int(p.roll_y[0]) <= 4
        crops.add((round(float(p.w[0]), 3), round(float(p.h[0]), 3)))
    assert len(crops) > 1  # a new crop each step
    # the student: AdamW with no decay on BatchNorm and biases, resized crops (0.08-1), CutMix, T 20 without T^2
    groups = recorder.optimizers[-1].param_groups
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.01]
    no_decay = next(g for g in groups if g["weight_decay"] == 0.0)
    assert no_decay["params"] and all(p.dim() < 2 for p in no_decay["params"])
    assert set(recorder.crops) == {"resized"} and set(recorder.kd) == {(20.0, False)}
    assert student_lrs(recorder) == pytest.approx([1.0, 0.5])  # 0.5 (1 + cos(pi e / 2)), once per epoch
    assert report["validate"]["protocol"]["mix"] == "cutmix" and report["validate"]["protocol"]["crop_scale"] == [0.08, 1.0]
    assert report["dataset"]["test_resize_ratio"] == pytest.approx(256 / 224)
    assert report["recipe"]["overridden"]["dataset.image_size"] == size


def test_the_tiny_imagenet_student_warms_up_and_uses_plain_momentum_sgd_with_t_squared():
    from scdd.optim import build_optimizer, lr_schedule
    from scdd.validate import resolve_protocol

    spec = JobSpec(recipe="sre2l-tiny-imagenet", validate={"epochs": 10})
    protocol = resolve_protocol(spec.validate_, 100, 64)
    assert (protocol.optimizer, protocol.momentum, protocol.nesterov, protocol.temperature_squared) == ("sgd", 0.9, False, True)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    optimizer = build_optimizer(protocol.optimizer, model.parameters(), protocol.lr, protocol.weight_decay,
                                momentum=protocol.momentum, nesterov=protocol.nesterov,
                                decay_norm_and_bias=protocol.decay_norm_and_bias)
    assert optimizer.param_groups[0]["nesterov"] is False and optimizer.param_groups[0]["weight_decay"] == 1e-4
    schedule = lr_schedule(optimizer, protocol.epochs, 3, protocol.schedule_span, protocol.warmup_epochs,
                           protocol.schedule_unit)
    factors = [schedule.lr_lambdas[0](epoch * 3) for epoch in range(10)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factors[5:] == pytest.approx([0.5 * (1 + math.cos(math.pi * e / 5)) for e in range(5)])
