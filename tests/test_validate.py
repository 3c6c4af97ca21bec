import math

import pytest
import torch
from torch import nn

from api_schema import DatasetSpec, ValidateSpec
from scdd.data import load_dataset
from scdd.data.base import TensorImageDataset
from scdd.evaluate import evaluate
from scdd.progress import SilentProgress
from scdd.validate import kd_loss, mix_batch, random_real_subset, resolve_protocol, train_student


def test_kd_loss_equals_the_formula():
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    temperature = 3.0
    p_t = torch.softmax(t / temperature, 1)
    expected = (p_t * (p_t.log() - torch.log_softmax(s / temperature, 1))).sum(1).mean() * temperature**2
    torch.testing.assert_close(kd_loss(s, t, temperature), expected)
    assert kd_loss(t, t, temperature).abs() < 1e-6


class FixedModel(nn.Module):
    """Logits read off the first pixels: a model whose predictions are known by construction."""

    def forward(self, x):
        return x.flatten(1)[:, :6]


def test_evaluation_equals_a_hand_count(cpu):
    generator = torch.Generator().manual_seed(0)
    # Distinct pixel values in each image, so no two logits tie and the ranking is unambiguous.
    images = torch.stack([torch.randperm(256, generator=generator)[:16] for _ in range(1003)]).to(torch.uint8)
    images = images.view(1003, 1, 4, 4)
    labels = torch.randint(0, 6, (1003,), generator=generator)
    dataset = TensorImageDataset(images, labels, (0.0,), (1.0,))
    logits = images.float().flatten(1)[:, :6] / 255
    top5 = logits.topk(5, 1).indices
    hand1 = sum(int(logits[i].argmax() == labels[i]) for i in range(1003))
    hand5 = sum(int(labels[i] in top5[i]) for i in range(1003))
    accuracy = evaluate(FixedModel(), dataset, cpu, batch_size=100)  # 1003 = 10 full batches + 3
    assert (accuracy.correct1, accuracy.correct5, accuracy.total) == (hand1, hand5, 1003)
    assert accuracy.top1 == pytest.approx(100 * hand1 / 1003)


def test_baseline_subset_has_exactly_ipc_per_class_drawn_with_the_seed(fmnist_root):
    data = load_dataset(DatasetSpec(root=str(fmnist_root), classes=[0, 3, 7]))
    images, labels = random_real_subset(data.train, 4, 3, seed=5).normalized()
    assert images.shape == (12, 1, 28, 28) and torch.bincount(labels).tolist() == [4, 4, 4]
    again, _ = random_real_subset(data.train, 4, 3, seed=5).normalized()
    other, _ = random_real_subset(data.train, 4, 3, seed=6).normalized()
    assert torch.equal(images, again) and not torch.equal(images, other)
    full = data.train.images.float().div(255).sub(0.286).div(0.353)
    for image, label in zip(images, labels):  # every image is a real training image of its class
        match = (full - image).abs().flatten(1).amax(1) < 1e-5
        assert match.any() and (data.train.labels[match] == label).all()


def test_protocol_defaults_follow_the_mode_and_preset():
    kd = resolve_protocol(ValidateSpec(preset="quick"), 100)
    hard = resolve_protocol(ValidateSpec(mode="hard", preset="quick"), 100)
    assert (kd.student_arch, kd.optimizer, kd.mix, kd.epochs, kd.batch_size) == ("convnet", "adamw", "cutmix", 100, 64)
    assert (kd.ema_decay, kd.schedule_span) == (0.0, 1.0)
    assert (hard.student_arch, hard.optimizer, hard.lr, hard.weight_decay, hard.epochs) == ("convnet_in", "sgd", 0.01, 5e-4, 300)
    assert resolve_protocol(ValidateSpec(mode="hard", epochs=7, mix="mixup"), 100).epochs == 7
    assert "temperature" not in hard.to_dict()
    assert resolve_protocol(ValidateSpec(), 100) == kd  # the demo's protocol is the default
    long = resolve_protocol(ValidateSpec(preset="long"), 100)
    assert (long.preset, long.epochs, long.ema_decay, long.schedule_span, long.mix) == ("long", 300, 0.99, 2.0, "cutmix")
    # RDED's batch sizes for a 10-class set at IPC 1 / 10 / 50, and the bounds for other sizes
    assert [resolve_protocol(ValidateSpec(preset="long"), n).batch_size for n in (10, 100, 500, 3, 5000)] == [10, 50, 100, 10, 100]
    assert resolve_protocol(ValidateSpec(preset="long", batch_size=32), 500).batch_size == 32


def test_long_schedule_decays_to_half_and_quick_to_zero():
    from scdd.optim import cosine_factor

    assert cosine_factor(0, 600, 2.0) == 1.0
    assert cosine_factor(600, 600, 2.0) == pytest.approx(0.5)
    assert cosine_factor(300, 600, 2.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine_factor(600, 600) == pytest.approx(0.0)


def test_weight_ema_follows_its_formula_and_copies_buffers():
    from scdd.validate.ema import WeightEMA

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEMA(model, 0.99)
    start = [p.detach().clone() for p in model.parameters()]
    expected = [p.clone() for p in start]
    for step in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
            model[1].running_mean.fill_(step)
        d = min(0.99, (1 + step) / (10 + step))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters())]
        ema.update(model)
    for avg, exp in zip(ema.average.parameters(), expected):
        torch.testing.assert_close(avg, exp)
    assert torch.equal(ema.average[1].running_mean, model[1].running_mean)
    restored = WeightEMA(model, 0.99)
    restored.load_state_dict(ema.state_dict())
    assert restored.steps == 30
    torch.testing.assert_close(restored.copy_to(model)[0].weight.detach(), expected[0])


def test_dd_ranking_scores_match_hand_computed_values():
    from scdd.validate import ranking

    assert ranking.ior(71.3, 68.1) == 3.2
    assert ranking.hlr(91.0, 62.5) == 28.5
    # a = 0.5 * 0.032 - 0.5 * 0.285 = -0.1265; (e^a - e^-1) / (e - e^-1)
    assert ranking.lrs(3.2, 28.5) == pytest.approx((0.881175 - 0.367879) / (2.718282 - 0.367879), abs=1e-5)
    assert ranking.lrs(100, 0) == pytest.approx((math.exp(0.5) - math.exp(-1)) / (math.e - math.exp(-1)))
    assert ranking.lrs(0, 0) == pytest.approx((1 - math.exp(-1)) / (math.e - math.exp(-1)))


def test_cutmix_lam_is_the_kept_area_and_mixup_blends():
    generator = torch.Generator().manual_seed(1)
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 10, 10).contiguous()
    mixed, perm, lam = mix_batch(images, "cutmix", 1.0, generator)
    paired = perm != torch.arange(4)  # an image paired with itself is unchanged by the paste
    assert paired.any() and 0 < lam < 1
    kept = (mixed[paired] == images[paired]).float().mean().item()
    assert kept == pytest.approx(lam, abs=1e-6)
    mixed, perm, lam = mix_batch(images, "mixup", 1.0, generator)
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images[perm])


@pytest.mark.parametrize("mode", ["kd", "hard"])
def test_student_learns_from_a_tiny_real_set(mode, fmnist_root, fmnist_teacher_ckpt, cpu):
    from scdd.models import create_model, load_weights

    data = load_dataset(DatasetSpec(root=str(fmnist_root), classes=[0, 1, 2]))
    images = random_real_subset(data.train, 10, 3, seed=0)
    teacher = create_model("convnet", 3, 1, 28)
    load_weights(teacher, fmnist_teacher_ckpt.read_bytes(), "fixture")
    teacher.eval().requires_grad_(False)
    protocol = resolve_protocol(ValidateSpec(mode=mode, epochs=30), len(images))
    student = create_model(protocol.student_arch, 3, 1, 28)
    train_student(student, images, protocol, teacher if mode == "kd" else None, cpu, 0, SilentProgress())
    assert evaluate(student, data.test, cpu).top1 > 50  # chance is 33%


def test_dd_ranking_report_trains_the_hard_runs_once_and_caches_full_data(tmp_path, fmnist_root, fmnist_teacher_ckpt):
    from api_schema import JobSpec
    from scdd.pipeline import run_distillation
    from scdd.validate import ranking
    from tests.conftest import tiny_job

    validate = {"enabled": True, "epochs": 2, "dd_ranking": True, "full_data_epochs": 1}
    cache = str(tmp_path / "cache")
    spec = tiny_job(fmnist_root, tmp_path / "a", fmnist_teacher_ckpt, validate=validate,
                    recover={"ipc": 2, "iterations": 2}, output={"teacher_cache": cache})
    report = run_distillation(JobSpec.model_validate(spec))
    val = report.validate_
    rank = val.dd_ranking
    assert rank.full_data_source == "trained" and rank.ior == val.ior == val.gain_top1
    assert rank.hard_protocol.mode == "hard" and rank.full_data_protocol.epochs == 1
    assert rank.full_data_protocol.batch_size == 256
    assert rank.hlr == round(rank.full_data_hard_top1 - rank.set_hard_top1, 2)
    assert rank.lrs == pytest.approx(ranking.lrs(rank.ior, rank.hlr), abs=1e-4)
    assert "dd_ranking" in report.stage_seconds
    # Another set on the same data, student and protocol reuses the full-data accuracy.
    again = tiny_job(fmnist_root, tmp_path / "b", fmnist_teacher_ckpt, validate=validate,
                     recover={"ipc": 2, "iterations": 3}, output={"teacher_cache": cache})
    second = run_distillation(JobSpec.model_validate(again)).validate_.dd_ranking
    assert second.full_data_source == "cached" and second.full_data_hard_top1 == rank.full_data_hard_top1
    given = tiny_job(fmnist_root, tmp_path / "c", fmnist_teacher_ckpt, validate={**validate, "full_data_top1": 91.5},
                     recover={"ipc": 2, "iterations": 3}, output={"teacher_cache": cache})
    third = run_distillation(JobSpec.model_validate(given)).validate_.dd_ranking
    assert (third.full_data_source, third.full_data_hard_top1) == ("spec", 91.5)


def test_dd_ranking_needs_the_baseline():
    with pytest.raises(ValueError, match="dd_ranking needs validate.baseline: true"):
        ValidateSpec(dd_ranking=True, baseline=False)
