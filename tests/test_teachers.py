"""Where soft labels come from: a relabel checkpoint of another architecture than the recovery teacher's."""

import pytest
import torch

from api_schema import JobSpec
from scdd.data import load_dataset
from scdd.errors import CheckpointError
from scdd.models import checkpoint_bytes, create_model
from scdd.runtime import Runtime
from scdd.squeeze.teachers import Teacher, TeacherCache, relabel_teacher

CPU = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)


def saved(path, arch: str, classes: int) -> str:
    torch.manual_seed(0)
    model = create_model(arch, classes, 1, 28)
    path.write_bytes(checkpoint_bytes(model, arch=arch, num_classes=classes, in_channels=1, image_size=28))
    return str(path)


def spec_with(checkpoint: str, root) -> JobSpec:
    return JobSpec.model_validate({"method": "sre2l", "dataset": {"root": str(root), "classes": [0, 1, 2], "train_limit": 5},
                                   "validate": {"relabel_teacher": "supervised", "relabel_checkpoint": checkpoint}})


def test_a_relabel_checkpoint_of_another_architecture_gives_the_soft_labels(tmp_path, fmnist_root):
    data = load_dataset(spec_with("x", fmnist_root).dataset, seed=0)
    recovery = Teacher(create_model("convnet", 3, 1, 28).eval(), "trained", "d")
    path = saved(tmp_path / "resnet.pt", "resnet18_small", 3)
    teacher = relabel_teacher(spec_with(path, fmnist_root), data, recovery, TeacherCache(str(tmp_path / "c")), CPU, None)
    reference = create_model("resnet18_small", 3, 1, 28)
    reference.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    images = data.train.images[:4].float() / 255
    assert type(teacher.model).__name__ == type(reference).__name__ and teacher.details["arch"] == "resnet18_small"
    assert torch.equal(teacher.model(images), reference.eval()(images))


def test_a_relabel_checkpoint_for_other_classes_is_refused_with_the_fix(tmp_path, fmnist_root):
    data = load_dataset(spec_with("x", fmnist_root).dataset, seed=0)
    recovery = Teacher(create_model("convnet", 3, 1, 28).eval(), "trained", "d")
    path = saved(tmp_path / "ten.pt", "convnet", 10)
    with pytest.raises(CheckpointError, match="10 classes.*the dataset has 3 classes.*trained on this dataset"):
        relabel_teacher(spec_with(path, fmnist_root), data, recovery, TeacherCache(str(tmp_path / "c")), CPU, None)
