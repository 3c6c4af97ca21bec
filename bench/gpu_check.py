"""One prepared GPU check: every CUDA path of scdd, measured in about 8 minutes on one H100/H200.

Parts (each with a time budget; a failing part is reported with its cause and the others still run):
  recover/<model>@<size>  recover throughput at 224 px / 1000 classes (ResNet-18, ResNet-50) and at
                          32 px / 100 classes (CIFAR-style ResNets), batch 100: the published SRe2L
                          loop (yardstick), scdd fp32 eager, scdd with the `auto` speed options;
                          with achieved TFLOP/s, device memory per image and hours of a full workload
  global/W=1, global/W=2  BN statistics of the global batch over a real process group (NCCL on a
                          GPU, gloo on a CPU): gradients equal one process's, and the step rate
  validate/kd             KD student training rate (images/s)
  ray/actor               a Ray actor with num_gpus=1 recovers on its GPU (where Ray is importable)

No dataset is needed: teachers are synthetic (random initialisation, BN running statistics from a
few batches of noise). Needs only torch and torchvision: scdd is imported from this working tree and
nothing here imports pydantic. See docs/gpu-check.md for the columns.

    python bench/gpu_check.py                       # device: cuda if available
    python bench/gpu_check.py --device cpu --tiny   # seconds on a CPU
    python bench/gpu_check.py --smoke               # the same, written to a temporary file (tests/test_gpu_check.py)
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(REPO))  # scdd from this working tree (the lent machine has no install of it)

import torch  # noqa: E402
import torchvision  # noqa: E402

from gpu_check_parts.config import CheckConfig, ModelPlan, Shape, gpu_config, tiny_config  # noqa: E402
from gpu_check_parts.global_stats import nccl_version, world1_rows, world2_rows  # noqa: E402
from gpu_check_parts.ray_actor import ray_rows  # noqa: E402
from gpu_check_parts.recover_rate import recover_rows  # noqa: E402
from gpu_check_parts.report import PartResult, Row, run_part, table, write_json  # noqa: E402
from gpu_check_parts.student_rate import validate_rows  # noqa: E402
from scdd.errors import ScddError  # noqa: E402
from scdd.runtime import fast_bf16, resolve_device  # noqa: E402

GROUPS = ("recover", "global", "validate", "ray")
TEACHERS = ("synthetic: random initialisation, BatchNorm running statistics averaged over a few batches of "
            "Gaussian noise; no dataset is read")
Part = tuple[str, float, Callable[[float], list[Row]]]  # (name, budget in seconds, measure)


def plan(cfg: CheckConfig, groups: tuple[str, ...]) -> list[Part]:
    """The parts in run order: a quick proof of each path first, then the slower recover shapes."""
    def recover(shape: Shape, model: ModelPlan) -> Part:
        return (f"recover/{model.arch}@{shape.image_size}", model.budget_s,
                lambda budget: recover_rows(cfg, shape, model, budget))

    first, *more = [recover(cfg.imagenet, m) for m in cfg.imagenet.models]
    parts = [
        first,
        ("global/W=1", cfg.global_budget_s, lambda budget: world1_rows(cfg, budget)),
        ("validate/kd", cfg.validate_budget_s, lambda budget: validate_rows(cfg, budget)),
        *more,
        *(recover(cfg.cifar, m) for m in cfg.cifar.models),
        ("global/W=2", cfg.world2_budget_s, lambda budget: world2_rows(cfg, budget)),
        ("ray/actor", cfg.ray_budget_s, lambda budget: ray_rows(cfg, budget)),
    ]
    return [part for part in parts if part[0].split("/")[0] in groups]


def importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "device": str(device), "cpu_threads": torch.get_num_threads(), "bf16_native": fast_bf16(device),
        "pydantic_importable": importable("pydantic"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   nccl=nccl_version())
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (cuda if available)")
    parser.add_argument("--tiny", action="store_true",
                        help="small images, 4 classes, a few iterations: seconds on a CPU")
    parser.add_argument("--parts", nargs="+", choices=GROUPS, default=list(GROUPS), help="which groups of parts to run")
    parser.add_argument("--out", type=Path, help="JSON file (default: bench/results/gpu_check_<device>[_tiny].json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="--device cpu --tiny, the JSON to a temporary file unless --out says where (every bench's "
                        "small mode, run by the test suite)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.tiny = "cpu", True
        args.out = args.out or Path(tempfile.mkdtemp(prefix="gpu-check-smoke-")) / "gpu_check_cpu_tiny.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
    except (ScddError, RuntimeError) as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2
    if device.type == "cpu" and not args.tiny:
        print("gpu_check: error: no CUDA device: the full check is sized for a GPU (minutes there, hours on a CPU); "
              "on a CPU run: python bench/gpu_check.py --device cpu --tiny", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cfg = (tiny_config if args.tiny else gpu_config)(device, args.seed)
    out = args.out or REPO / "bench" / "results" / f"gpu_check_{device.type}{'_tiny' if args.tiny else ''}.json"
    header = {"check": "bench/gpu_check.py", "mode": "tiny" if args.tiny else "full", "teachers": TEACHERS,
              "environment": environment(device), "config": json.loads(json.dumps(asdict(cfg), default=str))}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, header, [], 0.0)
    except OSError as exc:
        print(f"gpu_check: error: cannot write --out {out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(" ".join(f"{k}={v}" for k, v in header["environment"].items()))
    print(f"teachers: {TEACHERS}")
    started = time.perf_counter()
    parts = plan(cfg, tuple(args.parts))
    results: list[PartResult] = []
    for index, (name, budget_s, measure) in enumerate(parts, 1):
        print(f"[{index}/{len(parts)}] {name} (budget {budget_s:.0f} s) ...", file=sys.stderr, flush=True)
        results.append(run_part(name, budget_s, measure))
        write_json(out, header, results, time.perf_counter() - started)  # a killed run keeps what it measured
    print(table(results))
    print(f"workload h: hours of {cfg.imagenet.workload.label} (rows at {cfg.imagenet.image_size} px) or "
          f"{cfg.cifar.workload.label} (rows at {cfg.cifar.image_size} px) on this device at the row's rate")
    print(f"{time.perf_counter() - started:.0f} s in all; written to {out}")
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
