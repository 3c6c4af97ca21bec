"""G-VBSM (arXiv 2311.17950): the convolution-statistic loss against an independent computation, the EMA of
batch statistics, the rotation of backbones, the ensemble and its checkpoint, ensemble relabel, and the
errors a bad ensemble member gives."""

from __future__ import annotations


import pytest
import torch

from api_schema import JobSpec, RecoverSpec
from scdd.errors import CheckpointError, SpecError
from scdd.models import Ensemble, checkpoint_bytes, create_model, model_from_checkpoint, model_metadata
from scdd.models.ensemble import ConvStatistics, conv_layers
from scdd.recover import ConvStatLoss, RecoverObjective, synthesize
from scdd.runtime import Runtime
from scdd_cli import main as scdd_main

CPU = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)


def frozen(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(name, num_classes=4, in_channels=1, image_size=16)
    generator = torch.Generator().manual_seed(seed + 100)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.3)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval().requires_grad_(False)


def random_statistics(model: torch.nn.Module, seed: int) -> ConvStatistics:
    stats = ConvStatistics(model)
    generator = torch.Generator().manual_seed(seed)
    for i in range(stats.count):
        mean, var = stats.target(i)
        mean.copy_(torch.randn(mean.shape, generator=generator) * 0.2)
        var.copy_(torch.rand(var.shape, generator=generator) + 0.3)
    return stats


def convnet_conv_inputs(model, x):
    """The input of each convolution of a ConvNet, by running its blocks by hand (not through hooks)."""
    inputs, h = [], x
    for module in model.features:
        if isinstance(module, torch.nn.Conv2d):
            inputs.append(h)
        h = module(h)
    return inputs


def by_hand(inputs, stats, first=10.0):
    total = 0.0
    for i, h in enumerate(inputs):
        channels = h.shape[1]
        flat = h.transpose(0, 1).reshape(channels, -1)  # G-VBSM's way: (C, N*H*W), biased variance
        mean, var = flat.mean(1), flat.var(1, unbiased=False)
        t_mean, t_var = stats.target(i)
        term = torch.sqrt(((mean - t_mean) ** 2).sum()) + torch.sqrt(((var - t_var) ** 2).sum())
        total = total + (first if i == 0 else 1.0) * term
    return total


def test_conv_stat_loss_equals_an_independent_computation_in_value_and_input_gradient():
    model = frozen("convnet_d2_w32", 0)
    stats = random_statistics(model, 1)
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    with ConvStatLoss(model, stats, first_multiplier=10.0) as loss_fn:
        model(x)
        loss = loss_fn.loss()
    (grad,) = torch.autograd.grad(loss, x)
    x2 = x.detach().clone().requires_grad_(True)
    want = by_hand(convnet_conv_inputs(model, x2), stats)
    (want_grad,) = torch.autograd.grad(want, x2)
    assert len(conv_layers(model)) == 2
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-7)
    assert want_grad.abs().max() > 1e-4


def test_ema_smoothing_has_the_averages_value_and_the_steps_gradient():
    model = frozen("convnet_d1_w32", 3)
    stats = random_statistics(model, 4)
    generator = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(5, 1, 16, 16, generator=generator), torch.randn(5, 1, 16, 16, generator=generator) + 0.7
    x2.requires_grad_(True)
    with ConvStatLoss(model, stats, first_multiplier=1.0, momentum=0.8) as loss_fn:
        model(x1)
        first = loss_fn.loss()
        model(x2)
        second = loss_fn.loss()
        loss_fn.reset()
        model(x2)
        after_reset = loss_fn.loss()
    (grad,) = torch.autograd.grad(second, x2)
    # Independently: the statistics of each batch, the average 0.8 * s1 + 0.2 * s2, compared with the targets;
    # the gradient is that of comparing (average + s2 - stop_grad(s2)).
    t_mean, t_var = stats.target(0)
    s1 = (x1.mean((0, 2, 3)), x1.var((0, 2, 3), unbiased=False))
    x = x2.detach().clone().requires_grad_(True)
    s2 = (x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False))
    avg = [0.8 * a + 0.2 * b.detach() for a, b in zip(s1, s2)]
    smoothed = [a + b - b.detach() for a, b in zip(avg, s2)]
    want = torch.linalg.vector_norm(smoothed[0] - t_mean) + torch.linalg.vector_norm(smoothed[1] - t_var)
    (want_grad,) = torch.autograd.grad(want, x)
    plain = torch.linalg.vector_norm(s2[0] - t_mean) + torch.linalg.vector_norm(s2[1] - t_var)
    assert float(first) == pytest.approx(float(torch.linalg.vector_norm(s1[0] - t_mean) + torch.linalg.vector_norm(s1[1] - t_var)), rel=1e-5)
    assert float(second) == pytest.approx(float(want), rel=1e-5)
    assert float(second) != pytest.approx(float(plain), rel=1e-3)  # the average is not this step's statistics
    assert float(after_reset) == pytest.approx(float(plain), rel=1e-5)  # reset: a new batch starts its own average
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-7)


def small_ensemble(conv_statistics: bool = True) -> Ensemble:
    archs = ["convnet_d1_w32", "convnet_d2_w32", "convnet"]
    members = [frozen(a, 10 + i) for i, a in enumerate(archs)]
    ensemble = Ensemble(members, archs, conv_statistics=conv_statistics)
    if conv_statistics:
        for i, (member, stats) in enumerate(zip(ensemble.members, ensemble.conv_statistics)):
            stats.load_state_dict(random_statistics(member, 20 + i).state_dict())
    return ensemble.eval().requires_grad_(False)


def test_backbones_rotate_one_per_iteration_and_restart_with_each_batch():
    ensemble = small_ensemble()
    ran: list[int] = []
    for index, member in enumerate(ensemble.members):
        member.register_forward_pre_hook(lambda _m, _i, index=index: ran.append(index))
    spec = RecoverSpec(init="noise", iterations=7, r_bn=0.01, stat_momentum=0.8)
    bounds = (torch.full((1,), -3.0), torch.full((1,), 3.0))
    with RecoverObjective(ensemble, 10.0, momentum=0.8) as objective:
        assert objective.statistics == ["batchnorm", "convolution"]
        for seed in (0, 1):
            synthesize(list(ensemble.members), torch.tensor([0, 1, 2]), spec, bounds, (1, 16, 16), CPU,
                       torch.Generator().manual_seed(seed), objective)
    assert ran == [0, 1, 2, 0, 1, 2, 0] * 2


def test_the_ensemble_gives_its_members_mean_logits_and_survives_its_checkpoint():
    ensemble = small_ensemble()
    x = torch.randn(3, 1, 16, 16)
    want = torch.stack([m(x) for m in ensemble.members]).mean(0)
    torch.testing.assert_close(ensemble(x), want)
    raw = checkpoint_bytes(ensemble, **model_metadata(ensemble), num_classes=4, in_channels=1, image_size=16)
    loaded, meta = model_from_checkpoint(raw, "ensemble.pt")
    assert meta["members"] == ["convnet_d1_w32", "convnet_d2_w32", "convnet"] and meta["conv_statistics"]
    torch.testing.assert_close(loaded.eval()(x), want)
    torch.testing.assert_close(loaded.conv_statistics[2].target(1)[1], ensemble.conv_statistics[2].target(1)[1])


def tiny_spec(tmp_path, **validate) -> JobSpec:
    return JobSpec.model_validate({"method": "sre2l", "dataset": {"classes": [0, 1, 2, 3], "train_limit": 20,
                                                                  "test_limit": 5, "image_size": 16},
                                   "validate": validate, "output": {"url": str(tmp_path / "out")}})


def save_teacher_file(path, arch: str, seed: int) -> torch.nn.Module:
    model = frozen(arch, seed)
    path.write_bytes(checkpoint_bytes(model, **model_metadata(model), num_classes=4, in_channels=1, image_size=16))
    return model


def test_ensemble_relabel_from_listed_checkpoints_gives_their_mean_logits(tmp_path):
    from scdd.data import load_dataset
    from scdd.squeeze.teachers import relabel_teacher

    a = save_teacher_file(tmp_path / "a.pt", "convnet", 30)
    b = save_teacher_file(tmp_path / "b.pt", "wrn16_2", 31)
    spec = tiny_spec(tmp_path, relabel_teacher="ensemble",
                     relabel_checkpoints=[str(tmp_path / "a.pt"), str(tmp_path / "b.pt")])
    data = load_dataset(spec.dataset, spec.seed)
    teacher = relabel_teacher(spec, data, None, None, CPU, None)
    x = torch.randn(4, 1, 16, 16)
    assert teacher.model.archs == ["convnet", "wrn16_2"]
    torch.testing.assert_close(teacher.model(x), (a(x) + b(x)) / 2)

    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    spec = tiny_spec(tmp_path, relabel_teacher="ensemble",
                     relabel_checkpoints=[str(tmp_path / "a.pt"), str(tmp_path / "broken.pt")])
    with pytest.raises(CheckpointError, match=r"^relabel ensemble member 2: cannot read checkpoint .*broken\.pt") as info:
        relabel_teacher(spec, data, None, None, CPU, None)
    assert "\n" not in str(info.value)


def test_a_backbone_without_batchnorm_is_refused_in_one_line():
    members = [frozen("convnet", 1), create_model("convnet_in", 4, 1, 16).eval()]
    with pytest.raises(SpecError, match=r"ensemble member 2 \(convnet_in\) has no BatchNorm2d layer"):
        RecoverObjective(Ensemble(members, ["convnet", "convnet_in"]))


def test_the_command_line_refuses_a_bad_ensemble_member_with_exit_2(tmp_path, capsys):
    def distill(*flags):  # in this process: the same parser, handler and exit status as the console script
        code = scdd_main(["distill", "--method", "gvbsm", *flags, "--out", str(tmp_path / "out")])
        return code, capsys.readouterr().err

    code, err = distill("--ensemble", "convnet,convnet_in")
    assert code == 2 and "convnet_in has no BatchNorm layer" in err and "Traceback" not in err
    (tmp_path / "broken.pt").write_bytes(b"junk")
    code, err = distill("--relabel-teacher", "ensemble", "--relabel-checkpoints", str(tmp_path / "broken.pt"),
                        "--classes", "0,1", "--train-limit", "10", "--test-limit", "2", "--image-size", "16",
                        "--teacher-epochs", "1", "--ensemble", "convnet_d1_w32", "--ipc", "1", "--iterations", "1",
                        "--init", "noise", "--validate-epochs", "1", "--quiet")
    assert code == 2, err[-2000:]
    assert "relabel ensemble member 1: cannot read checkpoint" in err and "Traceback" not in err


def test_a_gvbsm_run_reports_its_members_and_statistics_and_caches_each_member(tmp_path, fmnist_root):
    from scdd.layout import TEACHER_PATH
    from scdd.pipeline import run_distillation
    from tests.conftest import tiny_job

    cache = tmp_path / "cache"
    spec = tiny_job(fmnist_root, tmp_path / "run", method="gvbsm", recover={"ipc": 1, "iterations": 4},
                    validate={"enabled": True, "epochs": 1, "baseline": False},
                    output={"url": str(tmp_path / "run"), "teacher_cache": str(cache)})
    spec["teacher"]["ensemble"] = ["convnet_d1_w32", "convnet_d2_w32"]
    report = run_distillation(JobSpec.model_validate(spec))
    teacher, recover = report.teacher, report.recover
    assert teacher.arch == "ensemble" and [m.arch for m in teacher.members] == ["convnet_d1_w32", "convnet_d2_w32"]
    assert all(0 <= m.top1 <= 100 for m in teacher.members) and teacher.top1 is not None
    assert recover.statistics == ["batchnorm", "convolution"] and recover.stat_momentum == 0.8 and recover.backbones == 2
    assert report.validate_.relabel_teacher.source == "trained"  # the ensemble itself gives the soft labels
    # Saved with its statistics: the workers of a distributed run rebuild it from teacher.pt.
    saved, meta = model_from_checkpoint((tmp_path / "run" / TEACHER_PATH).read_bytes(), "teacher.pt")
    assert isinstance(saved, Ensemble) and meta["members"] == ["convnet_d1_w32", "convnet_d2_w32"]
    assert float(saved.conv_statistics[1].target(1)[1].mean()) > 0  # a real variance, not the placeholder 1
    assert not torch.equal(saved.conv_statistics[1].target(1)[1], torch.ones_like(saved.conv_statistics[1].target(1)[1]))
    assert len(list(cache.glob("*.pt"))) == 3  # each member, and the ensemble
    spec["recover"]["ipc"] = 2
    again = run_distillation(JobSpec.model_validate({**spec, "output": {"url": str(tmp_path / "run2"),
                                                                         "teacher_cache": str(cache)}}))
    assert again.teacher.source == "cached"
