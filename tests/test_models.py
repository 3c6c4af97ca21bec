import io

import pytest
import torch

from api_schema import MODELS as SPEC_MODELS
from scdd.errors import CheckpointError, UnknownNameError
from scdd.models import MODELS, checkpoint_bytes, create_model, load_weights
from scdd.recover.bn_loss import bn_layers


@pytest.mark.parametrize("name", sorted(SPEC_MODELS))
def test_every_registered_model_builds_and_runs(name):
    size = 64 if name in ("resnet18", "resnet50", "mobilenet_v2") else 28
    model = create_model(name, num_classes=7, in_channels=1, image_size=size).eval()
    assert model(torch.randn(2, 1, size, size)).shape == (2, 7)


def test_small_resnet_has_3x3_stem_and_no_maxpool():
    model = create_model("resnet18_small", 10, 3, 32)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)


def test_convnet_norms_and_shape():
    bn = create_model("convnet", 10, 1, 28)
    inorm = create_model("convnet_in", 10, 1, 28)
    assert len(bn_layers(bn)) == 3 and len(bn_layers(inorm)) == 0
    assert sum(isinstance(m, torch.nn.GroupNorm) and m.num_groups == 128 for m in inorm.modules()) == 3
    assert bn.classifier.in_features == 128 * 3 * 3


def test_unknown_model_lists_the_choices():
    with pytest.raises(UnknownNameError, match="unknown model 'vgg11'; choose one of: convnet"):
        create_model("vgg11", 10)


def raw(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module_prefix", "ours"])
def test_checkpoint_formats_load(wrap):
    source = create_model("convnet", 4, 1, 28)
    state = source.state_dict()
    data = {
        "plain": lambda: raw(state),
        "state_dict": lambda: raw({"state_dict": state, "epoch": 3}),
        "module_prefix": lambda: raw({"state_dict": {f"module.{k}": v for k, v in state.items()}}),
        "ours": lambda: checkpoint_bytes(source, arch="convnet"),
    }[wrap]()
    target = create_model("convnet", 4, 1, 28)
    load_weights(target, data, "ckpt.pt")
    assert all(torch.equal(target.state_dict()[k], v) for k, v in state.items())


def test_checkpoint_mismatch_lists_keys():
    data = raw(create_model("convnet", 4, 1, 28).state_dict())
    with pytest.raises(CheckpointError) as info:
        load_weights(create_model("resnet18_small", 4, 1, 28), data, "teacher.pt")
    message = str(info.value)
    assert "missing keys: bn1.bias" in message and "unexpected keys: classifier.bias" in message


def test_checkpoint_shape_mismatch_is_named():
    data = raw(create_model("convnet", 4, 1, 28).state_dict())
    with pytest.raises(CheckpointError, match=r"classifier.weight \(checkpoint \(4, 1152\), model \(10, 1152\)\)"):
        load_weights(create_model("convnet", 10, 1, 28), data, "teacher.pt")


def test_garbage_checkpoint_is_refused():
    with pytest.raises(CheckpointError, match="cannot read checkpoint junk.pt"):
        load_weights(create_model("convnet", 4, 1, 28), b"\x00garbage", "junk.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_weights(create_model("convnet", 4, 1, 28), raw([1, 2]), "list.pt")


def test_spec_model_names_equal_registry():
    assert set(SPEC_MODELS) == set(MODELS.names())


def test_the_spec_knows_which_models_lack_batchnorm():
    from api_schema.names import MODELS_WITHOUT_BATCHNORM

    without = {name for name in MODELS.names()
               if not bn_layers(create_model(name, 4, 1, 64 if name in ("resnet18", "resnet50", "mobilenet_v2") else 28))}
    assert without == set(MODELS_WITHOUT_BATCHNORM)


def test_wrn16_2_shape():
    model = create_model("wrn16_2", 10, 3, 32)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len([c for c in convs if c.kernel_size == (3, 3)]) == 13  # stem + 6 blocks x 2: depth 16 with the fc and 2 shortcuts
    assert model.fc.in_features == 128 and 0.6e6 < sum(p.numel() for p in model.parameters()) < 0.8e6
