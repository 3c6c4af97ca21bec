"""A Ray actor with `num_gpus=1` (how workers/recover.py places a recover worker) sees its GPU and
recovers on it.

Runs only where Ray is importable and a CUDA device is present. A fresh local Ray instance is started
(`address="local"`, never a cluster that happens to run on the machine) and shut down afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from gpu_check_parts.config import CheckConfig
from gpu_check_parts.measure import measure
from gpu_check_parts.recover_rate import RecoverBench
from gpu_check_parts.report import Row, Skipped
from scdd.runtime import Runtime

IMPORT_ROOTS = (Path(__file__).resolve().parents[2], Path(__file__).resolve().parents[1])  # the repo, bench/


class GpuProbe:
    """What the actor runs: which GPU Ray gave it, and scdd's fp32 recover rate there."""

    def run(self, cfg: CheckConfig, share_s: float) -> dict[str, Any]:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        if not torch.cuda.is_available():
            raise RuntimeError(f"the actor sees no CUDA device (CUDA_VISIBLE_DEVICES={visible!r})")
        cfg = replace(cfg, device=torch.device("cuda", 0))  # Ray exposes exactly the GPU it assigned
        bench = RecoverBench(cfg, cfg.imagenet, cfg.student)
        run, _ = bench.ours(Runtime(cfg.device, None, False, "off"))
        result = measure(run, cfg.device, cfg.limits, share_s)
        name = torch.cuda.get_device_name(cfg.device)
        return {"visible": visible, "name": name, "rate": result.rate * cfg.limits.batch, "units": result.units}


def ray_rows(cfg: CheckConfig, budget_s: float) -> list[Row]:
    if importlib.util.find_spec("ray") is None:
        raise Skipped("ray is not importable here")
    if cfg.device.type != "cuda":
        raise Skipped("no CUDA device: this part checks a num_gpus=1 actor")
    import ray

    started = time.monotonic()
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(map(str, IMPORT_ROOTS))}})
    try:
        actor = ray.remote(num_gpus=1)(GpuProbe).remote()
        share = min(cfg.limits.measure_s, budget_s / 4)
        probe = ray.get(actor.run.remote(cfg, share), timeout=max(1.0, budget_s - (time.monotonic() - started)))
    finally:
        ray.shutdown()
    return [Row(
        case=f"{cfg.student} {cfg.imagenet.image_size}px in actor", rate=probe["rate"],
        note=f"num_gpus=1 actor on {probe['name']} (CUDA_VISIBLE_DEVICES={probe['visible']}); fp32 eager; "
             f"{probe['units']} it",
    )]
