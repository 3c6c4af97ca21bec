"""Recover initialisations: noise, real, selected (scored crops) and herding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from api_schema import DatasetSpec, JobSpec, RecoverSpec
from scdd.data import load_dataset
from scdd.data.fashion_mnist import _split
from scdd.models import create_model, load_weights
from scdd.pipeline import run_distillation
from scdd.recover.init import INITS
from scdd.recover.init.inits import crop_losses, crop_views, herding_positions, rank_positions
from tests.conftest import tiny_job


@pytest.fixture(scope="module")
def three_classes(fmnist_root):
    return load_dataset(DatasetSpec(root=str(fmnist_root), classes=[0, 1, 2], train_limit=60), seed=0)


@pytest.fixture
def teacher(fmnist_teacher_ckpt):
    model = create_model("convnet", 3, 1, 28)
    load_weights(model, fmnist_teacher_ckpt.read_bytes(), "fixture")
    return model.eval().requires_grad_(False)


def test_init_names_match_the_registry():
    from api_schema.names import INITS as NAMES

    assert set(INITS.names()) == set(NAMES)


def test_whole_image_crop_scores_are_the_teachers_cross_entropy(three_classes, teacher, cpu):
    images, _ = three_classes.train.batch(torch.arange(6))
    boxes = torch.tensor([0.0, 0.0, 28.0, 28.0]).expand(6, 1, 4)
    losses = crop_losses(teacher, images, 1, boxes, cpu)
    expected = F.cross_entropy(teacher(images), torch.full((6,), 1), reduction="none")
    torch.testing.assert_close(losses[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_a_half_crop_is_scored_on_the_upsampled_quarter(three_classes, teacher, cpu):
    """The box (0, 0, 14, 14) resized to 28: away from its last row and column, bilinear upsampling by 2
    of the top-left quarter (computed here with F.interpolate) gives the same view."""
    images, _ = three_classes.train.batch(torch.arange(4))
    views = crop_views(images, torch.tensor([[0.0, 0.0, 14.0, 14.0]]).expand(4, 4))
    reference = F.interpolate(images[:, :, :15, :15], scale_factor=2, mode="bilinear", align_corners=False)[:, :, :28, :28]
    torch.testing.assert_close(views[:, :, :27, :27], reference[:, :, :27, :27], rtol=1e-5, atol=1e-5)


def test_rank_keeps_the_lowest_or_the_median_losses():
    losses = torch.tensor([5.0, 0.1, 3.0, 0.2, 2.0, 4.0, 1.0])  # sorted positions: 1 3 6 4 2 5 0
    assert rank_positions(losses, 2, "easy").tolist() == [1, 3]
    assert rank_positions(losses, 3, "medium").tolist() == [6, 4, 2]  # centred on the median (position 4)
    assert rank_positions(losses, 7, "medium").tolist() == losses.argsort().tolist()


def test_herding_matches_a_brute_force_greedy():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(12, 5, generator=generator)
    f = F.normalize(features.double(), dim=1)
    mean, picked = f.mean(0), []
    for k in range(1, 5):
        best = min((i for i in range(12) if i not in picked),
                   key=lambda i: float(((mean - (f[picked].sum(0) + f[i]) / k) ** 2).sum()))
        picked.append(best)
    assert herding_positions(features, 4).tolist() == picked


def test_real_init_is_a_seeded_pick_of_each_class(three_classes, teacher, cpu):
    spec = RecoverSpec(ipc=3, init="real")
    plan = INITS.get("real")(three_classes, teacher, spec, cpu, 0)
    again = INITS.get("real")(three_classes, teacher, spec, cpu, 0)
    other = INITS.get("real")(three_classes, teacher, spec, cpu, 1)
    assert plan.pixels.shape == (3, 3, 1, 28, 28) and torch.equal(plan.pixels, again.pixels)
    assert not torch.equal(plan.pixels, other.pixels)
    train = three_classes.train
    for label, origins in enumerate(plan.origins):
        for r, origin in enumerate(origins):
            assert train.labels[origin.train_index] == label
            assert int(train.source_index[origin.train_index]) == origin.source_index
            torch.testing.assert_close(plan.pixels[label, r], train.images[origin.train_index].float() / 255)


def test_selected_keeps_the_best_crop_of_each_candidate(three_classes, teacher, cpu):
    spec = RecoverSpec(ipc=2, init="selected", select={"candidates": 10, "crops": 4, "rank": "easy"})
    plan = INITS.get("selected")(three_classes, teacher, spec, cpu, 0)
    assert plan.pixels.shape == (3, 2, 1, 28, 28)
    for label, origins in enumerate(plan.origins):
        assert origins[0].loss <= origins[1].loss
        for r, origin in enumerate(origins):
            image, _ = three_classes.train.batch(torch.tensor([origin.train_index]))
            box = torch.tensor(origin.box).view(1, 1, 4)
            # The origin's box and loss reproduce the kept image (box rounded to 1e-3 px in the record).
            assert crop_losses(teacher, image, label, box, cpu).item() == pytest.approx(origin.loss, abs=1e-2)
    # medium keeps other (harder) crops than easy
    medium = INITS.get("selected")(three_classes, teacher, spec.model_copy(update={"select": spec.select.model_copy(
        update={"rank": "medium"})}), cpu, 0)
    assert sum(o.loss for c in medium.origins for o in c) > sum(o.loss for c in plan.origins for o in c)


@pytest.mark.parametrize("init", ["real", "selected", "herding"])
def test_real_pixel_inits_record_provenance_and_resume_byte_for_byte(init, tmp_path, fmnist_root, fmnist_teacher_ckpt):
    recover = {"init": init, "ipc": 2, "iterations": 2, "batch_size": 2, "select": {"candidates": 8, "crops": 2}}
    out = tmp_path / "run"
    spec = JobSpec.model_validate(tiny_job(fmnist_root, out, fmnist_teacher_ckpt, recover=recover))
    first = run_distillation(spec, max_units=1)
    assert not first.complete
    run_distillation(spec)
    straight = tmp_path / "straight"
    run_distillation(JobSpec.model_validate(tiny_job(fmnist_root, straight, fmnist_teacher_ckpt, recover=recover)))
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["images"]) == 6
    for entry in manifest["images"]:
        origin = entry["origin"]
        assert origin["init"] == init and origin["source_index"] is not None and len(origin["box"]) == 4
        assert (out / entry["path"]).read_bytes() == (straight / entry["path"]).read_bytes()


def test_zero_iterations_keep_the_real_images(tmp_path, fmnist_root, fmnist_teacher_ckpt):
    out = tmp_path / "run"
    spec = JobSpec.model_validate(tiny_job(fmnist_root, out, fmnist_teacher_ckpt, recover={"init": "real", "iterations": 0}))
    run_distillation(spec)
    source, _ = _split(fmnist_root, "train")
    for entry in json.loads((out / "manifest.json").read_text())["images"]:
        pixels = torch.from_numpy(np.array(Image.open(out / entry["path"])))
        assert torch.equal(pixels, source[entry["origin"]["source_index"], 0])


@pytest.mark.parametrize(("recover", "message"), [
    ({"init": "bogus"}, "recover.init"),
    ({"init": "selected", "ipc": 20, "select": {"candidates": 10}}, "must be >= recover.ipc"),
    ({"init": "noise", "iterations": 0}, "must be >= 1 with init 'noise'"),
])
def test_bad_init_specs_are_refused_with_the_field_named(recover, message):
    with pytest.raises(ValueError, match=message):
        JobSpec.model_validate({"recover": recover})
