"""Global ("DDP-aware") BatchNorm statistics: two gloo processes holding parts of a batch get the
gradients and the loss of one process holding all of it. The same for G-VBSM's objective: an ensemble
in rotation, BatchNorm plus convolution statistics, EMA-smoothed."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from api_schema import RecoverSpec
from scdd.models import create_model
from scdd.recover import BNStatLoss, GlobalScope, LocalScope, RecoverObjective, recover_loss
from scdd.runtime import Runtime
from tests.test_gvbsm import small_ensemble

SPLITS = [(2, 2), (3, 1), (4, 0)]  # images held by rank 0 and rank 1
SPEC = RecoverSpec(init="noise", r_bn=1.0, first_bn_multiplier=10.0, tv_weight=0.01, l2_weight=0.001)
CPU = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)


def small_resnet() -> torch.nn.Module:
    """resnet18_small (20 BN layers) with non-trivial running statistics, frozen."""
    torch.manual_seed(0)
    model = create_model("resnet18_small", num_classes=4, in_channels=1, image_size=16)
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval().requires_grad_(False)


def full_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(4, 1, 16, 16, generator=generator)
    images[:2] += 1.5  # the two halves differ, so local and global statistics differ
    return images, torch.tensor([0, 1, 2, 3])


def step(model, images, targets, scope, batch_images):
    """One recover-loss evaluation and backward; returns (input grads, loss parts, BN stats)."""
    x = images.clone().requires_grad_(True)
    with BNStatLoss(model, SPEC.first_bn_multiplier, scope) as bn_loss:
        loss = recover_loss(model, x, targets, x, SPEC, CPU, bn_loss, batch_images)
    loss.own.backward()
    grad = x.grad if x.grad is not None else torch.zeros_like(x)
    return grad, loss


def layer_stats(model, images, scope):
    with BNStatLoss(model, 1.0, scope) as bn_loss:
        if len(images):
            model(images)
        return [(m.detach(), v.detach()) for m, v in bn_loss.batch_stats()]


def ensemble_steps(images, targets, scope, batch_images, steps: int = 4):
    """`steps` recover-loss evaluations of G-VBSM's objective (3 backbones in rotation, BN + convolution
    statistics, EMA 0.8) on the same images; each step's input gradients and statistic loss."""
    ensemble = small_ensemble()
    results = []
    with RecoverObjective(ensemble, SPEC.first_bn_multiplier, scope, momentum=0.8) as objective:
        for step_index in range(steps):
            member = ensemble.members[objective.select(step_index)]
            x = (images + 0.1 * step_index).requires_grad_(True)
            loss = recover_loss(member, x, targets, x, SPEC, CPU, objective, batch_images)
            loss.own.backward()
            results.append((x.grad if x.grad is not None else torch.zeros_like(x), float(loss.bn.detach())))
    return results


def worker(rank: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = small_resnet()
    images, targets = full_batch()
    results = {}
    for split in SPLITS:
        start = 0 if rank == 0 else split[0]
        mine = slice(start, start + split[rank])
        scope = GlobalScope()
        batch_images = scope.images(split[rank])
        grad, loss = step(model, images[mine], targets[mine], scope, batch_images)
        value = float(scope.total(loss.own.detach().reshape(1)))
        results[split] = {
            "grad": grad, "own": float(loss.own.detach()), "value": value, "bn": float(loss.bn.detach()), "batch_images": batch_images,
            "global_stats": layer_stats(model, images[mine], GlobalScope()),
            "local_stats": layer_stats(model, images[mine], LocalScope()) if split[rank] else None,
            "ensemble": ensemble_steps(images[mine], targets[mine], GlobalScope(), batch_images),
        }
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    root = tmp_path_factory.mktemp("global_bn")
    mp.spawn(worker, args=(str(root / "rendezvous"), str(root)), nprocs=2, join=True)
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def single():
    model = small_resnet()
    images, targets = full_batch()
    grad, loss = step(model, images, targets, LocalScope(), len(images))
    return {"grad": grad, "value": float(loss.own.detach()), "bn": float(loss.bn.detach()), "stats": layer_stats(model, images, LocalScope()),
            "ensemble": ensemble_steps(images, targets, LocalScope(), len(images))}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))


@pytest.mark.parametrize("split", SPLITS, ids=["2+2", "3+1", "4+0"])
def test_global_bn_gradients_match_single_process(distributed, single, split):
    grads = [distributed[rank][split]["grad"] for rank in range(2)]
    assert [len(g) for g in grads] == list(split)
    combined = torch.cat(grads)
    assert relative_error(combined, single["grad"]) <= 1e-5
    for rank, start in ((0, 0), (1, split[0])):
        if split[rank]:
            want = single["grad"][start:start + split[rank]]
            assert relative_error(grads[rank], want) <= 1e-5
    # Without the 1/W scaling every BN gradient would be doubled: the check above has teeth.
    assert single["grad"].abs().max() > 1e-3


@pytest.mark.parametrize("split", SPLITS, ids=["2+2", "3+1", "4+0"])
def test_global_loss_value_equals_single_process(distributed, single, split):
    for rank in range(2):
        result = distributed[rank][split]
        assert result["batch_images"] == 4
        assert result["value"] == pytest.approx(single["value"], rel=1e-5)
        assert result["bn"] == pytest.approx(single["bn"], rel=1e-5)  # replicated on every worker
    assert sum(distributed[r][split]["own"] for r in range(2)) == pytest.approx(single["value"], rel=1e-5)


def test_global_statistics_are_those_of_the_union_and_local_ones_are_not(distributed, single):
    for rank in range(2):
        result = distributed[rank][(3, 1)]
        local_differs = False
        for (gm, gv), (lm, lv), (sm, sv) in zip(result["global_stats"], result["local_stats"], single["stats"]):
            torch.testing.assert_close(gm.float(), sm, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(gv.float(), sv, rtol=1e-5, atol=1e-5)
            local_differs |= not torch.allclose(lm, sm, rtol=1e-3, atol=1e-3)
        assert local_differs


@pytest.mark.parametrize("split", SPLITS, ids=["2+2", "3+1", "4+0"])
def test_gvbsm_global_statistics_give_each_worker_one_process_gradients(distributed, single, split):
    """BN + convolution statistics of 3 backbones in rotation, smoothed by an EMA: every step's input gradients
    of each worker equal those of one process holding the whole batch, and the statistic loss is replicated."""
    for step_index, (want_grad, want_loss) in enumerate(single["ensemble"]):
        grads = [distributed[rank][split]["ensemble"][step_index][0] for rank in range(2)]
        assert relative_error(torch.cat(grads), want_grad) <= 1e-5
        for rank in range(2):
            assert distributed[rank][split]["ensemble"][step_index][1] == pytest.approx(want_loss, rel=1e-5)
        assert want_grad.abs().max() > 1e-4
