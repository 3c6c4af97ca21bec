"""The training loops' resume state (what Ray Train checkpoints, workers/train.py) holds only tensors and
plain containers, so a resume loads it with torch.load(weights_only=True): no pickled code runs."""

import io

import torch

from api_schema import DatasetSpec, SSLSpec, TeacherSpec, ValidateSpec
from scdd.data import load_dataset
from scdd.models import create_model, strip_head
from scdd.progress import SilentProgress
from scdd.shard import TrainHooks
from scdd.squeeze import train_supervised
from scdd.squeeze.ssl.moco import pretrain_moco_v2
from scdd.validate import random_real_subset, resolve_protocol, train_student


def through_a_safe_load(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def states_of(run) -> list[dict]:
    """Each epoch's state, saved and loaded back at once (it holds the live tensors, as Ray Train's checkpoint)."""
    states: list[dict] = []
    run(TrainHooks(on_epoch_end=lambda end: states.append(through_a_safe_load(end.state))))
    return states


def test_every_loop_resumes_from_a_weights_only_load(fmnist_root, cpu):
    data = load_dataset(DatasetSpec(root=str(fmnist_root), classes=[0, 1], train_limit=24, test_limit=10), seed=0)
    progress = SilentProgress()

    def supervised(hooks):
        torch.manual_seed(0)
        return train_supervised(create_model("convnet", 2, 1, 28), data, TeacherSpec(epochs=2, batch_size=16), cpu,
                                0, progress, hooks)

    def moco(hooks):
        torch.manual_seed(0)
        backbone = create_model("convnet", 2, 1, 28)
        _, features = strip_head(backbone)
        pretrain_moco_v2(backbone, features, data, SSLSpec(epochs=2, batch_size=16, queue_size=32), cpu, 0, progress,
                         hooks)
        return backbone

    teacher = supervised(TrainHooks()).eval().requires_grad_(False)
    images = random_real_subset(data.train, 2, 2, seed=0)
    protocol = resolve_protocol(ValidateSpec(preset="long", epochs=2), len(images))  # with the weights' EMA

    def student(hooks):
        torch.manual_seed(0)
        return train_student(create_model("convnet", 2, 1, 28), images, protocol, teacher, cpu, 0, progress,
                             hooks=hooks)

    for run in (supervised, moco, student):
        states = states_of(run)
        assert len(states) == 2
        resumed = run(TrainHooks(resume=states[0], on_epoch_end=lambda end: None))
        straight = run(TrainHooks())
        for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()):
            torch.testing.assert_close(a, b, msg=run.__name__)  # resuming after epoch 1 ends where the straight run does
