"""The global-statistics path (scdd/recover/scope.py) over a real torch process group: NCCL on a GPU,
gloo on the CPU.

Every rank builds the same synthetic teacher (rank 0's state is broadcast, so they agree exactly) and
the same seeded batch, and holds batch / W of its images. Two checks per run:
- gradients: one recover-loss backward under GlobalScope gives each rank the input gradients that
  one process holding the whole batch gets (LocalScope), to a relative error below GRAD_TOLERANCE
  (fp32, TF32 off for the check);
- rate: `global_iterations` recover steps under GlobalScope (one all-reduce forward, one backward per
  step), fp32 eager, in image-iterations per second of the whole batch.
World size 1 runs in this process; world size 2 in two child processes on the same device (NCCL may
refuse two ranks on one GPU: the part then fails with NCCL's message).
"""

from __future__ import annotations

import multiprocessing
import queue
import tempfile
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from gpu_check_parts.config import CheckConfig
from gpu_check_parts.recover_rate import recover_spec
from gpu_check_parts.report import Row, one_line
from gpu_check_parts.teachers import synthetic_info, synthetic_teacher
from scdd.recover import BNStatLoss, GlobalScope, LocalScope, recover_loss, synthesize
from scdd.recover.scope import sync_bytes_per_step
from scdd.runtime import Runtime

GRAD_TOLERANCE = 1e-4


@contextmanager
def no_tf32() -> Iterator[None]:
    """Full fp32 convolutions on CUDA (TF32 would make two batch splits differ by ~1e-3)."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def nccl_version() -> str:
    try:
        return ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as exc:  # a torch built without NCCL
        return f"unknown ({one_line(exc)})"


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))


def rank_run(rank: int, world: int, cfg: CheckConfig, rendezvous: str, budget_s: float) -> dict[str, Any]:
    """One rank's checks; every rank makes the same collective calls in the same order. A collective
    that waits longer than `budget_s` fails."""
    device = cfg.device
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=budget_s))
    try:
        shape, limits = cfg.imagenet, cfg.limits
        teacher = synthetic_teacher(cfg.student, shape, limits, device, cfg.seed)
        for tensor in teacher.state_dict().values():
            dist.broadcast(tensor, src=0)
        runtime = Runtime(device, None, False, "off")
        image_shape = (3, shape.image_size, shape.image_size)
        images = torch.randn(limits.batch, *image_shape, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
        targets = (torch.arange(limits.batch) % shape.classes).to(device)
        share = slice(rank * limits.batch // world, (rank + 1) * limits.batch // world)
        spec = recover_spec(1, limits.batch)

        with no_tf32():
            mine = images[share].clone().requires_grad_(True)
            scope = GlobalScope()
            with BNStatLoss(teacher, spec.first_bn_multiplier, scope) as bn_loss:
                loss = recover_loss(teacher, mine, targets[share], mine, spec, runtime, bn_loss,
                                    scope.images(len(mine)))
            loss.own.backward()
            whole = images.clone().requires_grad_(True)
            with BNStatLoss(teacher, spec.first_bn_multiplier, LocalScope()) as bn_loss:
                recover_loss(teacher, whole, targets, whole, spec, runtime, bn_loss, len(whole)).own.backward()
            error = torch.tensor([relative_error(mine.grad, whole.grad[share])], dtype=torch.float64, device=device)
        dist.all_reduce(error, op=dist.ReduceOp.MAX)

        bounds = synthetic_info(shape).pixel_bounds()
        with BNStatLoss(teacher, spec.first_bn_multiplier, GlobalScope()) as bn_loss:
            def run(iterations: int) -> None:
                synthesize(teacher, targets[share], recover_spec(iterations, limits.batch), bounds, image_shape,
                           runtime, torch.Generator().manual_seed(cfg.seed + rank), bn_loss)

            run(limits.warm_iterations)
            dist.barrier()
            started = time.perf_counter()
            run(limits.global_iterations)
            seconds = time.perf_counter() - started
        return {"rank": rank, "backend": backend, "grad_error": float(error), "seconds": seconds,
                "sync_bytes": sync_bytes_per_step(teacher),
                "nccl": nccl_version() if backend == "nccl" else None}
    finally:
        dist.destroy_process_group()


def _row(world: int, cfg: CheckConfig, result: dict[str, Any]) -> Row:
    if result["grad_error"] > GRAD_TOLERANCE:
        raise AssertionError(f"world size {world}: input gradients differ from one process's by "
                             f"{result['grad_error']:.2e} (relative), above {GRAD_TOLERANCE:g}")
    backend = result["backend"] + (f" {result['nccl']}" if result["nccl"] else "")
    rate = cfg.limits.batch * cfg.limits.global_iterations / result["seconds"]
    return Row(
        case=f"{cfg.student} {cfg.imagenet.image_size}px, {world} rank{'s' if world > 1 else ''}", rate=rate,
        note=f"{backend} on {cfg.device.type}, fp32 eager; grad rel err {result['grad_error']:.1e}; "
             f"all-reduce {result['sync_bytes'] / 1024:.1f} KiB/step",
    )


def world1_rows(cfg: CheckConfig, budget_s: float) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="scdd-gpu-check-") as folder:
        return [_row(1, cfg, rank_run(0, 1, cfg, str(Path(folder) / "rendezvous"), budget_s))]


def _child(rank: int, cfg: CheckConfig, rendezvous: str, budget_s: float, results: multiprocessing.Queue) -> None:
    try:
        if cfg.device.type == "cpu":
            torch.set_num_threads(1)  # two ranks share the cores
        results.put((rank, rank_run(rank, 2, cfg, rendezvous, budget_s)))
    except Exception as exc:
        results.put((rank, one_line(exc)))


def _collect(results: multiprocessing.Queue, outcomes: dict[int, Any], children: list, deadline: float,
             budget_s: float) -> None:
    """Wait a moment for one rank's outcome; raise on a rank's error, a dead rank or the deadline."""
    try:
        rank, outcome = results.get(timeout=0.5)
    except queue.Empty:
        for rank, child in enumerate(children):
            if rank not in outcomes and child.exitcode is not None:
                raise RuntimeError(f"rank {rank} exited with code {child.exitcode} before reporting") from None
        if time.monotonic() > deadline:
            raise TimeoutError(f"2 ranks did not finish within {budget_s:.0f} s "
                               f"(finished: {sorted(outcomes)})") from None
        return
    if isinstance(outcome, str):  # the other rank waits in a collective that will never complete
        raise RuntimeError(f"rank {rank}: {outcome}")
    outcomes[rank] = outcome


def world2_rows(cfg: CheckConfig, budget_s: float) -> list[Row]:
    """Two ranks in child processes, killed when `budget_s` runs out. CUDA children are spawned (a forked
    child cannot use CUDA); CPU children are forked (they start in milliseconds, not a torch import)."""
    context = multiprocessing.get_context("spawn" if cfg.device.type == "cuda" else "fork")
    results = context.Queue()
    deadline = time.monotonic() + budget_s
    with tempfile.TemporaryDirectory(prefix="scdd-gpu-check-") as folder:
        rendezvous = str(Path(folder) / "rendezvous")
        children = [context.Process(target=_child, args=(rank, cfg, rendezvous, budget_s, results), daemon=True)
                    for rank in range(2)]
        for child in children:
            child.start()
        outcomes: dict[int, Any] = {}
        try:
            while len(outcomes) < 2:
                _collect(results, outcomes, children, deadline, budget_s)
        finally:
            for child in children:  # after a failure the other rank may wait in a collective: kill it
                child.join(timeout=5 if len(outcomes) == 2 else 0)
                if child.is_alive():
                    child.kill()
                    child.join()
    errors = [outcomes[r]["grad_error"] for r in range(2)]
    slowest = max(outcomes[r]["seconds"] for r in range(2))
    return [_row(2, cfg, {**outcomes[0], "grad_error": max(errors), "seconds": slowest})]
