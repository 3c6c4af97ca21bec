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
    images, labels = random_real_subset(data.train, 4, 3, seed=5)
    assert images.shape == (12, 1, 28, 28) and torch.bincount(labels).tolist() == [4, 4, 4]
    again, _ = random_real_subset(data.train, 4, 3, seed=5)
    other, _ = random_real_subset(data.train, 4, 3, seed=6)
    assert torch.equal(images, again) and not torch.equal(images, other)
    full = data.train.images.float().div(255).sub(0.286).div(0.353)
    for image, label in zip(images, labels):  # every image is a real training image of its class
        match = (full - image).abs().flatten(1).amax(1) < 1e-5
        assert match.any() and (data.train.labels[match] == label).all()


def test_protocol_defaults_follow_the_mode():
    kd = resolve_protocol(ValidateSpec())
    hard = resolve_protocol(ValidateSpec(mode="hard"))
    assert (kd.student_arch, kd.optimizer, kd.mix, kd.epochs) == ("convnet", "adamw", "cutmix", 100)
    assert (hard.student_arch, hard.optimizer, hard.lr, hard.weight_decay, hard.epochs) == ("convnet_in", "sgd", 0.01, 5e-4, 300)
    assert resolve_protocol(ValidateSpec(mode="hard", epochs=7, mix="mixup")).epochs == 7
    assert "temperature" not in hard.to_dict()


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
    images, labels = random_real_subset(data.train, 10, 3, seed=0)
    teacher = create_model("convnet", 3, 1, 28)
    load_weights(teacher, fmnist_teacher_ckpt.read_bytes(), "fixture")
    teacher.eval().requires_grad_(False)
    protocol = resolve_protocol(ValidateSpec(mode=mode, epochs=30))
    student = create_model(protocol.student_arch, 3, 1, 28)
    train_student(student, images, labels, protocol, teacher if mode == "kd" else None, cpu, 0, SilentProgress())
    assert evaluate(student, data.test, cpu).top1 > 50  # chance is 33%
