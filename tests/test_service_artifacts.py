"""A job's artifacts at cluster scale, over HTTP (uvicorn on loopback) against a real redis-server: a 1000-class
IPC-50 job (50 000 PNGs, a 16 MB manifest, thousands of state/ records) pages fast, hides state/, and downloads as
one streamed zip whose memory does not follow the file count; download links and their limits."""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import tracemalloc
import zipfile
from pathlib import Path

import httpx
import pytest
import redis

from service.api.main import create_app
from service.api.archive_links import sign_link
from service.artifacts import MANIFESTS
from tests.services import ApiServer, RedisServer, api_settings, wait_until
from tests.test_store_s3 import BUCKET, aws_env, fresh_prefix, s3_client, s3_endpoint  # noqa: F401 (fixtures)

SPEC = {"method": "sre2l", "dataset": {"classes": [0, 1]}, "recover": {"ipc": 1, "iterations": 2}}
TOP = {"manifest.json", "report.json", "grid.png", "teacher/teacher.pt"}


@functools.cache
def tiny_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 60)).save(buffer, format="PNG")
    return buffer.getvalue()


def class_dir(label: int) -> str:
    return f"n{label:08d}"


def fabricate_job(prefix: Path, classes: int, ipc: int, state_files: int = 0, manifest: bool = True) -> list[str]:
    """A finished job's folder as scdd writes it, made fast: the same tiny real PNG as every image
    (images/<class dir>/<class>_<round>.png), manifest.json in write_manifest's format (indented, sorted keys:
    ~330 bytes per image), report.json, grid.png, teacher/teacher.pt and `state_files` resume records under
    state/. Returns the image paths."""
    png, paths, entries = tiny_png(), [], []
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "grid.png").write_bytes(png)
    for label in range(classes):
        folder = prefix / "images" / class_dir(label)
        folder.mkdir(parents=True)
        for round_index in range(ipc):
            name = f"{label}_{round_index:04d}.png"
            os.link(prefix / "grid.png", folder / name)  # the same bytes, 4x faster to make than a written copy
            path = f"images/{class_dir(label)}/{name}"
            paths.append(path)
            entries.append({"path": path, "class_name": f"class {label}", "class_dir": class_dir(label),
                            "class_index": label, "label": label, "round": round_index, "sha256": "0" * 64,
                            "bytes": len(png), "worker": label % 8, "origin": None})
    if manifest:
        (prefix / "manifest.json").write_text(json.dumps({
            "job_id": "fabricated", "complete": True, "partial": False, "seed": 0, "spec": {}, "versions": {},
            "classes": [{"label": i, "name": f"class {i}", "dir": class_dir(i), "source_index": i}
                        for i in range(classes)],
            "images": entries}, indent=2, sort_keys=True))
    (prefix / "report.json").write_text('{"ok": true}')
    (prefix / "teacher").mkdir(exist_ok=True)
    (prefix / "teacher" / "teacher.pt").write_bytes(b"weights" * 100)
    units = prefix / "state" / "units"
    units.mkdir(parents=True, exist_ok=True)
    for n in range(state_files):
        (units / f"r{n:05d}-b000.json").write_text("{}")
    return paths


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """redis-server and the API for the whole module (one 50 000-image job is made once for several tests)."""
    memory = Path("/dev/shm")  # tmpfs where there is one: 50 000 files are made 4x faster than on disk
    folder = Path(tempfile.mkdtemp(dir=memory)) if memory.is_dir() and os.access(memory, os.W_OK) \
        else tmp_path_factory.mktemp("artifacts-api")
    store = RedisServer(folder / "redis").start()
    server = ApiServer(create_app(api_settings(store.url, folder))).start()
    server.folder, server.redis_url = folder, store.url
    yield server
    server.stop()
    store.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def acme(service):
    with service.client("key-acme") as client:
        yield client


def new_job(client: httpx.Client, folder: Path) -> tuple[str, Path]:
    """A queued job (no Ray here) and its artifact folder."""
    answer = client.post("/v1/jobs", json=SPEC)
    assert answer.status_code == 202, answer.text
    job = answer.json()
    return job["id"], folder / "artifacts" / "acme" / job["id"]


@pytest.fixture(scope="module")
def big_job(service, acme):
    """A 1000-class IPC-50 job: 50 000 images, a ~16 MB manifest, 2 000 state/ files."""
    job_id, prefix = new_job(acme, service.folder)
    started = time.perf_counter()
    images = fabricate_job(prefix, classes=1000, ipc=50, state_files=2000)
    print(f"\nfabricated 50 000 images + manifest ({(prefix / 'manifest.json').stat().st_size / 2**20:.1f} MiB) "
          f"in {time.perf_counter() - started:.1f} s")
    return job_id, prefix, images


def all_pages(client: httpx.Client, job_id: str, **params) -> tuple[list[dict], list[str], list[float]]:
    files, folders, seconds, cursor = [], [], [], None
    while True:
        started = time.perf_counter()
        answer = client.get(f"/v1/jobs/{job_id}/artifacts", params={**params, **({"cursor": cursor} if cursor else {})})
        seconds.append(time.perf_counter() - started)
        assert answer.status_code == 200, answer.text
        page = answer.json()
        files += page["files"]
        folders += page["folders"]
        if not (cursor := page["next_cursor"]):
            return files, folders, seconds


def test_a_50000_image_job_pages_in_path_order_fast_without_state(acme, big_job):
    job_id, _, images = big_job
    MANIFESTS.clear()
    started = time.perf_counter()
    first = acme.get(f"/v1/jobs/{job_id}/artifacts", params={"limit": 1})
    cold = time.perf_counter() - started
    assert first.status_code == 200 and first.json()["files"] == [{"path": "grid.png", "size": len(tiny_png())}]

    files, folders, seconds = all_pages(acme, job_id)  # 1000 a page: 51 pages
    paths = [f["path"] for f in files]
    assert paths == sorted(set(images) | TOP) and not folders
    assert all(f["size"] == len(tiny_png()) for f in files if f["path"].startswith("images/"))
    p50, p99 = statistics.median(seconds), statistics.quantiles(seconds, n=100)[98]
    print(f"\n{len(seconds)} pages of 1000: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max "
          f"{max(seconds) * 1000:.1f} ms; the first page {cold * 1000:.0f} ms")
    assert p99 < 0.2 and cold < 0.2, (cold, seconds)


def test_prefix_delimiter_and_cursor_select_what_a_class_browser_needs(acme, big_job):
    job_id, _, images = big_job
    one = acme.get(f"/v1/jobs/{job_id}/artifacts", params={"prefix": "images/n00000003/"}).json()
    assert [f["path"] for f in one["files"]] == [p for p in images if p.startswith("images/n00000003/")]
    assert len(one["files"]) == 50 and one["next_cursor"] is None
    top = acme.get(f"/v1/jobs/{job_id}/artifacts", params={"delimiter": "/"}).json()
    assert top == {"files": [{"path": p, "size": top["files"][i]["size"]} for i, p in
                             enumerate(["grid.png", "manifest.json", "report.json"])],
                   "folders": ["images/", "teacher/"], "next_cursor": None}  # no state/
    _, classes, _ = all_pages(acme, job_id, prefix="images/", delimiter="/", limit=300)
    assert classes == [f"images/{class_dir(i)}/" for i in range(1000)]
    partial = acme.get(f"/v1/jobs/{job_id}/artifacts", params={"prefix": "images/n0000099", "delimiter": "/"}).json()
    assert partial["folders"] == [f"images/n0000099{i}/" for i in range(10)] and partial["files"] == []
    assert acme.get(f"/v1/jobs/{job_id}/artifacts", params={"prefix": "state/"}).json()["files"] == []
    for params, status, words in (({"prefix": "../x"}, 400, "not a plain relative path"),
                                  ({"prefix": "images/%2e%2e/"}, 400, "not a plain relative path"),
                                  ({"cursor": "@@@"}, 400, "next_cursor of the previous page"),
                                  ({"limit": 0}, 422, "limit"), ({"limit": 5001}, 422, "limit"),
                                  ({"delimiter": ","}, 422, "delimiter")):
        answer = acme.get(f"/v1/jobs/{job_id}/artifacts", params=params)
        assert answer.status_code == status and words in answer.text, (params, answer.text)


def test_state_is_never_downloadable(acme, big_job):
    job_id, prefix, _ = big_job
    assert (prefix / "state" / "units" / "r00000-b000.json").exists()
    answer = acme.get(f"/v1/jobs/{job_id}/artifacts/state/units/r00000-b000.json")
    assert answer.status_code == 404 and "has no artifact" in answer.json()["detail"]
    assert acme.get(f"/v1/jobs/{job_id}/artifacts/images/n00000000/0_0000.png").content == tiny_png()


def test_the_archive_of_50000_images_is_a_stored_zip_made_in_bounded_memory(acme, big_job, tmp_path):
    job_id, _, images = big_job
    path = tmp_path / "all.zip"
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        started = time.perf_counter()
        with acme.stream("GET", f"/v1/jobs/{job_id}/archive") as answer, open(path, "wb") as out:
            assert answer.status_code == 200 and answer.headers["content-type"] == "application/zip"
            for chunk in answer.iter_raw():
                out.write(chunk)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    print(f"\narchive of {len(images)} images: {path.stat().st_size / 2**20:.1f} MiB in {seconds:.1f} s (traced), "
          f"peak Python memory +{peak / 2**20:.2f} MiB")
    assert peak < 3 * 2**20
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        assert sorted(i.filename for i in infos) == sorted(f"{job_id}/{p}" for p in set(images) | TOP)
        assert {i.compress_type for i in infos} == {zipfile.ZIP_STORED}
        assert archive.read(f"{job_id}/images/n00000999/999_0049.png") == tiny_png()
        assert archive.read(f"{job_id}/teacher/teacher.pt") == b"weights" * 100
    test = subprocess.run(["unzip", "-tq", str(path)], capture_output=True, text=True)
    assert test.returncode == 0 and "No errors" in test.stdout, test.stdout + test.stderr


def test_archives_are_bounded_per_tenant(service, acme, big_job):
    job_id, _, _ = big_job
    with service.client("key-acme") as first, service.client("key-acme") as second, \
            service.client("key-acme") as third:
        with first.stream("GET", f"/v1/jobs/{job_id}/archive") as a, \
                second.stream("GET", f"/v1/jobs/{job_id}/archive") as b:
            assert a.status_code == b.status_code == 200  # both held open, unread
            refused = third.get(f"/v1/jobs/{job_id}/archive")
            assert refused.status_code == 429 and refused.headers["retry-after"] == "10"
            assert "2 archive downloads running, its limit (SCDD_MAX_ARCHIVES_PER_TENANT)" in refused.json()["detail"]

    def accepted() -> bool:  # the slots of abandoned downloads come back
        with third.stream("GET", f"/v1/jobs/{job_id}/archive") as again:
            return again.status_code == 200

    with service.client("key-acme") as third:  # at once (not when the collector finds the abandoned generators)
        wait_until(accepted, 2, "the archive slots to come back", interval=0.1)


def test_a_signed_link_downloads_without_the_key_for_its_job_until_it_expires(service, acme, big_job, tmp_path):
    job_id, _, _ = big_job
    other_id, other_prefix = new_job(acme, service.folder)
    fabricate_job(other_prefix, classes=2, ipc=2)
    link = acme.post(f"/v1/jobs/{other_id}/archive-link").json()
    assert link["url"].startswith(f"/v1/jobs/{other_id}/archive?token=")
    assert 290 < link["expires_at"] - time.time() <= 300
    with service.client() as anonymous, service.client("key-globex") as globex:
        answer = anonymous.get(link["url"])
        assert answer.status_code == 200
        names = zipfile.ZipFile(io.BytesIO(answer.content)).namelist()
        assert len(names) == 4 + len(TOP) and f"{other_id}/manifest.json" in names
        token = link["url"].split("token=")[1]
        for url, why in ((f"/v1/jobs/{job_id}/archive?token={token}", "not valid for job"),  # another job
                         (f"{link['url'][:-3]}abc", "not valid for job"), (f"{link['url']}.x", "not valid for job"),
                         (f"/v1/jobs/{other_id}/archive?token=garbage", "not valid for job")):
            refused = anonymous.get(url)
            assert refused.status_code == 401 and why in refused.json()["detail"], url
            assert "ask for a new one: POST /v1/jobs/{id}/archive-link" in refused.json()["detail"]
        secret = redis.Redis.from_url(service.redis_url).get("scdd:link-secret")
        expired = sign_link(secret, "acme", other_id, int(time.time()) - 5)
        refused = anonymous.get(f"/v1/jobs/{other_id}/archive?token={expired}")
        assert refused.status_code == 401 and "expired" in refused.json()["detail"]
        assert anonymous.get(f"/v1/jobs/{other_id}/archive").status_code == 401  # neither key nor token
        assert globex.post(f"/v1/jobs/{other_id}/archive-link").status_code == 404  # not globex's job
    # another replica on the same Redis shares the key: its links work here and the other way round
    replica = ApiServer(create_app(api_settings(service.redis_url, service.folder))).start()
    try:
        with replica.client("key-acme") as there, service.client() as anonymous:
            assert anonymous.get(there.post(f"/v1/jobs/{other_id}/archive-link").json()["url"]).status_code == 200
    finally:
        replica.stop()


def test_a_running_job_lists_its_folder_but_not_names_it_cannot_serve_and_refuses_their_zip(acme, service):
    job_id, prefix = new_job(acme, service.folder)
    images = fabricate_job(prefix, classes=3, ipc=4, state_files=5, manifest=False)  # no manifest: still running
    png = tiny_png()
    for bad in ("a%b", "c\\d"):  # class folders of an older scdd: the single-file route refuses such names
        (prefix / "images" / bad).mkdir()
        (prefix / "images" / bad / "0.png").write_bytes(png)
    (prefix / "notes.txt").write_text("not archived")
    (prefix / "leak").symlink_to(prefix.parent)
    files, _, _ = all_pages(acme, job_id, limit=5)  # pages cut inside folders, from a lazy walk of the folder
    listed = sorted(set(images) | TOP - {"manifest.json"} | {"notes.txt"})
    assert [f["path"] for f in files] == listed  # what the listing shows downloads: not images/a%b/0.png
    assert acme.get(f"/v1/jobs/{job_id}/artifacts/images/a%25b/0.png").status_code == 400

    refused = acme.get(f"/v1/jobs/{job_id}/archive")  # refused before it starts, not a zip that misses them
    assert refused.status_code == 409 and "'images/a%b/0.png', 'images/c\\\\d/0.png'" in refused.json()["detail"]
    shutil.rmtree(prefix / "images" / "a%b")
    answer = acme.get(f"/v1/jobs/{job_id}/archive")
    assert answer.status_code == 409 and "1 file(s)" in answer.json()["detail"]
    shutil.rmtree(prefix / "images" / "c\\d")
    answer = acme.get(f"/v1/jobs/{job_id}/archive")
    assert answer.status_code == 200
    archive = zipfile.ZipFile(io.BytesIO(answer.content))
    assert archive.testzip() is None
    assert sorted(archive.namelist()) == sorted([f"{job_id}/{p}" for p in images] + [
        f"{job_id}/report.json", f"{job_id}/grid.png", f"{job_id}/teacher/teacher.pt"])
    for bad in ("a%b", "c\\d"):
        (prefix / "images" / bad).mkdir()
        (prefix / "images" / bad / "0.png").write_bytes(png)

    # a local folder lists what it holds, whatever its manifest says (object stores list from it: the s3 test)
    (prefix / "manifest.json").write_text(json.dumps({"images": [{"path": images[0], "bytes": len(png)}]}))
    files, _, _ = all_pages(acme, job_id, prefix="images/")
    assert [f["path"] for f in files] == sorted(images)
    empty_id, _ = new_job(acme, service.folder)
    assert acme.get(f"/v1/jobs/{empty_id}/archive").status_code == 404  # nothing written yet


def test_the_zip_writer_goes_zip64_past_65535_entries_and_4_gib_entries():
    from service.archive import ZipWriter

    writer, out = ZipWriter(), io.BytesIO()
    for i in range(66000):
        out.writelines(writer.entry(f"d/{i}", (b"x",), 1))
    out.writelines(writer.entry("big", [b"abc"], 2**32))  # listed at 4 GiB: ZIP64 sizes in its descriptor
    out.writelines(writer.finish())
    archive = zipfile.ZipFile(out)
    assert len(archive.infolist()) == 66001 and archive.read("d/65999") == b"x" and archive.read("big") == b"abc"
    assert archive.testzip() is None


def test_an_object_store_job_lists_from_its_manifest_and_zips_with_one_get_per_file(aws_env, monkeypatch):
    """The s3 path (moto's server): listings by folder while running (state/ not even listed), from the manifest
    after; the zip reads each file with GETs only (ranged for a large one), never a HEAD per file."""
    from service.archive import StoreReader, zip_stream
    from service.artifacts import JobArtifacts

    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_env)
    monkeypatch.setattr(StoreReader, "CHUNK", 1 << 20)  # the teacher below is read in 3 ranged GETs
    prefix, client, png = fresh_prefix(), s3_client(aws_env), tiny_png()
    objects = {"images/n0/0.png": png, "images/n0/1.png": png, "images/n1/0.png": png, "images/a%b/0.png": png,
               "report.json": b"{}", "teacher/teacher.pt": os.urandom(2 * 2**20 + 5), "state/units/r0.json": b"{}"}
    for key, body in objects.items():
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{key}", Body=body)
    artifacts = JobArtifacts(f"s3://{BUCKET}/{prefix}")
    visible = sorted(key for key in objects if not key.startswith("state/") and key != "images/a%b/0.png")
    assert [path for path, _ in artifacts.page(limit=2).files] == visible[:2]
    assert [path for path, _ in artifacts.list()] == visible  # not a name the API cannot serve
    assert artifacts.page("images/", delimiter=True).folders == ["images/n0/", "images/n1/"]

    def zipped() -> zipfile.ZipFile:
        entries = artifacts.archive_entries()  # the listing (and the manifest's version) is read here
        with pytest.MonkeyPatch.context() as calls:
            for name in ("info", "exists", "isfile", "size"):  # nothing but GETs from here on
                calls.setattr(artifacts.fs, name, lambda *a, **k: pytest.fail("a per-file metadata call"))
            return zipfile.ZipFile(io.BytesIO(b"".join(zip_stream(artifacts, entries, "job"))))

    archive = zipped()
    assert archive.read("job/teacher/teacher.pt") == objects["teacher/teacher.pt"]
    assert sorted(archive.namelist()) == sorted([f"job/{k}" for k in visible] + ["job/SKIPPED.txt"])  # the check
    # of last resort (the route refuses such an archive before it starts: test_a_running_job_lists_its_folder_...)
    manifest = json.dumps({"images": [{"path": "images/n0/0.png", "bytes": len(png)}]}).encode()
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/manifest.json", Body=manifest)
    assert [path for path, _ in artifacts.list()] == [
        "images/n0/0.png", "manifest.json", "report.json", "teacher/teacher.pt"]
    assert sorted(zipped().namelist()) == ["job/images/n0/0.png", "job/manifest.json", "job/report.json",
                                           "job/teacher/teacher.pt"]
