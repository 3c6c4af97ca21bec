"""Checkpoints users have (MoCo linear eval, torchvision's reference script, bare state dicts, scdd's own), loaded
through the functions the pipeline uses, and the one-line refusals; the models the papers evaluate."""

import argparse
import pathlib
from types import SimpleNamespace

import pytest
import torch

import scdd_cli
from api_schema import JobSpec
from scdd.data.base import DatasetInfo
from scdd.errors import CheckpointError
from scdd.models import create_model
from scdd.runtime import Runtime
from scdd.squeeze.ssl import import_backbone
from scdd.squeeze.teachers import Teacher, TeacherCache, recovery_teacher, relabel_teacher, shape_metadata

CPU = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)
FMNIST = dict(mean=(0.2860,), std=(0.3530,))


def data_of(classes: int = 3, channels: int = 1, size: int = 28, mean=FMNIST["mean"], std=FMNIST["std"]):
    """What the teacher loaders read of a dataset: its info."""
    names = tuple(f"c{i}" for i in range(classes))
    return SimpleNamespace(info=DatasetInfo("tiny", names, names, tuple(range(classes)), channels, size, mean, std))


def save(path: pathlib.Path, obj) -> str:
    torch.save(obj, path)
    return str(path)


def model_of(arch: str, classes: int = 3, channels: int = 1, size: int = 28):
    torch.manual_seed(0)
    return create_model(arch, classes, channels, size).eval()


def same_outputs(a, b, channels: int = 1, size: int = 28) -> bool:
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def teacher_from(path: str, **teacher) -> Teacher:
    spec = JobSpec.model_validate({"method": "sre2l", "teacher": {"checkpoint": path, **teacher}})
    return recovery_teacher(spec, data_of(), TeacherCache(None), CPU, None)


def relabel_from(path: str, tmp_path, **validate) -> Teacher:
    spec = JobSpec.model_validate({"method": "sre2l", "validate": {
        "relabel_teacher": "supervised", "relabel_checkpoint": path, **validate}})
    recovery = Teacher(model_of("convnet"), "trained", "d")
    return relabel_teacher(spec, data_of(), recovery, TeacherCache(str(tmp_path / "cache")), CPU, None)


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_a_moco_linear_eval_checkpoint_loads_into_the_architecture_it_names(tmp_path):
    source = model_of("shufflenet_v2")  # torchvision's name is shufflenet_v2_x1_0
    path = save(tmp_path / "lincls.pth.tar", {
        "epoch": 100, "arch": "shufflenet_v2_x1_0", "best_acc1": torch.tensor(71.3),
        "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}})
    teacher = teacher_from(path)  # teacher.arch stays convnet: the file names its model
    assert teacher.details["arch"] == "shufflenet_v2" and same_outputs(teacher.model, source)


def test_a_torchvision_reference_checkpoint_is_read_with_its_namespace(tmp_path):
    source = model_of("mobilenet_v2")
    args = argparse.Namespace(model="mobilenet_v2", lr=0.5, epochs=600, data_path="/data/imagenet", amp=True,
                              weights=None, lr_steps=[16, 22], label_smoothing=0.1)
    path = save(tmp_path / "model_599.pth", {
        "model": source.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {"last_epoch": 3},
        "epoch": 599, "args": args, "model_ema": {"n_averaged": torch.tensor(5)}, "scaler": {"scale": 65536.0}})
    teacher = teacher_from(path)
    assert teacher.details["arch"] == "mobilenet_v2" and same_outputs(teacher.model, source)
    backbone = model_of("mobilenet_v2")  # the same file as a self-supervised import (the head is dropped)
    backbone.classifier[1] = torch.nn.Identity()
    assert import_backbone(backbone, "classifier.1", (tmp_path / "model_599.pth").read_bytes(), path) == "torchvision"


def test_a_bare_state_dict_loads_into_teacher_arch_and_the_relabel_checkpoint_into_relabel_arch(tmp_path):
    source = model_of("convnet_d2_w32")
    bare = save(tmp_path / "bare.pt", source.state_dict())
    assert same_outputs(teacher_from(bare, arch="convnet_d2_w32").model, source)
    relabel = relabel_from(bare, tmp_path, relabel_arch="convnet_d2_w32")  # teacher.arch stays convnet
    assert relabel.details["arch"] == "convnet_d2_w32" and same_outputs(relabel.model, source)
    # relabel_arch, given, wins over the file's name where its weights fit (a CIFAR MobileNetV2 saved as mobilenet_v2)
    cifar = model_of("mobilenet_v2_small")
    named = save(tmp_path / "cifar.pth",
                 {"model": cifar.state_dict(), "args": argparse.Namespace(model="mobilenet_v2")})
    assert relabel_from(named, tmp_path, relabel_arch="mobilenet_v2_small").details["arch"] == "mobilenet_v2_small"


def test_scdd_checkpoints_record_normalisation_and_a_different_one_is_refused(tmp_path):
    source = model_of("convnet")
    cache = TeacherCache(str(tmp_path))
    cache.save("d1", source, {}, data_of().info)
    meta = torch.load(tmp_path / "d1.pt", weights_only=True)
    assert meta["mean"] == pytest.approx([0.2860]) and meta["std"] == pytest.approx([0.3530])
    assert same_outputs(teacher_from(str(tmp_path / "d1.pt")).model, source)
    spec = JobSpec.model_validate({"method": "sre2l", "teacher": {"checkpoint": str(tmp_path / "d1.pt")}})
    with pytest.raises(CheckpointError) as info:
        recovery_teacher(spec, data_of(mean=(0.5,), std=(0.5,)), cache, CPU, None)
    assert ("mean [0.2860], std [0.3530], but this job normalises by mean [0.5000], std [0.5000]: set "
            "dataset.normalization: given with dataset.mean [0.2860] and dataset.std [0.3530]") in one_line(info)
    older = {k: v for k, v in meta.items() if k not in ("mean", "std")}  # before the keys: loads as before
    assert same_outputs(recovery_teacher(spec.model_copy(update={"teacher": spec.teacher.model_copy(update={
        "checkpoint": save(tmp_path / "old.pt", older)})}), data_of(mean=(0.5,), std=(0.5,)), cache, CPU, None).model,
        source)
    assert set(shape_metadata(data_of().info)) == {"num_classes", "in_channels", "image_size", "mean", "std"}


class NotAllowed:
    pass


def refused(tmp_path, obj, **teacher) -> str:
    with pytest.raises(CheckpointError) as info:
        teacher_from(save(tmp_path / "bad.pt", obj), **teacher)
    return one_line(info)


def test_refused_files_give_one_line_naming_what_was_found(tmp_path):
    state = model_of("convnet").state_dict()
    assert "holds a pickled tests.test_checkpoint_formats.NotAllowed object" in refused(tmp_path, {"x": NotAllowed()})
    assert "holds a pickled pathlib.PosixPath object" in refused(
        tmp_path, {"model": state, "args": argparse.Namespace(model="convnet", output_dir=pathlib.Path("/out"))})
    vit = refused(tmp_path, {"arch": "vit_small", "state_dict": {"module.cls_token": torch.zeros(1, 1, 8)}})
    assert "names the architecture 'vit_small', which the model registry does not hold" in vit
    assert "set teacher.arch (--teacher-arch) to the registry model it is (one of: convnet," in vit
    classes = refused(tmp_path, {"arch": "convnet", "state_dict": model_of("convnet", classes=10).state_dict()})
    assert "classifier.weight (checkpoint (10, 1152), model (3, 1152))" in classes and "named by the file" in classes
    assert "holds no tensors (its top-level keys: epoch, optimizer)" in refused(tmp_path, {"epoch": 3, "optimizer": {}})
    moco = refused(tmp_path, {"state_dict": {f"module.encoder_q.{k}": v for k, v in state.items()}})
    assert "unexpected keys: encoder_q." in moco and "goes in teacher.ssl.checkpoint" in moco
    with pytest.raises(CheckpointError) as info:
        relabel_from(save(tmp_path / "vit.pt", {"arch": "vit_small", "state_dict": {"cls_token": torch.zeros(1)}}),
                     tmp_path)
    assert "(teacher.arch, as validate.relabel_arch (--relabel-arch) is unset) either; set validate.relabel_arch" \
        in one_line(info)


def test_distill_with_a_refused_checkpoint_exits_2_with_one_line(tmp_path, fmnist_root, capsys):
    bad = save(tmp_path / "lincls.pth.tar", {"arch": "vit_small", "state_dict": {"module.cls_token": torch.zeros(1)}})
    code = scdd_cli.main(["distill", "--quiet", "--data-dir", str(fmnist_root), "--classes", "0,1",
                          "--train-limit", "4", "--test-limit", "2", "--method", "sre2l", "--teacher-checkpoint", bad,
                          "--device", "cpu", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("scdd: error: ") and "'vit_small'" in err[0]
    # a file torch cannot read, and one that is not there: named, exit 2
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    for checkpoint, said in ((junk, f"cannot read checkpoint {junk}"), (tmp_path / "none.pt", "none.pt does not exist")):
        code = scdd_cli.main(["distill", "--quiet", "--data-dir", str(fmnist_root), "--teacher-checkpoint",
                              str(checkpoint), "--out", str(tmp_path / checkpoint.stem)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and said in err[0]


@pytest.mark.parametrize("name", ["resnet101", "densenet121", "mobilenet_v2_small", "efficientnet_b0",
                                  "shufflenet_v2", "regnet_y_400mf"])
def test_the_papers_models_run_at_28_px_grey_and_32_px_colour(name):
    for channels, size in ((1, 28), (3, 32)):
        model = create_model(name, 5, channels, size).eval()
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        with torch.no_grad():
            assert model(torch.randn(2, channels, size, size)).shape == (2, 5)
