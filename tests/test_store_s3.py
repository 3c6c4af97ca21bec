"""The artifact store on s3:// against a real S3-compatible server on loopback (moto's server mode),
reached through s3fs/aiobotocore over HTTP exactly as AWS S3, MinIO or Ceph would be: no client mock."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import pickle
import socket
import subprocess
import sys
import uuid

import boto3
import pytest
import torch

from api_schema import DatasetSpec, JobSpec
from api_schema.spec import OutputSpec
from scdd.artifacts import decode_png, encode_png, entry_for, to_uint8
from scdd.data import load_dataset
from scdd.errors import DataError
from scdd.pipeline import run_distillation
from scdd.store import ArtifactStore, open_store
from tests.conftest import tiny_job

BUCKET = "scdd-artifacts"
# Fake credentials, and every other setting botocore would pick up from this machine cleared, so
# the tests see only the server below (and never a developer's ~/.aws or a cloud metadata service).
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}
CLEARED_AWS_ENV = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                   "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION")


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 (free port) holding one empty bucket; its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with pytest.MonkeyPatch.context() as env:
        for name, value in FAKE_AWS_ENV.items():
            env.setenv(name, value)
        for name in CLEARED_AWS_ENV:
            env.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            s3_client(endpoint).create_bucket(Bucket=BUCKET)
            yield endpoint
        finally:
            server.stop()
            # fsspec keeps one S3FileSystem per set of arguments, and one made from the environment (no endpoint
            # argument) would point the next module's tests at this stopped server
            from s3fs import S3FileSystem

            S3FileSystem.clear_instance_cache()


@pytest.fixture
def aws_env(s3_endpoint, monkeypatch):
    """The fake credentials for one test (the module fixture's are undone between modules)."""
    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    for name in CLEARED_AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    return s3_endpoint


def s3_client(endpoint: str):
    """An independent client (boto3, not the store's s3fs) to set up and to check what is really stored."""
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def fresh_prefix() -> str:
    return f"runs/{uuid.uuid4().hex[:8]}"


def stored_objects(endpoint: str, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix/` as the server holds it, keyed by its path below the prefix."""
    client = s3_client(endpoint)
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/")
            for o in page.get("Contents", [])]
    return {k[len(prefix) + 1:]: client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}


def test_images_and_manifest_round_trip_with_checksums(aws_env, fmnist_root):
    endpoint, prefix = aws_env, fresh_prefix()
    info = load_dataset(DatasetSpec(root=str(fmnist_root), classes=[0, 1, 2], train_limit=5), seed=0).info
    output = OutputSpec(url=f"s3://{BUCKET}/{prefix}", s3={"endpoint_url": endpoint})
    store = open_store(output)
    assert store.list() == [] and store.list("images") == [] and not store.exists("images")

    # As recover's run_share writes them: PNG bytes of [0, 1] pixels, one manifest entry per image.
    generator = torch.Generator().manual_seed(0)
    pixels, entries = {}, []
    for round_index in range(2):
        for label in range(info.num_classes):
            image = torch.rand(info.channels, info.image_size, info.image_size, generator=generator)
            data = encode_png(image)
            entry = entry_for(info, label, round_index, data)
            store.write_bytes(entry.path, data)
            pixels[entry.path] = image
            entries.append(entry)
    store.write_json("manifest.json", {"images": [e.to_dict() for e in entries]})

    paths = sorted(e.path for e in entries)
    assert paths[0] == "images/0-T-shirt_top/0_0000.png" and len(paths) == 6
    assert store.list("images") == paths and store.exists("images") and store.exists(paths[-1])
    assert set(stored_objects(endpoint, prefix)) == {*paths, "manifest.json"}

    unpickled = pickle.loads(pickle.dumps(store))
    assert unpickled == store and unpickled.fs is not store.fs  # rebuilt, not shared
    for reader in (open_store(output), unpickled, store.reopen()):
        manifest = reader.read_json("manifest.json")
        assert [m["path"] for m in manifest["images"]] == [e.path for e in entries]
        assert reader.list("images") == paths
        for item in manifest["images"]:
            data = reader.read_bytes(item["path"])
            assert len(data) == item["bytes"] and hashlib.sha256(data).hexdigest() == item["sha256"]
            decoded = decode_png(data, info.channels)
            assert (decoded[0].numpy() == to_uint8(pixels[item["path"]])).all()


def test_pickled_store_works_in_another_process(aws_env):
    """What a Ray worker gets: the URL and options, no live connection; it writes, the parent sees it."""
    store = open_store(OutputSpec(url=f"s3://{BUCKET}/{fresh_prefix()}", s3={"endpoint_url": aws_env}))
    store.write_bytes("from-parent.bin", b"parent")
    child = (
        "import pickle, sys\n"
        "store = pickle.load(sys.stdin.buffer)\n"
        "assert store.read_bytes('from-parent.bin') == b'parent'\n"
        "store.write_bytes('images/c/from-child.png', b'child')\n"
    )
    done = subprocess.run([sys.executable, "-c", child], input=pickle.dumps(store), capture_output=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr.decode()
    # The parent's listing is not stale: the store drops s3fs's listing cache before listing.
    assert store.list() == ["from-parent.bin", "images/c/from-child.png"]
    assert store.read_bytes("images/c/from-child.png") == b"child"


def test_endpoint_from_the_spec(aws_env):
    store = open_store(OutputSpec(url=f"s3://{BUCKET}/{fresh_prefix()}", s3={"endpoint_url": aws_env,
                                                                              "region": "us-east-1"}))
    assert store.storage_options["endpoint_url"] == aws_env
    assert store.storage_options["client_kwargs"] == {"region_name": "us-east-1"}
    store.write_json("a.json", {"x": 1})
    assert store.read_json("a.json") == {"x": 1} and store.list() == ["a.json"]


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_endpoint_from_the_environment(aws_env, monkeypatch, variable):
    monkeypatch.setenv(variable, aws_env)
    prefix = fresh_prefix()
    store = open_store(OutputSpec(url=f"s3://{BUCKET}/{prefix}"))
    assert "endpoint_url" not in store.storage_options  # botocore resolves it, in every process
    store.write_bytes("b.bin", b"\x00\x01")
    assert stored_objects(aws_env, prefix) == {"b.bin": b"\x00\x01"}


def test_credentials_from_a_named_profile(aws_env, monkeypatch, tmp_path):
    credentials = tmp_path / "credentials"
    credentials.write_text("[scdd-test]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = open_store(OutputSpec(url=f"s3://{BUCKET}/{fresh_prefix()}",
                                  s3={"endpoint_url": aws_env, "profile": "scdd-test"}))
    store.write_bytes("c.bin", b"c")
    assert store.list() == ["c.bin"]


def test_missing_bucket_is_named_with_the_fix(aws_env):
    with pytest.raises(DataError, match=r"bucket 'no-such-bucket' of s3://no-such-bucket/run does not exist.*create it"):
        open_store(OutputSpec(url="s3://no-such-bucket/run", s3={"endpoint_url": aws_env}))
    # A store built without open_store's check fails as clearly on its first list or write.
    store = ArtifactStore("s3://no-such-bucket/run", endpoint_url=aws_env)
    with pytest.raises(DataError, match=r"cannot list s3://no-such-bucket/run/images: .*bucket .* must exist"):
        store.list("images")
    with pytest.raises(DataError, match=r"cannot write s3://no-such-bucket/run/x.png: .*create it"):
        store.write_bytes("x.png", b"x")


@pytest.mark.parametrize("url", ["s3://", "s3:///run", "s3a:///run"])
def test_url_without_bucket_is_refused(aws_env, url):
    with pytest.raises(DataError, match=r"names no bucket; write it as s3a?://<bucket>/<prefix>"):
        open_store(OutputSpec(url=url, s3={"endpoint_url": aws_env}))


def test_missing_credentials_are_named(aws_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(DataError, match=r"cannot open s3://scdd-artifacts/run: Unable to locate credentials; "
                                        r"set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        open_store(OutputSpec(url=f"s3://{BUCKET}/run", s3={"endpoint_url": aws_env}))
    with pytest.raises(DataError, match=r"profile \(absent\) could not be found; set AWS_ACCESS_KEY_ID"):
        open_store(OutputSpec(url=f"s3://{BUCKET}/run", s3={"endpoint_url": aws_env, "profile": "absent"}))


def test_unreachable_endpoint_is_named(aws_env):
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    # One attempt instead of botocore's retries (about 6-10 s here), to keep the test short.
    store = ArtifactStore(f"s3://{BUCKET}/run", endpoint_url=dead, config_kwargs={"retries": {"max_attempts": 1}})
    with pytest.raises(DataError, match=r"cannot open s3://scdd-artifacts/run: Could not connect .*check the endpoint "
                                        r"\(output.s3.endpoint_url, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL\)"):
        store.check_writable()


def test_missing_s3fs_is_named(monkeypatch):
    registry = importlib.import_module("fsspec.registry")  # the module (fsspec.registry is a mapping)
    monkeypatch.delitem(registry._registry, "s3", raising=False)
    monkeypatch.setitem(sys.modules, "s3fs", None)  # import s3fs -> ImportError
    with pytest.raises(DataError, match=r"s3://bucket/run needs the fsspec backend for s3://.*pip install s3fs"):
        ArtifactStore("s3://bucket/run")


def test_distillation_run_into_s3_resumes_and_matches_its_manifest(aws_env, fmnist_root, tmp_path):
    endpoint, prefix = aws_env, fresh_prefix()
    url = f"s3://{BUCKET}/{prefix}"
    spec = JobSpec.model_validate(tiny_job(fmnist_root, url, output={"s3": {"endpoint_url": endpoint}}))
    assert spec.recover_digest() == JobSpec.model_validate(tiny_job(fmnist_root, tmp_path)).recover_digest()

    report = run_distillation(spec)
    assert report.output == url and report.complete and report.recover.images == 9

    objects = stored_objects(endpoint, prefix)
    manifest = json.loads(objects["manifest.json"])
    assert manifest["complete"] and manifest["spec"]["output"]["s3"]["endpoint_url"] == endpoint
    images = {k for k in objects if k.startswith("images/")}
    assert images == {e["path"] for e in manifest["images"]} and len(images) == 9
    for entry in manifest["images"]:
        data = objects[entry["path"]]
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert {"report.json", "grid.png", "teacher/teacher.pt", "state/spec.json"} <= set(objects)
    assert json.loads(objects["report.json"]) == report.to_json_dict()

    again = run_distillation(spec)  # a new store on the same URL finds the finished units
    assert again.resumed and again.recover.units_run == 0
    assert {k: v for k, v in stored_objects(endpoint, prefix).items() if k.startswith("images/")} == {
        k: objects[k] for k in images}


def test_the_api_sees_files_a_job_writes_after_an_earlier_listing(aws_env, monkeypatch):
    """The API reads artifacts through fsspec's cached filesystem instance: a listing must not hide files
    written later (report.json, manifest.json) until the process restarts."""
    from service.artifacts import JobArtifacts

    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_env)
    prefix, client = fresh_prefix(), s3_client(aws_env)
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/images/a.png", Body=b"a")
    url = f"s3://{BUCKET}/{prefix}"
    first = JobArtifacts(url)
    assert first.list() == [("images/a.png", 1)] and first.locate("report.json") is None
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/report.json", Body=b"{}")  # the job goes on writing
    later = JobArtifacts(url)  # one per request, on the same cached filesystem
    assert later.fs is first.fs
    assert later.list() == [("images/a.png", 1), ("report.json", 2)]
    full = later.locate("report.json")
    assert full is not None and b"".join(later.stream(full)) == b"{}"
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/images/b.png", Body=b"bb")  # in a folder listed before
    assert later.locate("images/b.png") is not None and ("images/b.png", 2) in JobArtifacts(url).list()
