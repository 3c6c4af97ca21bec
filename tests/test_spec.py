import pytest
from pydantic import ValidationError

from api_schema import DATASETS, METHODS, SSL_METHODS, JobSpec
from scdd.config import build_spec
from scdd.data import DATASETS as DATA_REGISTRY
from scdd.errors import SpecError
from scdd.squeeze import METHODS as METHOD_REGISTRY
from scdd.squeeze.ssl import SSL_METHODS as SSL_REGISTRY


def test_spec_names_equal_registries():
    assert set(DATASETS) == set(DATA_REGISTRY.names())
    assert set(METHODS) == set(METHOD_REGISTRY.names())
    assert set(SSL_METHODS) == set(SSL_REGISTRY.names())


def test_defaults_describe_the_fashion_mnist_demo():
    spec = JobSpec()
    assert (spec.dataset.name, spec.method, spec.recover.first_bn_multiplier) == ("fashion-mnist", "scdd", 10.0)
    assert (spec.validate_.mode, spec.validate_.relabel_teacher, spec.validate_.baseline) == ("kd", "recover", True)


@pytest.mark.parametrize(
    "data, where",
    [
        ({"recover": {"ipc": 0}}, "recover.ipc"),
        ({"recover": {"colour": 1}}, "recover.colour"),
        ({"bogus": True}, "bogus"),
        ({"teacher": {"arch": "vgg11"}}, "teacher.arch"),
        ({"method": "dc"}, "method"),
        ({"recover": {"augment": {"crop_scale": [0.9, 0.1]}}}, "recover.augment.crop_scale"),
        ({"resources": {"device": "tpu"}}, "resources.device"),
        ({"dataset": {"name": "imagefolder"}}, "dataset.root is required"),
        ({"dataset": {"name": "imagefolder", "root": "s3://bucket/imagenet"}}, "dataset.root 's3://bucket/imagenet' is a URL"),
        ({"validate": {"relabel_checkpoint": "t.pt"}}, "validate.relabel_checkpoint is used only with"),
    ],
)
def test_bad_spec_names_the_field(data, where):
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(data)
    assert where.split(" ")[0].split(".")[-1] in str(info.value)
    with pytest.raises(SpecError, match=where.replace(".", r"\.").split(" ")[0]):
        build_spec(overrides={k: v for k, v in _flatten(data)})


def _flatten(data, prefix=""):
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_yaml_config_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("recover:\n  ipc: 5\n  iterations: 20\nseed: 3\n")
    spec = build_spec(path, {"recover.ipc": 2})
    assert (spec.recover.ipc, spec.recover.iterations, spec.seed) == (2, 20, 3)


def test_bad_yaml_is_named(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("recover: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        build_spec(path)
    with pytest.raises(SpecError, match="does not exist"):
        build_spec(tmp_path / "missing.yaml")


def test_digest_tracks_what_determines_the_images():
    base = JobSpec()
    assert base.recover_digest() == JobSpec().recover_digest()
    assert base.recover_digest() != JobSpec.model_validate({"recover": {"lr": 0.1}}).recover_digest()
    assert base.teacher_digest() == JobSpec.model_validate({"recover": {"lr": 0.1}}).teacher_digest()
    # sre2l's teacher is the supervised teacher; scdd shares it as its relabel teacher.
    sre2l, ssl_change = JobSpec(method="sre2l"), JobSpec.model_validate({"teacher": {"ssl": {"epochs": 9}}})
    assert sre2l.teacher_digest() == base.supervised_teacher_digest() == ssl_change.supervised_teacher_digest()
    assert ssl_change.teacher_digest() != base.teacher_digest()
    assert base.recover_digest() == JobSpec.model_validate({"output": {"url": "/x"}}).recover_digest()
