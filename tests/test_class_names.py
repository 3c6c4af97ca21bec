"""Class names that a folder of the output cannot carry through the job service (`%`, a backslash, control
characters): a real ImageFolder with such classes is distilled into safe class folders, with the names in the
manifest; the API lists, serves and zips every file of it; a set is read back through its manifest (or its folders)
with the right classes. An older output that holds such a folder is never listed, and its zip is refused before
it starts."""

from __future__ import annotations

import io
import json
import re
import shutil
import zipfile
from pathlib import Path
from urllib.parse import quote

import pytest

from api_schema import JobSpec
from service.api.main import create_app
from service.artifacts import check_relative
from tests.conftest import quick_resources
from tests.services import ApiServer, api_settings
from tests.test_data import make_imagefolder
from tests.test_service_artifacts import all_pages, fabricate_job, tiny_png
from tests.test_service_events import new_job

# sorted as the ImageFolder dataset sorts its class folders: their labels are 0..4
CLASSES = ("50% off", "back\\slash", "plain", "with space", "ünïcødé 猫")
FOLDERS = ("c00000-50_off", "c00001-back_slash", "plain", "with space", "ünïcødé 猫")


@pytest.fixture
def api(redis_server, tmp_path):
    server = ApiServer(create_app(api_settings(redis_server.url, tmp_path))).start()
    with server.client("key-acme") as acme:
        yield server, acme
    server.stop()


def test_class_folders_are_the_names_where_they_can_be_and_safe_unique_encodings_where_not():
    from scdd.layout import class_folders

    names = ["n01440764", "golden retriever", "ünï 猫", "50% off", "a\\b", "tab\there", "c00004-a_b", "%%%", "a/b"]
    folders = class_folders(names)
    assert folders[:3] == ("n01440764", "golden retriever", "ünï 猫")  # every name the service carries: as it is
    assert folders[3:] == ("c00003-50_off", "c00004-a_b-1", "c00005-tab_here", "c00004-a_b", "c00007-class",
                           "c00008-a_b")
    assert len(set(folders)) == len(folders) and class_folders(names) == folders  # unique and deterministic
    for folder in folders[3:]:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", folder) and check_relative(f"images/{folder}/0_0000.png")


def test_a_set_whose_class_names_break_urls_is_stored_safely_served_whole_and_read_back_by_class(api, tmp_path):
    server, acme = api
    data = make_imagefolder(tmp_path / "data", classes=CLASSES, per_class=4, size=(16, 16))
    answer = acme.post("/v1/jobs", json={
        "method": "sre2l", "dataset": {"name": "imagefolder", "root": str(data), "image_size": 16},
        "teacher": {"epochs": 1, "batch_size": 8}, "recover": {"init": "noise", "ipc": 2, "iterations": 2,
                                                              "batch_size": 5},
        "validate": {"enabled": False}, "resources": quick_resources()})
    assert answer.status_code == 202, answer.text
    job_id, spec = answer.json()["id"], JobSpec.model_validate(answer.json()["spec"])
    from scdd.pipeline import run_distillation  # the job as its driver runs it, into the folder the API serves

    assert run_distillation(spec).complete
    out = Path(spec.output.url)

    # safe folders; the names in the manifest, beside their folders and on every image
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(FOLDERS)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(c["label"], c["name"], c["dir"]) for c in manifest["classes"]] == list(zip(range(5), CLASSES, FOLDERS))
    assert len(manifest["images"]) == 10
    for image in manifest["images"]:
        assert image["path"].startswith(f"images/{FOLDERS[image['label']]}/")
        assert (image["class_name"], image["class_dir"]) == (CLASSES[image["label"]], FOLDERS[image["label"]])

    # the API: what the listing shows downloads, one file or all of them as one complete zip
    files, _, _ = all_pages(acme, job_id, limit=4)
    paths = [f["path"] for f in files]
    assert sorted(p for p in paths if p.startswith("images/")) == sorted(i["path"] for i in manifest["images"])
    _, folders, _ = all_pages(acme, job_id, prefix="images/", delimiter="/")
    assert folders == [f"images/{folder}/" for folder in sorted(FOLDERS)]
    for path in paths:
        one = acme.get(f"/v1/jobs/{job_id}/artifacts/{quote(path)}")
        assert one.status_code == 200 and one.content == (out / path).read_bytes(), path
    zipped = acme.get(f"/v1/jobs/{job_id}/archive")
    assert zipped.status_code == 200
    archive = zipfile.ZipFile(io.BytesIO(zipped.content))
    assert archive.testzip() is None
    assert sorted(archive.namelist()) == sorted(f"{job_id}/{path}" for path in paths)  # every listed file, no more
    for path in paths:
        assert archive.read(f"{job_id}/{path}") == (out / path).read_bytes()

    # read back by class: through the manifest, and (images/ copied alone) through the folders
    from scdd.data import load_dataset
    from scdd.validate.external_set import index_external_set, read_image_folder

    info = load_dataset(spec.dataset, spec.seed).info
    assert info.class_names == CLASSES and info.class_dirs == FOLDERS
    found = index_external_set(str(out), info, spec)
    assert found.scdd_output and found.counts == (2,) * 5
    assert [e["label"] for e in found.entries] == [i["label"] for i in manifest["images"]]
    shutil.copytree(out / "images", tmp_path / "copy")
    copied = index_external_set(str(tmp_path / "copy"), info, spec)
    assert not copied.scdd_output and copied.counts == (2,) * 5
    assert {e["path"]: e["label"] for e in copied.entries} == {
        i["path"][len("images/"):]: i["label"] for i in manifest["images"]}
    pixels = read_image_folder(str(tmp_path / "copy"), info, spec)
    assert pixels.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_an_older_output_with_such_a_folder_lists_only_what_downloads_and_its_zip_is_refused_before_it_starts(
        api, tmp_path):
    server, acme = api
    job_id = new_job(acme)
    prefix = tmp_path / "artifacts" / "acme" / job_id
    images = fabricate_job(prefix, classes=2, ipc=2)
    for bad in ("a%b", "c\\d"):  # as scdd wrote class folders before it encoded such names
        (prefix / "images" / bad).mkdir()
        (prefix / "images" / bad / "0.png").write_bytes(tiny_png())
    files, _, _ = all_pages(acme, job_id, limit=3)
    assert [f["path"] for f in files] == sorted(images + ["grid.png", "manifest.json", "report.json",
                                                          "teacher/teacher.pt"])
    _, folders, _ = all_pages(acme, job_id, prefix="images/", delimiter="/", limit=1)
    assert folders == ["images/n00000000/", "images/n00000001/"]
    for f in files:  # everything listed downloads
        assert acme.get(f"/v1/jobs/{job_id}/artifacts/{quote(f['path'])}").status_code == 200
    assert acme.get(f"/v1/jobs/{job_id}/artifacts/images/a%25b/0.png").status_code == 400  # and is not listed

    refused = acme.get(f"/v1/jobs/{job_id}/archive")
    assert refused.status_code == 409 and refused.headers["content-type"] == "application/json"
    detail = refused.json()["detail"]
    assert "2 file(s) whose names the API cannot serve ('images/a%b/0.png', 'images/c\\\\d/0.png'" in detail
    assert f"GET /v1/jobs/{job_id}/artifacts/{{path}}" in detail  # the fix
    shutil.rmtree(prefix / "images" / "a%b")
    shutil.rmtree(prefix / "images" / "c\\d")
    assert acme.get(f"/v1/jobs/{job_id}/archive").status_code == 200  # the slot of the refused one came back
