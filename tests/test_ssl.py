import io
import math

import pytest
import torch
from torch import nn

from api_schema import DatasetSpec, ProbeSpec, SSLSpec
from scdd.data import load_dataset
from scdd.errors import CheckpointError
from scdd.models import create_model, strip_head
from scdd.progress import SilentProgress
from scdd.squeeze import train_probe
from scdd.squeeze.ssl import detect_format, import_backbone
from scdd.squeeze.ssl.moco import MoCo, make_view, pretrain_moco_v2
from tests.conftest import TEST_LIMIT


def to_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def source_backbone(arch="resnet18_small"):
    model = create_model(arch, 10, 3, 32)
    for p in model.parameters():
        nn.init.normal_(p, std=0.02)
    return model


def in_format(fmt: str, state: dict) -> dict:
    """A checkpoint laid out as each method's official code writes it, head and extras included."""
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}
    mlp = {"fc.0.weight": torch.randn(2048, 512), "fc.0.bias": torch.randn(2048), "fc.2.weight": torch.randn(128, 2048)}
    if fmt == "moco_v2":
        sd = {f"module.encoder_q.{k}": v for k, v in {**body, **mlp}.items()}
        sd |= {f"module.encoder_k.{k}": v.clone() for k, v in body.items()}
        sd["module.queue"] = torch.randn(128, 4096)
        return {"state_dict": sd, "epoch": 200, "arch": "resnet18"}
    if fmt == "moco_v3":
        sd = {f"module.base_encoder.{k}": v for k, v in {**body, **mlp}.items()}
        sd |= {f"module.momentum_encoder.{k}": v.clone() for k, v in body.items()}
        sd["module.predictor.0.weight"] = torch.randn(4096, 256)
        return {"state_dict": sd, "epoch": 100}
    if fmt == "dino":
        teacher = {f"backbone.{k}": v for k, v in body.items()} | {"head.mlp.0.weight": torch.randn(2048, 512)}
        student = {f"module.{k}": torch.zeros_like(v) for k, v in teacher.items()}
        return {"teacher": teacher, "student": student, "epoch": 100}
    if fmt == "swav":
        return {f"module.{k}": v for k, v in body.items()} | {
            "module.projection_head.0.weight": torch.randn(2048, 512), "module.prototypes.weight": torch.randn(3000, 128)}
    if fmt == "torchvision":
        return dict(state)
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["moco_v2", "moco_v3", "dino", "swav", "torchvision"])
def test_each_ssl_checkpoint_format_loads_into_the_registry_backbone(fmt):
    source = source_backbone()
    state = source.state_dict()
    checkpoint = in_format(fmt, state)
    assert detect_format(checkpoint) == fmt
    target = create_model("resnet18_small", 10, 3, 32)
    head, _ = strip_head(target)
    for named in ("auto", fmt):
        assert import_backbone(target, head, to_bytes(checkpoint), "ssl.pt", named) == fmt
        loaded = target.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("fc."))


def test_ssl_checkpoint_mismatch_lists_the_keys():
    checkpoint = in_format("moco_v2", source_backbone("resnet18_small").state_dict())
    target = create_model("convnet", 10, 3, 32)
    head, _ = strip_head(target)
    with pytest.raises(CheckpointError) as info:
        import_backbone(target, head, to_bytes(checkpoint), "ssl.pt")
    message = str(info.value)
    assert "moco_v2 checkpoint ssl.pt for the backbone does not fit" in message
    assert "missing keys: features.0.bias" in message and "unexpected keys: bn1.bias" in message


def test_wrong_named_format_is_refused():
    checkpoint = in_format("dino", source_backbone().state_dict())
    target = create_model("resnet18_small", 10, 3, 32)
    head, _ = strip_head(target)
    with pytest.raises(CheckpointError, match="no backbone weights in the moco_v2 layout"):
        import_backbone(target, head, to_bytes(checkpoint), "ssl.pt", "moco_v2")


@pytest.fixture(scope="module")
def tiny_fmnist(fmnist_root):
    return load_dataset(DatasetSpec(root=str(fmnist_root), classes=[0, 1, 8], train_limit=100, test_limit=TEST_LIMIT),
                        seed=0)


def test_probe_keeps_bn_buffers_bit_identical_and_beats_chance(tiny_fmnist, cpu):
    model = create_model("convnet", 3, 1, 28)
    model.train()
    with torch.no_grad():  # give BN non-default running statistics, as pretraining would
        model(torch.randn(64, 1, 28, 28) * 2 + 1)
    head, _ = strip_head(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_probe(model, tiny_fmnist, ProbeSpec(epochs=20), cpu, 0, SilentProgress())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every buffer and weight, bit for bit
    assert not model.training
    assert result.accuracy.total == 3 * TEST_LIMIT and result.accuracy.top1 > 60  # chance is 33%


def test_folded_probe_equals_probe_on_standardised_features(tiny_fmnist, cpu):
    model = create_model("convnet", 3, 1, 28)
    head, _ = strip_head(model)
    result = train_probe(model, tiny_fmnist, ProbeSpec(epochs=3), cpu, 0, SilentProgress())
    images, labels = tiny_fmnist.test.batch(torch.arange(500))
    with torch.no_grad():
        logits = result.head(model.eval()(images))
    hits = int((logits.argmax(1) == labels).sum())
    assert abs(100 * hits / 500 - result.accuracy.top1) < 5  # same classifier on a sample of the split


def test_moco_loss_decreases_and_key_encoder_moves_by_ema_only(tiny_fmnist, cpu):
    spec = SSLSpec(batch_size=32, queue_size=64, momentum=0.99, lr=0.05, bn_groups=2)
    model = create_model("convnet", 3, 1, 28)
    _, dim = strip_head(model)
    moco = MoCo(model, dim, spec)
    assert all(not p.requires_grad for p in moco.encoder_k.parameters())
    optimizer = torch.optim.SGD(moco.encoder_q.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    images, _ = tiny_fmnist.train.batch(torch.arange(32))
    fixed_views = (make_view(images, tiny_fmnist, generator), make_view(images, tiny_fmnist, generator))
    losses = []
    for _ in range(30):
        q_before = [p.detach().clone() for p in moco.encoder_q.parameters()]
        k_before = [p.detach().clone() for p in moco.encoder_k.parameters()]
        loss = moco(*fixed_views, generator)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in moco.encoder_k.parameters())
        optimizer.step()
        for k_old, q_old, k_new in zip(k_before, q_before, moco.encoder_k.parameters()):
            torch.testing.assert_close(k_new.detach(), 0.99 * k_old + 0.01 * q_old)  # EMA of the pre-step query encoder
        losses.append(float(loss.detach()))
    # The first steps replace the queue's random negatives with real keys (64 / 32 = 2 steps), which
    # makes the task harder; from a full queue on, the loss must fall.
    assert losses[-1] < losses[2] - 0.5


def test_moco_pretraining_reports_falling_loss(tiny_fmnist, cpu):
    model = create_model("convnet", 3, 1, 28)
    _, dim = strip_head(model)
    spec = SSLSpec(epochs=3, batch_size=64, queue_size=128)
    facts = pretrain_moco_v2(model, dim, tiny_fmnist, spec, cpu, 0, SilentProgress())
    losses = facts["epoch_losses"]
    # An encoder that cannot tell its positive key from 128 queued negatives scores ln(129) = 4.86.
    assert facts["method"] == "moco_v2" and len(losses) == 3 and losses[-1] < math.log(129) - 0.1
