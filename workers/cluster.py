"""Connecting to Ray, and gang-placing a group of workers on it.

`connect()` joins the cluster at RAY_ADDRESS when it is set (failing at once when it does not answer), and
otherwise starts a new local one on this machine (no dashboard: it starts faster and serves nothing here),
whatever cluster Ray's bootstrap record last named. A `WorkerGroup` reserves one
placement-group bundle per worker, so either all W workers start or none does, and releases the
bundles again (`shutdown`), also after a failure.
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
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return "using the Ray connection of this process"
    if address:
        check_answers(address)
        ray.init(address=address, log_to_driver=False)
        message = f"joined the Ray cluster at {address}"
    else:
        # "local": always a new cluster. Without it ray.init joins the cluster Ray's bootstrap record names (the
        # last `ray start` on this machine, e.g. a stopped `scdd serve`'s head) and retries against it if it is gone.
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
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


def wants_gpus(device: str, workers: int) -> bool:
    """One GPU per worker for device cuda*, none for cpu; auto uses GPUs when the cluster has one per worker."""
    if device.startswith("cuda"):
        return True
    if device == "auto":
        return ray.cluster_resources().get("GPU", 0) >= workers
    return False


class WorkerGroup:
    """W actors of `actor_class` gang-placed in one placement group (bundle w holds rank w)."""

    def __init__(self, actor_class: Any, placement: Placement, args_for_rank, ready_timeout_s: float = 120.0):
        self.placement = placement
        self.group: PlacementGroup = placement_group(placement.bundles(), strategy="PACK")
        if not self.group.wait(timeout_seconds=ready_timeout_s):
            remove_placement_group(self.group)
            available = ray.available_resources()
            raise ResourceError(
                f"the Ray cluster cannot place {placement.workers} workers of {placement.bundles()[0]} each "
                f"(available now: {int(available.get('CPU', 0))} CPUs, {int(available.get('GPU', 0))} GPUs); "
                f"lower resources.workers or resources.threads, or add nodes"
            )
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
