import pytest
import torch
from torch import nn

from scdd.recover.bn_loss import BNStatLoss, bn_layers
from scdd.recover.scope import local_batch_stats
from tests.conftest import tiny_teacher


def reference_layer_losses(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Independent computation: capture each BN input, permute-and-copy variance, as the SRe2L code."""
    captured = []
    handles = [m.register_forward_hook(lambda m, i, o: captured.append((m, i[0]))) for m in bn_layers(model)]
    model(x)
    for h in handles:
        h.remove()
    losses = []
    for module, inp in captured:
        c = inp.shape[1]
        flat = inp.permute(1, 0, 2, 3).contiguous().reshape(c, -1)
        mean, var = flat.mean(1), flat.var(1, unbiased=False)
        losses.append(torch.norm(module.running_mean - mean, 2) + torch.norm(module.running_var - var, 2))
    return losses


def test_bn_loss_equals_formula_with_first_layer_multiplier():
    model = tiny_teacher()
    x = torch.randn(5, 1, 12, 12)
    expected = reference_layer_losses(model, x)
    with BNStatLoss(model, first_bn_multiplier=10.0) as bn:
        model(x)
        layers = bn.layer_losses()
        model(x)
        total = bn.loss()
    assert len(layers) == len(expected) == 2
    for got, want in zip(layers, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, 10.0 * expected[0] + expected[1], rtol=1e-5, atol=1e-6)


def test_batch_stats_are_biased_and_per_channel():
    x = torch.randn(4, 3, 5, 5) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    mean, var = local_batch_stats(x)
    flat = x.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(mean, flat.mean(1))
    torch.testing.assert_close(var, flat.var(1, unbiased=False))


def test_bn_loss_gradient_matches_reference():
    model = tiny_teacher()
    x1 = torch.randn(4, 1, 12, 12, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    with BNStatLoss(model, 10.0) as bn:
        model(x1)
        bn.loss().backward()
    ref = reference_layer_losses(model, x2)
    (10.0 * ref[0] + ref[1]).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)


def test_hooks_removed_after_use():
    model = tiny_teacher()
    with BNStatLoss(model, 10.0) as bn:
        assert all(len(m._forward_hooks) == 1 for m in bn.layers)
        model(torch.randn(2, 1, 12, 12))
        bn.loss()
    assert all(len(m._forward_hooks) == 0 for m in bn_layers(model))


def test_loss_before_forward_is_an_error():
    model = tiny_teacher()
    with BNStatLoss(model, 10.0) as bn:
        with pytest.raises(RuntimeError, match="before a forward pass"):
            bn.loss()


def test_teacher_without_batchnorm_is_refused():
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        BNStatLoss(nn.Sequential(nn.Conv2d(1, 2, 3)), 10.0)
