from __future__ import annotations

import os
import secrets
import tempfile
import time
from pathlib import Path

import pytest
import torch

from api_schema import ResourcesSpec
from scdd.models.convnet import ConvNet
from scdd.runtime import Runtime

# The tests' Ray head uses token authentication (Ray >= 2.5x turns it on for `ray start`); Ray reads
# this when it is first imported, so it is set before any test module imports ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# ... and a token: a fresh machine has no ~/.ray/auth_token, so the session makes one of its own.
if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
    _token_file = Path(tempfile.mkdtemp(prefix="scdd-ray-token-")) / "auth_token"
    _token_file.write_text(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(_token_file)
# Ray Train's controller polls its workers every 2 s by default, and each ray.train.report waits for a poll: a tiny
# stage spends most of its time waiting. The Ray clusters the tests start inherit this environment and poll every
# 0.25 s (docs/distributed.md, "Training stages", has the measurement).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

# Test images per class the tiny jobs measure accuracies on: every student, baseline and teacher of a job is
# tested, and the whole 3-class test split (3000 images) made that most of a tiny job's time.
TEST_LIMIT = 200
FASHION_MNIST = Path(os.environ.get("SCDD_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


@pytest.fixture(autouse=True)
def _seeded_and_isolated(tmp_path_factory, monkeypatch):
    """Every test starts from the same global RNG state (numeric tolerances are checked once, not
    by luck) and caches teachers in its own folder, never in the user's home."""
    torch.manual_seed(0)
    monkeypatch.setenv("SCDD_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def fmnist_root() -> Path:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"Fashion-MNIST not found at {FASHION_MNIST}: apt-get install dataset-fashion-mnist")
    return FASHION_MNIST


@pytest.fixture
def cpu() -> Runtime:
    """Plain fp32 eager CPU: the reference runtime of the numerical tests."""
    return Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False, compile="off")


def tiny_teacher(seed: int = 0, classes: int = 3, channels: int = 1, size: int = 12, width: int = 8) -> ConvNet:
    """A seeded ConvNet with non-trivial BN running statistics, in eval mode."""
    torch.manual_seed(seed)
    model = ConvNet(classes, channels, size, width=width, depth=2)
    generator = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.3)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


def quick_resources() -> dict:
    """Spec resources for fast, reproducible tests: fp32, eager."""
    return ResourcesSpec(device="cpu", amp="off", channels_last="off", compile="off").model_dump()


@pytest.fixture(scope="session")
def fmnist_teacher_ckpt(tmp_path_factory, fmnist_root) -> Path:
    """A ConvNet teacher trained briefly on 3 Fashion-MNIST classes, saved as a checkpoint."""
    from api_schema import DatasetSpec, TeacherSpec
    from scdd.data import load_dataset
    from scdd.models import checkpoint_bytes, create_model
    from scdd.progress import SilentProgress
    from scdd.squeeze import train_supervised

    data = load_dataset(DatasetSpec(root=str(fmnist_root), classes=[0, 1, 2], train_limit=200), seed=0)
    torch.manual_seed(0)
    model = create_model("convnet", 3, 1, 28)
    runtime = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)
    train_supervised(model, data, TeacherSpec(epochs=2, batch_size=64), runtime, 0, SilentProgress())
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    path.write_bytes(checkpoint_bytes(model))
    return path


def tiny_job(fmnist_root: Path, out: Path, teacher: Path | None = None, **sections) -> dict:
    """A job spec dict on 3 Fashion-MNIST classes with tiny settings; `sections` override parts."""
    spec = {
        "method": "sre2l",
        "dataset": {"root": str(fmnist_root), "classes": [0, 1, 2], "train_limit": 50, "test_limit": TEST_LIMIT},
        "teacher": {"epochs": 1, "batch_size": 64, **({"checkpoint": str(teacher)} if teacher else {})},
        "recover": {"init": "noise", "ipc": 3, "iterations": 6, "batch_size": 2},
        "validate": {"enabled": False},
        "resources": quick_resources(),
        "output": {"url": str(out)},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


@pytest.fixture(scope="session")
def ray_head():
    """A real Ray head on loopback with 2 CPUs (the CI machine's size) and the Jobs API, shared by
    the Ray tests (they connect to it) and the job-service tests (they submit Ray jobs to it)."""
    from tests.services import RayHead

    head = RayHead(cpus=2).start()
    yield head
    head.stop()


@pytest.fixture(scope="session")
def ray_local(ray_head):
    """This test process connected to the shared Ray head."""
    import ray

    ray.init(address=ray_head.gcs, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on loopback (append-only file in the test's folder)."""
    from tests.services import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def cpus_free_soon(ray, seconds: float = 10.0) -> float:
    """Free CPUs once Ray has caught up with released placement groups (it frees them asynchronously)."""
    deadline = time.monotonic() + seconds
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    return ray.available_resources().get("CPU", 0)
