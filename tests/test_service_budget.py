"""What one job may ask (service/budget.py, service/admission.py): the memory estimate against the models it tabulates
and against the peak RSS of real runs, and the bounds it feeds through the real API (uvicorn on loopback over a
real redis-server): a node's memory and CPUs, a tenant's memory limit from its key file, images kept as they are
against the image-iteration limit, a resume onto fewer workers, and the paths a spec reads (absolute, read off
the event loop)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch
import yaml

from api_schema import JobSpec
from service.api.main import create_app
from service.budget import classes_of
from service.memory_estimate import ARCHS, GIB, estimate_memory, image_size_of
from tests.services import ApiServer, api_settings

SPEC = {"method": "sre2l", "dataset": {"classes": [0, 1]}, "recover": {"ipc": 1, "iterations": 2}}


def merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def refusal(answer) -> tuple[list[tuple], str]:
    """(the locations, the message) of a 422."""
    assert answer.status_code == 422, answer.text
    return [tuple(error["loc"]) for error in answer.json()["detail"]], answer.json()["message"]


# ---- the estimate ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("validate", [{}, {"mode": "hard"}, {"preset": "long"}, {"preset": "long", "mode": "hard"},
                                      {"student_arch": "mobilenet_v2_small"}, {"batch_size": 32}])
@pytest.mark.parametrize("size", [28, 32, 64, 96])
def test_the_estimate_picks_the_students_and_at_least_the_batch_the_validate_stage_will(validate, size):
    """The API does not import the compute layer (it would import torch), so service/memory_estimate.py restates
    how scdd/validate/protocol.py picks the default student and its batch; this keeps the two in step: the same
    student, and a batch no smaller than the one the run resolves (the long preset's depends on the set: the
    estimate takes its bound, 100)."""
    from scdd.validate.protocol import resolve_protocol
    from service.memory_estimate import _student_archs, _student_batch

    spec = JobSpec.model_validate({"dataset": {"image_size": size}, "validate": {"enabled": True, **validate}})
    for images in (2, 100, 50_000):
        protocol = resolve_protocol(spec.validate_, images, size)
        assert _student_archs(spec, size) == [protocol.student_arch]
        assert _student_batch(spec) >= protocol.batch_size


def _saved_bytes_per_pixel(name: str, size: int) -> float:
    """Bytes a training forward of registry model `name` saves for backward, per input pixel of one image."""
    from scdd.models import create_model

    model = create_model(name, 10, 3, size).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(torch.randn(2, 3, size, size, requires_grad=True))
    return sum(saved.values()) / 2 / size**2


def test_the_memory_table_holds_every_model_as_measured():
    """ARCHS (the API does not import torch) against the registry: saved activations per pixel, the larger of 32 and
    64 px (the per-pixel figure falls slowly with the size), the classifier's input features and the parameters
    before it."""
    from scdd.models import MODELS, create_model, head_path

    assert set(ARCHS) == set(MODELS.names())
    for name, arch in ARCHS.items():
        measured = max(_saved_bytes_per_pixel(name, 32), _saved_bytes_per_pixel(name, 64))
        assert measured <= arch.activations <= measured * 1.01 + 1, (name, measured)
        model = create_model(name, 10, 3, 64)
        head = model.get_submodule(head_path(model))
        body = sum(p.numel() for p in model.parameters()) - head.weight.numel() - head.bias.numel()
        assert (arch.feature_dim(64), arch.body_params) == (head.in_features, body), name
        assert arch.params(10, 64) == sum(p.numel() for p in model.parameters()), name


RESOURCES = {"device": "cpu", "amp": "off", "channels_last": "off", "compile": "off", "threads": 1}
TINY = {"dataset": {"classes": [0, 1], "train_limit": 20, "test_limit": 10}, "teacher": {"epochs": 1},
        "recover": {"ipc": 1}, "validate": {"enabled": False}, "resources": RESOURCES}
# Real runs, each made for one term of the estimate to lead (the stage it names).
RUNS = {
    "teacher-batch": ({"method": "sre2l", "dataset": {"image_size": 64, "train_limit": 64},
                       "teacher": {"batch_size": 128}}, "squeeze"),
    "moco-queue": ({"method": "scdd", "teacher": {"ssl": {"epochs": 1, "batch_size": 16, "queue_size": 1_000_000,
                                                          "proj_dim": 256}, "probe": {"epochs": 1}}}, "squeeze ssl"),
    "test-batch": ({"method": "sre2l", "dataset": {"classes": list(range(10)), "image_size": 96, "train_limit": 4},
                    "teacher": {"batch_size": 8}, "recover": {"init": "noise", "iterations": 1, "batch_size": 10}},
                   "accuracy convnet"),
    "student-batch": ({"method": "sre2l", "dataset": {"image_size": 64, "train_limit": 64},
                       "teacher": {"batch_size": 8}, "recover": {"ipc": 32},
                       "validate": {"enabled": True, "epochs": 1, "batch_size": 64, "baseline": False}},
                      "validate resnet18_small"),
}
RUN = """
import json, resource, sys
from api_schema import JobSpec
from scdd.pipeline import run_distillation
run_distillation(JobSpec.model_validate(json.loads(sys.argv[1])))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_the_memory_estimate_is_within_a_factor_of_2_of_a_real_runs_peak_rss(name, tmp_path):
    """The estimate of a spec against the peak RSS of the same spec run in one process (scdd's pipeline, CPU), for
    runs where different terms lead: within a factor of 2 either way (measured: 0.9x to 1.6x)."""
    extra, stage = RUNS[name]
    output = {"url": str(tmp_path / "out"), "teacher_cache": str(tmp_path / "tc")}
    data = merged(merged(TINY, extra), {"output": output})
    spec = JobSpec.model_validate(data)
    estimate = estimate_memory(spec, classes_of(spec), image_size_of(spec))
    assert estimate.peak_stage == stage and not estimate.assumed
    run = subprocess.run([sys.executable, "-c", RUN, json.dumps(data)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    measured = int(run.stdout.split()[-1])
    ratio = estimate.peak_bytes / measured
    print(f"{name}: estimated {estimate.peak_bytes / GIB:.2f} GiB, measured {measured / GIB:.2f} GiB ({ratio:.2f}x)")
    assert 0.5 <= ratio <= 2, (estimate.peak_bytes / GIB, measured / GIB)


# ---- the bounds, through the API ------------------------------------------------------------------------------


def test_specs_no_node_holds_are_refused_naming_the_field_the_estimate_and_the_bound(redis_server, tmp_path):
    """SCDD_NODE_MEMORY_GIB / SCDD_NODE_CPUS (the chart sets them from its worker groups), else this machine's: the
    MoCo queue, batches at any image size, candidates x crops and threads that no node holds are 422, one message
    per bound, each naming the field to lower, the estimate and where the bound is set."""
    settings = api_settings(redis_server.url, tmp_path, node_memory_gib=48, node_cpus=8)
    server = ApiServer(create_app(settings)).start()
    try:
        with server.client("key-acme") as acme:
            queue = acme.post("/v1/jobs", json=merged(SPEC, {"method": "scdd", "teacher": {"ssl": {
                "queue_size": 1_000_000, "proj_dim": 8192}}}))
            locs, message = refusal(queue)
            assert locs == [("body", "teacher", "ssl", "queue_size")]
            assert "an estimated peak of 66.6 GiB per process of this job (stage squeeze ssl; its largest term the " \
                   "MoCo queue: queue_size 1,000,000 x proj_dim 8,192 x 4 B, and its copy: 61.0 GiB" in message
            assert "more than the 48.0 GiB of the largest node a job can land on (SCDD_NODE_MEMORY_GIB): lower " \
                   "teacher.ssl.queue_size" in message
            for extra, field in [
                ({"dataset": {"image_size": 1024}, "teacher": {"batch_size": 65_536}}, "teacher.batch_size"),
                ({"method": "scdd", "teacher": {"ssl": {"batch_size": 65_536}}}, "teacher.ssl.batch_size"),
                ({"dataset": {"image_size": 256}, "validate": {"batch_size": 4096}}, "validate.batch_size"),
                ({"dataset": {"image_size": 64}, "recover": {"init": "selected", "select": {"candidates": 2000,
                                                                                          "crops": 1000}}},
                 "recover.select.crops"),
                ({"dataset": {"image_size": 1024}, "teacher": {"batch_size": 8}}, "dataset.image_size"),  # testing
            ]:
                locs, message = refusal(acme.post("/v1/jobs", json=merged(SPEC, extra)))
                assert locs == [("body", *field.split("."))], (field, message)
                assert f"(SCDD_NODE_MEMORY_GIB): lower {field}" in message
            locs, message = refusal(acme.post("/v1/jobs", json=merged(SPEC, {"resources": {"threads": 1024}})))
            assert locs == [("body", "resources", "threads")]
            assert "1024 CPU threads asked per process, more than the 8 CPUs of the largest node a job can land on " \
                   "(SCDD_NODE_CPUS): Ray could never place the job; lower resources.threads to 8 or less" in message
            assert acme.post("/v1/jobs", json=merged(SPEC, {"resources": {"threads": 8}})).status_code == 202
            assert acme.post("/v1/jobs", json=merged(SPEC, {"teacher": {"batch_size": 4096}})).status_code == 202
    finally:
        server.stop()
    # unset, the bounds are this machine's
    server = ApiServer(create_app(api_settings(redis_server.url, tmp_path))).start()
    try:
        with server.client("key-acme") as acme:
            huge = merged(SPEC, {"dataset": {"image_size": 1024}, "teacher": {"batch_size": 65_536},
                                 "resources": {"threads": 1024}})
            locs, message = refusal(acme.post("/v1/jobs", json=huge))
            assert locs == [("body", "resources", "threads"), ("body", "teacher", "batch_size")]
            assert f"more than the {os.cpu_count()} CPUs of the largest node a job can land on (this machine's CPU " \
                   f"count: set SCDD_NODE_CPUS to the largest node's)" in message
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
            assert f"more than the {memory:,.1f} GiB of the largest node a job can land on (this machine's memory: " \
                   f"set SCDD_NODE_MEMORY_GIB to the largest node's)" in message
    finally:
        server.stop()


def test_a_tenants_memory_limit_comes_from_its_key_file_else_the_setting(redis_server, tmp_path):
    from service.auth import ApiKeys, KeyConfigError, Limits, hash_key

    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"tenants": {
        "small": {"keys_sha256": [hash_key("key-small")], "limits": {"max_job_memory_gib": 1.0}},
        "plain": {"keys_sha256": [hash_key("key-plain")]}}}))
    settings = api_settings(redis_server.url, tmp_path, api_keys=None, api_keys_file=str(keys_file),
                            max_job_memory_gib=3)
    moco = merged(SPEC, {"method": "scdd", "teacher": {"ssl": {"queue_size": 1_000_000, "proj_dim": 256}}})
    server = ApiServer(create_app(settings)).start()
    try:
        with server.client("key-small") as small, server.client("key-plain") as plain:
            locs, message = refusal(small.post("/v1/jobs", json=SPEC))
            assert len(locs) == 1 and "an estimated peak of 1." in message
            assert "over the limit of 1 GiB per job for tenant 'small' (limits.max_job_memory_gib in the API key " \
                   "file, else SCDD_MAX_JOB_MEMORY_GIB)" in message
            assert plain.post("/v1/jobs", json=SPEC).status_code == 202
            locs, message = refusal(plain.post("/v1/jobs", json=moco))
            assert locs == [("body", "teacher", "ssl", "queue_size")]
            peak = estimate_memory(JobSpec.model_validate(moco), 2, 28).peak_bytes / GIB
            assert f"an estimated peak of {peak:.1f} GiB per process" in message and 3 < peak < 10
            assert "over the limit of 3 GiB per job for tenant 'plain' (limits.max_job_memory_gib in the API key " \
                   "file, else SCDD_MAX_JOB_MEMORY_GIB): lower teacher.ssl.queue_size" in message
    finally:
        server.stop()
    defaults = Limits(8, 10**9, 1000, 0)
    keys_file.write_text(yaml.safe_dump({"tenants": {"t": {"keys_sha256": [hash_key("k")],
                                                           "limits": {"max_job_memory_gib": 2.5}}}}))
    assert ApiKeys.load(None, str(keys_file), 4, defaults).tenant_for("k").limits.max_job_memory_gib == 2.5
    for bad in (0, -1, "lots", True):
        keys_file.write_text(yaml.safe_dump({"tenants": {"t": {"keys_sha256": [hash_key("k")],
                                                               "limits": {"max_job_memory_gib": bad}}}}))
        with pytest.raises(KeyConfigError, match="tenants.t.limits.max_job_memory_gib must be a positive number"):
            ApiKeys.load(None, str(keys_file), 4, defaults)


def test_images_kept_as_they_are_count_once_against_the_image_iteration_limit(redis_server, tmp_path):
    """recover.iterations 0 (the default herding init) makes no steps, but every image is still planned, scored and
    written: ipc x classes count as image-iterations, so ipc and the classes are bounded too."""
    server = ApiServer(create_app(api_settings(redis_server.url, tmp_path, max_image_iterations=1000))).start()
    try:
        with server.client("key-acme") as acme:
            kept = {"init": "herding", "iterations": 0, "select": {"candidates": 600}}
            locs, message = refusal(acme.post("/v1/jobs", json=merged(SPEC, {"recover": {**kept, "ipc": 600}})))
            assert locs == [("body", "recover", "ipc")]
            assert "recover.ipc: 1,200 images asked (ipc 600 x 2 classes; with recover.iterations 0 each image " \
                   "counts as one image-iteration), over the limit of 1,000 image-iterations per job for tenant " \
                   "'acme' (limits.max_image_iterations in the API key file, else SCDD_MAX_IMAGE_ITERATIONS)" in message
            assert acme.post("/v1/jobs", json=merged(SPEC, {"recover": {**kept, "ipc": 500}})).status_code == 202
            steps = refusal(acme.post("/v1/jobs", json=merged(SPEC, {"recover": {"ipc": 10, "iterations": 51}})))[1]
            assert "recover.iterations: 1,020 image-iterations asked (ipc 10 x 2 classes x 51 iterations)" in steps
    finally:
        server.stop()


def test_a_resume_onto_fewer_workers_is_refused_when_one_process_would_not_fit(redis_server, tmp_path):
    """A training batch is split over the Ray Train ranks: on 2 workers each holds half of it. Resuming on 1 worker
    (allowed for the images: no recover steps) would put the whole batch in one process: the resume route checks
    the new worker count against the node's memory like a submission."""
    server = ApiServer(create_app(api_settings(redis_server.url, tmp_path, node_memory_gib=40))).start()
    try:
        with server.client("key-acme") as acme:
            wide = merged(SPEC, {"dataset": {"image_size": 64}, "teacher": {"batch_size": 4096},
                                 "recover": {"init": "real", "iterations": 0}, "resources": {"workers": 2}})
            job = acme.post("/v1/jobs", json=wide)
            assert job.status_code == 202, job.text
            acme.post(f"/v1/jobs/{job.json()['id']}/cancel")
            locs, message = refusal(acme.post(f"/v1/jobs/{job.json()['id']}/resume", json={"workers": 1}))
            assert locs == [("body", "teacher", "batch_size")]
            assert "teacher training: convnet activations of a batch of 4096 at 64 px" in message
            assert "more than the 40.0 GiB of the largest node a job can land on (SCDD_NODE_MEMORY_GIB)" in message
            resumed = acme.post(f"/v1/jobs/{job.json()['id']}/resume", json={"workers": 3})
            assert resumed.status_code == 202, resumed.text
    finally:
        server.stop()


# ---- the paths a spec reads ------------------------------------------------------------------------------------

_FS_EVENTS = ("open", "os.scandir", "os.listdir")
_recording: list[list[tuple[str, str, int]]] = []


def _audit(event: str, args: tuple) -> None:
    if _recording and event in _FS_EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _recording[-1].append((event, os.fsdecode(args[0]), threading.get_ident()))


sys.addaudithook(_audit)  # hooks stay for the process: it records only while a test appends a list


def test_paths_must_be_absolute_and_are_read_off_the_event_loop(redis_server, tmp_path, monkeypatch):
    """A relative path would be checked against the API's working directory and opened against the job's: every path
    a spec reads is refused unless absolute (or an object-store URL). What admission reads of them (the dataset
    root's class folders, an image header, a checkpoint's pickle) it reads in a worker thread, never on the event
    loop, on submit and on resume (recorded with a real audit hook on the API in this process)."""
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "data" / "train" / name).mkdir(parents=True)
        Image.new("RGB", (40, 30)).save(tmp_path / "data" / "train" / name / "0.png")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "teacher.pt")
    monkeypatch.chdir(tmp_path)  # the API's working directory: each relative path below lies inside a data root
    server = ApiServer(create_app(api_settings(redis_server.url, tmp_path))).start()
    try:
        with server.client("key-acme") as acme:
            relative = {"dataset": {"name": "imagefolder", "root": "data"},
                        "teacher": {"checkpoint": "teacher.pt", "ssl": {"checkpoint": "./teacher.pt"}},
                        "validate": {"relabel_teacher": "ensemble",
                                     "relabel_checkpoints": [str(tmp_path / "teacher.pt"), "teacher.pt"]}}
            locs, message = refusal(acme.post("/v1/jobs", json=merged(SPEC, relative)))
            assert locs == [("body", "dataset", "root"), ("body", "teacher", "checkpoint"),
                            ("body", "teacher", "ssl", "checkpoint"), ("body", "validate", "relabel_checkpoints", "1")]
            assert "dataset.root: 'data' is a relative path: a job runs in another folder than the API, so give the " \
                   "absolute path (e.g. under /usr/share/datasets) or an object-store URL" in message
            evaluate = {"kind": "evaluate", "dataset": {"name": "imagefolder", "root": str(tmp_path / "data")},
                        "evaluate": {"images": "set"}}
            assert refusal(acme.post("/v1/jobs", json=evaluate))[0] == [("body", "evaluate", "images")]
            relabel = merged(SPEC, {"validate": {"relabel_teacher": "supervised", "relabel_checkpoint": "teacher.pt"}})
            assert refusal(acme.post("/v1/jobs", json=relabel))[0] == [("body", "validate", "relabel_checkpoint")]

            absolute = {"method": "sre2l", "dataset": {"name": "imagefolder", "root": str(tmp_path / "data")},
                        "teacher": {"checkpoint": str(tmp_path / "teacher.pt")},
                        "recover": {"init": "real", "ipc": 1}, "resources": {"workers": 2}}
            _recording.append([])
            try:
                job = acme.post("/v1/jobs", json=absolute)
                assert job.status_code == 202, job.text
                submitted = _recording[-1][:]
                acme.post(f"/v1/jobs/{job.json()['id']}/cancel")
                resumed = acme.post(f"/v1/jobs/{job.json()['id']}/resume", json={"workers": 1})
                assert resumed.status_code == 202, resumed.text
                on_resume = _recording[-1][len(submitted):]
            finally:
                events = _recording.pop()
    finally:
        server.stop()
    mine = [(event, path, thread) for event, path, thread in events if path.startswith(str(tmp_path / "data"))
            or path == str(tmp_path / "teacher.pt")]
    seen = {(event, os.path.relpath(path, tmp_path)) for event, path, _ in mine}
    assert {("os.scandir", "data/train"), ("open", "data/train/cat/0.png"), ("open", "teacher.pt")} <= seen, seen
    assert any(event == "os.scandir" for event, path, _ in on_resume if path.startswith(str(tmp_path / "data")))
    assert all(thread != server.thread.ident for _, _, thread in mine), mine  # none on the event loop
