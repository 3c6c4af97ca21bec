"""Where a job's workers run: GPUs are decided by the spec and the cluster's configuration, never by the GPUs
up at the moment, and a group of workers waits a bounded time for its placement (a GPU node's cold start),
then fails with a line that names what could not be placed and the fixes. The Ray half runs on the tests'
real Ray head (2 CPUs, no GPU): a cluster whose GPU group is at zero replicas, as seen by a job."""

import logging
import re
import time

import pytest
import torch

from api_schema import JobSpec
from scdd.data.base import DatasetInfo
from scdd.errors import ResourceError
from scdd.runtime import Runtime
from tests.conftest import cpus_free_soon, tiny_job, tiny_teacher
from workers import cluster
from workers.backend import RayBackend, RayOptions
from workers.cluster import DEFAULT_PLACEMENT_TIMEOUT_S, decide_device, max_restarts_from_env, placement_timeout_from_env

# --- the decision, pure -------------------------------------------------------------------------------------

EVERY_CONTEXT = [(configured, local, cuda) for configured in (None, "", "cuda", "cpu")
                 for local in (False, True) for cuda in (False, True)]


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
@pytest.mark.parametrize("configured, local, cuda", EVERY_CONTEXT)
def test_cuda_in_the_spec_always_means_gpus(device, configured, local, cuda):
    decision = decide_device(device, configured, local, cuda)
    assert decision.gpus is True and decision.warning is None and device in decision.why


@pytest.mark.parametrize("configured, local, cuda", EVERY_CONTEXT)
def test_cpu_in_the_spec_never_means_gpus(configured, local, cuda):
    decision = decide_device("cpu", configured, local, cuda)
    assert decision.gpus is False and decision.warning is None


@pytest.mark.parametrize("configured, gpus", [("cuda", True), ("CUDA", True), (" cuda ", True), ("cuda:0", True),
                                              ("cpu", False), ("Cpu", False)])
@pytest.mark.parametrize("local, cuda", [(False, False), (False, True), (True, False), (True, True)])
def test_auto_follows_the_clusters_configured_device_wherever_it_runs(configured, gpus, local, cuda):
    """The cluster's setting wins over this machine: a CPU-only head of a GPU cluster still means GPUs."""
    decision = decide_device("auto", configured, local, cuda)
    assert decision.gpus is gpus and decision.warning is None
    assert "SCDD_WORKER_DEVICE" in decision.why


@pytest.mark.parametrize("configured", [None, ""])
@pytest.mark.parametrize("cuda", [False, True])
def test_auto_on_a_local_cluster_without_the_setting_follows_this_machines_cuda(configured, cuda):
    decision = decide_device("auto", configured, local_cluster=True, local_cuda=cuda)
    assert decision.gpus is cuda and decision.warning is None and "local Ray cluster" in decision.why


@pytest.mark.parametrize("configured", [None, ""])
@pytest.mark.parametrize("cuda", [False, True])
def test_auto_on_a_joined_cluster_without_the_setting_runs_on_cpus_and_says_how_to_get_gpus(configured, cuda):
    decision = decide_device("auto", configured, local_cluster=False, local_cuda=cuda)
    assert decision.gpus is False
    assert "running the workers on CPUs" in decision.warning
    assert "resources.device: cuda" in decision.warning and "SCDD_WORKER_DEVICE=cuda" in decision.warning


@pytest.mark.parametrize("configured", ["gpu", "yes", "1"])
def test_a_misspelt_worker_device_is_a_clear_error(configured):
    with pytest.raises(ResourceError, match=rf"SCDD_WORKER_DEVICE='{configured}' is neither cuda nor cpu"):
        decide_device("auto", configured, local_cluster=False, local_cuda=False)
    assert decide_device("cpu", configured, False, False).gpus is False  # only auto reads it


def test_wants_gpus_reads_the_environment_and_how_this_process_joined_ray(monkeypatch, caplog):
    monkeypatch.delenv("SCDD_WORKER_DEVICE", raising=False)
    monkeypatch.setattr(cluster, "local_cuda", lambda: True)
    monkeypatch.setattr(cluster, "_started_local_cluster", True)  # connect() started a local cluster
    assert cluster.wants_gpus("auto") is True
    monkeypatch.setattr(cluster, "_started_local_cluster", False)  # connect() joined RAY_ADDRESS
    monkeypatch.setattr(cluster, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="scdd.workers"):
        assert cluster.wants_gpus("auto") is False  # how many GPUs are up decides nothing
        assert cluster.wants_gpus("auto") is False  # every stage asks; the warning is one line per process
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and "SCDD_WORKER_DEVICE=cuda" in caplog.text
    monkeypatch.setenv("SCDD_WORKER_DEVICE", "cuda")
    assert cluster.wants_gpus("auto") is True
    assert cluster.wants_gpus("cpu") is False


def test_placement_timeout_defaults_to_minutes_and_is_set_by_the_environment(monkeypatch):
    monkeypatch.delenv("SCDD_PLACEMENT_TIMEOUT_S", raising=False)
    assert DEFAULT_PLACEMENT_TIMEOUT_S == 600.0  # an autoscaler starting a GPU node from zero
    assert RayOptions().placement_timeout_s == RayOptions.from_env().placement_timeout_s == 600.0
    monkeypatch.setenv("SCDD_PLACEMENT_TIMEOUT_S", "1800")
    assert RayOptions.from_env().placement_timeout_s == 1800.0
    assert RayOptions().placement_timeout_s == 600.0  # tests' explicit options do not read it
    for bad in ("0", "-5", "ten", "inf", "nan"):
        monkeypatch.setenv("SCDD_PLACEMENT_TIMEOUT_S", bad)
        with pytest.raises(ResourceError, match="SCDD_PLACEMENT_TIMEOUT_S=.* is not a number of seconds above 0"):
            placement_timeout_from_env()
    monkeypatch.setenv("SCDD_PLACEMENT_TIMEOUT_S", "")
    assert placement_timeout_from_env() == 600.0


def test_restarts_default_to_three_and_are_set_by_the_environment(monkeypatch):
    monkeypatch.delenv("SCDD_MAX_RESTARTS", raising=False)
    assert (RayOptions.from_env().recover_retries, RayOptions.from_env().train_failures) == (3, 3)
    monkeypatch.setenv("SCDD_MAX_RESTARTS", "10")
    assert (RayOptions.from_env().recover_retries, RayOptions.from_env().train_failures) == (10, 10)
    assert RayOptions().recover_retries == 3  # tests' explicit options do not read it
    for bad in ("-1", "many", "2.5"):
        monkeypatch.setenv("SCDD_MAX_RESTARTS", bad)
        with pytest.raises(ResourceError, match="SCDD_MAX_RESTARTS=.* is not a whole number >= 0"):
            max_restarts_from_env()


# --- on a real Ray cluster without a GPU ------------------------------------------------------------------

WAIT_S = 2.0
FIXES = ("scale up the cluster's GPU worker group", "raise SCDD_PLACEMENT_TIMEOUT_S", "resources.device: cpu",
         "fewer workers")


def gpu_job(tmp_path, fmnist_root, device="cuda") -> JobSpec:
    return JobSpec.model_validate(tiny_job(fmnist_root, tmp_path / "out", resources={
        "device": device, "workers": 2, "threads": 1}))


def assert_clear_refusal(error: ResourceError, what: str, started: float) -> None:
    message = str(error)
    assert message.startswith(f"{what}: the Ray cluster cannot place 2 workers of 1 CPU + 1 GPU each within 2 s")
    assert re.search(r"\(available now: \d+ CPUs, 0 GPUs\)\. Fixes: ", message), message
    assert all(fix in message for fix in FIXES), message
    assert WAIT_S <= time.monotonic() - started < WAIT_S + 20  # it waited the configured time, then stopped


def no_placement_group_left(ray) -> bool:
    from ray.util import placement_group_table

    return all(group["state"] == "REMOVED" for group in placement_group_table().values())


def test_cuda_recover_on_a_cluster_without_gpus_fails_after_the_wait(ray_local, tmp_path, fmnist_root, monkeypatch):
    monkeypatch.delenv("SCDD_WORKER_DEVICE", raising=False)
    spec = gpu_job(tmp_path, fmnist_root)
    backend = RayBackend(spec, options=RayOptions(placement_timeout_s=WAIT_S))
    info = DatasetInfo("fmnist", ("a", "b", "c"), ("0", "1", "2"), (0, 1, 2), 1, 12, (0.5,), (0.5,))
    cpu = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False, compile="off")
    started = time.monotonic()
    with pytest.raises(ResourceError) as refused:
        backend.recover(tiny_teacher(), info, spec.recover, cpu, backend.training.store, spec.seed)
    assert_clear_refusal(refused.value, "recover", started)
    assert no_placement_group_left(ray_local) and cpus_free_soon(ray_local) == 2


@pytest.mark.parametrize("device, configured", [("cuda", None), ("auto", "cuda")])
def test_gpu_ray_train_stage_on_a_cluster_without_gpus_fails_after_the_wait(ray_local, tmp_path, fmnist_root,
                                                                            monkeypatch, device, configured):
    """A Ray Train stage would wait for its GPUs forever: it waits the placement timeout, then fails. With auto,
    the cluster's configured device (cuda: its GPU group exists, scaled to zero) decides, not the 0 GPUs up."""
    if configured is None:
        monkeypatch.delenv("SCDD_WORKER_DEVICE", raising=False)
    else:
        monkeypatch.setenv("SCDD_WORKER_DEVICE", configured)
    spec = gpu_job(tmp_path, fmnist_root, device)
    backend = RayBackend(spec, options=RayOptions(placement_timeout_s=WAIT_S))
    started = time.monotonic()
    with pytest.raises(ResourceError) as refused:
        backend.training.run("student", "validate")
    assert_clear_refusal(refused.value, "validate (Ray Train)", started)
    assert no_placement_group_left(ray_local) and cpus_free_soon(ray_local) == 2


# --- the service: what a Ray job of the dispatcher gets ----------------------------------------------------


@pytest.mark.parametrize("device, configured, gpus", [
    ("cuda", None, True), ("cuda:1", "cpu", True), ("cpu", "cuda", False), ("auto", "cuda", True),
    ("auto", "cpu", False), ("auto", None, False)])
def test_the_dispatcher_applies_the_same_rule_on_its_joined_cluster(device, configured, gpus):
    """A single-worker job computes in its driver: its Ray job asks for the GPU by the same rule."""
    from service.dispatcher import runs_on_gpus

    assert runs_on_gpus({"device": device, "workers": 1}, configured) is gpus
    assert gpus is decide_device(device, configured, local_cluster=False, local_cuda=True).gpus


def test_the_dispatcher_passes_the_clusters_device_and_placement_wait_on_when_set(redis_server, monkeypatch):
    from service.blocking_jobstore import BlockingJobStore
    from service.dispatcher import Dispatcher
    from service.settings import Settings

    store = BlockingJobStore.connect(redis_server.url, "placement-test")
    for name in ("SCDD_WORKER_DEVICE", "SCDD_PLACEMENT_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)
    plain = Dispatcher(Settings(redis_url=redis_server.url, jobs_redis_url="cluster"), store, ray_jobs=None).job_env()
    assert "SCDD_WORKER_DEVICE" not in plain and "SCDD_PLACEMENT_TIMEOUT_S" not in plain
    monkeypatch.setenv("SCDD_WORKER_DEVICE", "cuda")
    monkeypatch.setenv("SCDD_PLACEMENT_TIMEOUT_S", "900")
    env = Dispatcher(Settings(redis_url=redis_server.url, jobs_redis_url="cluster"), store, ray_jobs=None).job_env()
    assert (env["SCDD_WORKER_DEVICE"], env["SCDD_PLACEMENT_TIMEOUT_S"]) == ("cuda", "900")
    monkeypatch.setenv("SCDD_PLACEMENT_TIMEOUT_S", env["SCDD_PLACEMENT_TIMEOUT_S"])  # as the driver reads it
    assert RayOptions.from_env().placement_timeout_s == 900.0


def test_scdd_serve_sees_this_machines_gpus_without_torch(monkeypatch):
    """`scdd serve` sets SCDD_WORKER_DEVICE for the head it starts from a cheap check (no torch in the API process)."""
    from service.serve import nvidia_gpu_present

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert nvidia_gpu_present() is torch.cuda.is_available()
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert nvidia_gpu_present() is False
