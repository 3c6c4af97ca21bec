"""Connecting to Ray, and gang-placing a group of workers on it.

`connect()` joins the cluster at RAY_ADDRESS when it is set (failing at once when it does not answer), and
otherwise starts a new local one on this machine (no dashboard: it starts faster and serves nothing here),
whatever cluster Ray's bootstrap record last named. A `WorkerGroup` reserves one
placement-group bundle per worker, so either all W workers start or none does, and releases the
bundles again (`shutdown`), also after a failure.

Whether workers get GPUs is decided by the spec and the cluster's configuration (`decide_device`), never
by counting the GPUs that happen to be up: a GPU group scaled to zero then means waiting for a GPU node
(up to `placement_timeout_s`, `DEFAULT_PLACEMENT_TIMEOUT_S` unless set) and, after that, a clear
`ResourceError`, never a quiet run on CPUs.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from scdd.errors import ResourceError

log = logging.getLogger("scdd.workers")


ANSWER_TIMEOUT_S = 5.0
# How long a group of workers waits for its placement by default: covers an autoscaler bringing up a GPU
# node from zero (node provisioning, image pull, Ray start: minutes). SCDD_PLACEMENT_TIMEOUT_S overrides it.
DEFAULT_PLACEMENT_TIMEOUT_S = 600.0
WORKER_DEVICE_ENV = "SCDD_WORKER_DEVICE"
PLACEMENT_TIMEOUT_ENV = "SCDD_PLACEMENT_TIMEOUT_S"
# Whether this process started the Ray cluster it is connected to (set by `connect`); None: not connected by it.
_started_local_cluster: bool | None = None
_logged: set[str] = set()  # device decisions and warnings already logged by this process (each stage asks)


def check_answers(address: str, timeout_s: float = ANSWER_TIMEOUT_S) -> None:
    """Fail at once, naming the fix, when the Ray address (host:port or ray://host:port) takes no connection:
    ray.init would otherwise retry against a dead head for as long as it is let."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)/?", address)
    if not match:  # "auto" and other forms Ray resolves itself
        return
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as error:
        raise ResourceError(
            f"the Ray cluster at RAY_ADDRESS={address} does not answer ({error.strerror or error}); start it, fix "
            f"RAY_ADDRESS, or unset it to run on a local Ray cluster") from None


def connect(address: str | None = None) -> str:
    """Join or start Ray once per process; returns what it did, for the logs."""
    global _started_local_cluster
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return "using the Ray connection of this process"
    if address:
        check_answers(address)
        ray.init(address=address, log_to_driver=False)
        _started_local_cluster = False
        message = f"joined the Ray cluster at {address}"
    else:
        # "local": always a new cluster. Without it ray.init joins the cluster Ray's bootstrap record names (the
        # last `ray start` on this machine, e.g. a stopped `scdd serve`'s head) and retries against it if it is gone.
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        _started_local_cluster = True
        message = f"started a local Ray cluster ({int(ray.cluster_resources().get('CPU', 0))} CPUs); set RAY_ADDRESS to join one"
    log.info(message)
    return message


@dataclass(frozen=True)
class Placement:
    """What each worker of a group needs from the cluster."""

    workers: int
    cpus: int
    gpus: int  # 0 or 1 per worker

    def bundles(self) -> list[dict[str, float]]:
        bundle = {"CPU": float(self.cpus), **({"GPU": float(self.gpus)} if self.gpus else {})}
        return [dict(bundle) for _ in range(self.workers)]


@dataclass(frozen=True)
class DeviceDecision:
    """Whether a job's workers get one GPU each, why (for the logs), and a warning to log, if any."""

    gpus: bool
    why: str
    warning: str | None = None


def decide_device(device: str, configured: str | None, local_cluster: bool, local_cuda: bool) -> DeviceDecision:
    """The workers' device, from the spec and the cluster's configuration (pure; never counts GPUs that are up).

    `device`: the spec's resources.device. `configured`: the cluster's worker device, $SCDD_WORKER_DEVICE
    (cuda or cpu; None or "": not configured; the Helm chart sets it on the Ray pods, `scdd serve` on the head
    it starts). `local_cluster`: the Ray cluster was started by this process on this machine. `local_cuda`:
    this machine has CUDA. cuda* -> GPUs; cpu -> none; auto -> the configured device, else on a local cluster
    GPUs iff this machine has CUDA, else (a cluster joined without the setting) CPUs, with a warning."""
    if device.startswith("cuda"):
        return DeviceDecision(True, f"resources.device is {device}")
    if device == "cpu":
        return DeviceDecision(False, "resources.device is cpu")
    if device != "auto":
        raise ResourceError(f"resources.device {device!r} is not auto, cpu, cuda or cuda:N")
    value = (configured or "").strip().lower()
    if value:
        if value.startswith("cuda"):
            return DeviceDecision(True, f"resources.device is auto and the cluster's {WORKER_DEVICE_ENV} is {value}")
        if value == "cpu":
            return DeviceDecision(False, f"resources.device is auto and the cluster's {WORKER_DEVICE_ENV} is cpu")
        raise ResourceError(f"{WORKER_DEVICE_ENV}={configured!r} is neither cuda nor cpu: set it to cuda (the "
                            f"cluster's workers have GPUs) or cpu, or unset it")
    if local_cluster:
        return DeviceDecision(local_cuda, "resources.device is auto on a local Ray cluster on a machine " +
                              ("with CUDA" if local_cuda else "without CUDA"))
    return DeviceDecision(False, f"resources.device is auto and the Ray cluster joined sets no {WORKER_DEVICE_ENV}",
                          warning=f"resources.device is auto and the Ray cluster this job joined does not say which "
                                  f"device its workers have ({WORKER_DEVICE_ENV} is unset): running the workers on "
                                  f"CPUs. For GPUs set resources.device: cuda in the spec, or {WORKER_DEVICE_ENV}=cuda "
                                  f"in the environment of the cluster's head (the Helm chart sets it)")


def local_cuda() -> bool:
    """Whether this machine has CUDA (imports torch: workers only, never the API process)."""
    import torch

    return torch.cuda.is_available()


def wants_gpus(device: str) -> bool:
    """One GPU per worker or none, by `decide_device` for this process's cluster (logs why, and any warning).
    The number of GPUs up at the moment decides nothing."""
    local = bool(_started_local_cluster)
    decision = decide_device(device, os.environ.get(WORKER_DEVICE_ENV), local,
                             local_cuda() if local and device == "auto" else False)
    for level, line in ((logging.WARNING, decision.warning),
                        (logging.INFO, f"workers on {'GPUs' if decision.gpus else 'CPUs'}: {decision.why}")):
        if line and line not in _logged:
            _logged.add(line)
            log.log(level, line)
    return decision.gpus


def placement_timeout_from_env(default: float = DEFAULT_PLACEMENT_TIMEOUT_S) -> float:
    """$SCDD_PLACEMENT_TIMEOUT_S (seconds, > 0), else `default`."""
    value = os.environ.get(PLACEMENT_TIMEOUT_ENV, "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        raise ResourceError(f"{PLACEMENT_TIMEOUT_ENV}={value!r} is not a number of seconds above 0: set it to how "
                            f"long a job may wait for its workers' placement (default {default:g}), or unset it")
    return seconds


MAX_RESTARTS_ENV = "SCDD_MAX_RESTARTS"
DEFAULT_MAX_RESTARTS = 3


def max_restarts_from_env(default: int = DEFAULT_MAX_RESTARTS) -> int:
    """$SCDD_MAX_RESTARTS (an integer >= 0: how often a stage re-forms its worker group after losing a worker, per
    recover unit and per Ray Train stage), else `default`."""
    value = os.environ.get(MAX_RESTARTS_ENV, "").strip()
    if not value:
        return default
    if not value.isdigit():
        raise ResourceError(f"{MAX_RESTARTS_ENV}={value!r} is not a whole number >= 0: set it to how often a stage may "
                            f"re-form its workers after losing one (default {default}), or unset it")
    return int(value)


def placement_fixes(bundle: dict[str, float]) -> str:
    """What a user can do when a group of workers found no placement in time."""
    gpus = bool(bundle.get("GPU"))
    fixes = []
    if gpus:
        fixes.append("scale up the cluster's GPU worker group (its maxReplicas, or the GPU node pool behind it)")
    fixes.append(f"wait longer for nodes to start: raise {PLACEMENT_TIMEOUT_ENV} "
                 f"(seconds; Helm: ray.placementTimeoutS)")
    if gpus:
        fixes.append("run on CPUs: resources.device: cpu")
    fixes.append("ask for fewer workers (resources.workers)"
                 + ("" if gpus else " or fewer CPUs each (resources.threads)"))
    return "; ".join(fixes)


def describe_bundle(bundle: dict[str, float]) -> str:
    """{'CPU': 2.0, 'GPU': 1.0} -> '2 CPUs + 1 GPU'."""
    def plural(name: str, count: float) -> str:
        return f"{count:g} {name}{'' if count == 1 else 's'}"
    return " + ".join(plural(name, count) for name, count in bundle.items()) or "nothing"


def unplaceable(what: str, workers: int, bundle: dict[str, float], timeout_s: float) -> ResourceError:
    """The ResourceError of a group of `workers` bundles that found no placement within `timeout_s`."""
    available = ray.available_resources()
    return ResourceError(
        f"{what}: the Ray cluster cannot place {workers} workers of {describe_bundle(bundle)} each within "
        f"{timeout_s:g} s (available now: {int(available.get('CPU', 0))} CPUs, {int(available.get('GPU', 0))} GPUs). "
        f"Fixes: {placement_fixes(bundle)}")


def reserve(bundles: list[dict[str, float]], timeout_s: float, what: str, strategy: str = "PACK") -> PlacementGroup:
    """A placement group of `bundles`, once the cluster has placed it (waiting up to `timeout_s`); else it is
    released and `unplaceable`'s ResourceError raised."""
    group = placement_group(bundles, strategy=strategy)
    if not group.wait(timeout_seconds=timeout_s):
        remove_placement_group(group)
        raise unplaceable(what, len(bundles), bundles[0], timeout_s)
    return group


def wait_for_placement(bundles: list[dict[str, float]], timeout_s: float, what: str, strategy: str = "PACK") -> None:
    """Wait up to `timeout_s` until the cluster can place `bundles` together (reserving them, so an autoscaler
    starts the nodes they need), then release them; `reserve`'s ResourceError when it cannot. For runners that
    place their workers themselves and would wait forever (Ray Train)."""
    remove_placement_group(reserve(bundles, timeout_s, what, strategy))


class WorkerGroup:
    """W actors of `actor_class` gang-placed in one placement group (bundle w holds rank w)."""

    def __init__(self, actor_class: Any, placement: Placement, args_for_rank,
                 ready_timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S, what: str = "recover"):
        self.placement = placement
        self.group: PlacementGroup = reserve(placement.bundles(), ready_timeout_s, what)
        remote = ray.remote(actor_class)
        self.actors = [
            remote.options(
                num_cpus=placement.cpus,
                num_gpus=placement.gpus,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank),
            ).remote(*args_for_rank(rank))
            for rank in range(placement.workers)
        ]

    def call(self, method: str, *args: Any) -> list[ray.ObjectRef]:
        """Start `method(*args)` on every actor; returns one reference per rank."""
        self.outstanding = [getattr(actor, method).remote(*args) for actor in self.actors]
        return self.outstanding

    def shutdown(self) -> None:
        """Kill the actors (also ones blocked in a collective) and release the bundles."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        remove_placement_group(self.group)
        for ref in getattr(self, "outstanding", []):  # collect the calls' fates, so Ray logs no unhandled error
            try:
                ray.get(ref, timeout=10)
            except Exception:
                pass
        self.outstanding = []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def rendezvous_address() -> str:
    """host:port where rank 0 of a torch process group can listen (run on rank 0's node)."""
    return f"{ray.util.get_node_ip_address()}:{free_port()}"
