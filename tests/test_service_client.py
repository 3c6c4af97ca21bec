"""The job service's client (service/client.py) and `scdd submit/status/wait/cancel/download/jobs`,
against a real redis-server and the API under uvicorn. No Ray and no dispatcher: jobs stay queued.
Two conditions the real server never produces (a dropped event stream, an artifact listing with an
escaping path) are played by httpx.MockTransport."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from scdd_cli import main
from service.api.async_jobstore import JOB_ID
from service.api.main import create_app
from service.client import ChecksumMismatch, ClientError, JobClient, safe_destination
from service.blocking_jobstore import BlockingJobStore
from tests.services import ApiServer, api_settings, free_port, wait_until

SPEC = {"method": "sre2l", "dataset": {"classes": [0, 1]}, "recover": {"ipc": 1, "iterations": 2}}


@pytest.fixture
def api(redis_server, tmp_path):
    server = ApiServer(create_app(api_settings(redis_server.url, tmp_path, max_active_jobs=20))).start()
    yield server
    server.stop()


@pytest.fixture
def client(api):
    with JobClient(api.url, "key-acme") as job_client:
        yield job_client


@pytest.fixture
def cli(api, capsys, monkeypatch):
    """`scdd ...` in this process, with SCDD_SERVER and SCDD_API_KEY pointing at the test API: (exit code, out, err)."""
    monkeypatch.setenv("SCDD_SERVER", api.url)
    monkeypatch.setenv("SCDD_API_KEY", "key-acme")

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(arg) for arg in args])
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    return run


def test_submit_a_yaml_or_json_spec_then_status(cli, tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    code, out, _ = cli("submit", tmp_path / "spec.yaml")
    job_id, state = out.split()
    assert code == 0 and JOB_ID.match(job_id) and state == "queued"
    code, out, _ = cli("status", job_id)
    assert code == 0
    assert out.splitlines()[:4] == [f"job       {job_id}", "state     queued", "stage     -", "progress  0.0%"]
    (tmp_path / "spec.json").write_text(json.dumps(SPEC))
    first = cli("submit", tmp_path / "spec.json", "--idempotency-key", "retry-1")
    again = cli("submit", tmp_path / "spec.json", "--idempotency-key", "retry-1")
    assert first[0] == again[0] == 0 and first[1] == again[1] and first[1].split()[0] != job_id


def test_jobs_follow_the_cursor_pages_and_the_table_shows_the_newest(client, cli):
    ids = [client.submit(SPEC)["id"] for _ in range(5)]
    assert [job["id"] for job in client.jobs(limit=None, page_size=2)] == ids[::-1]  # three pages
    assert [job["id"] for job in client.jobs(limit=3, page_size=2)] == ids[::-1][:3]
    client.cancel(ids[0])
    assert [job["id"] for job in client.jobs(state="cancelled")] == [ids[0]]
    code, out, _ = cli("jobs", "--limit", "3")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["ID", "STATE", "STAGE", "PROGRESS", "CREATED"]
    assert [line.split()[0] for line in lines[1:]] == ids[::-1][:3]
    assert lines[1].split()[1:4] == ["queued", "-", "0%"]
    code, out, _ = cli("jobs", "--state", "cancelled")
    assert [line.split()[:2] for line in out.splitlines()[1:]] == [[ids[0], "cancelled"]]
    code, out, err = cli("delete", ids[1])  # still queued: the server's 409 and its fix
    assert code == 1 and "cancel it first" in err, err
    code, out, _ = cli("delete", ids[0])
    assert code == 0 and out.startswith(f"{ids[0]} deleted")
    assert [job["id"] for job in client.jobs(limit=None)] == ids[:0:-1]
    with pytest.raises(SystemExit) as usage:
        cli("jobs", "--limit", "0")
    assert usage.value.code == 2


def test_cancel_then_wait_ends_at_once_with_130_and_a_second_cancel_is_an_error(client, cli):
    job_id = client.submit(SPEC)["id"]
    code, out, _ = cli("cancel", job_id)
    assert code == 0 and out.split() == [job_id, "cancelled"]
    started = time.monotonic()
    code, out, _ = cli("wait", job_id)
    assert code == 130 and time.monotonic() - started < 5
    assert "state     cancelled" in out and "error     cancelled before it was dispatched" in out
    code, _, err = cli("cancel", job_id)
    assert code == 1 and f"job {job_id} already cancelled: nothing to cancel (HTTP 409)" in err
    events = list(client.events(job_id))
    assert [(kind, event["status"]) for _, kind, event in events] == [("job_finished", "cancelled")]
    assert list(client.events(job_id, last_event_id=events[-1][0])) == []  # resumed after the last one


def test_resume_queues_the_next_attempt_and_wait_follows_it_past_the_first_attempts_end(client, cli):
    job_id = client.submit({**SPEC, "resources": {"workers": 2}})["id"]
    cli("cancel", job_id)
    code, _, err = cli("resume", job_id, "--workers", "1")  # recover steps: the images depend on the worker count
    assert code == 2 and "only 2 workers can resume it" in err
    code, out, _ = cli("resume", job_id)
    assert code == 0 and out.strip() == f"{job_id} queued (attempt 2, 2 workers)"
    code, out, _ = cli("status", job_id)
    assert "attempt   2 (resumed)" in out and "state     queued" in out
    client.cancel(job_id)  # the second attempt ends too: wait reads past the first attempt's job_finished
    code, out, _ = cli("wait", job_id)
    assert code == 130 and "state     cancelled" in out
    kinds = [kind for _, kind, _ in client.events(job_id)]
    assert kinds == ["job_finished", "job_resumed", "job_finished"]


def test_submit_wait_follows_the_live_stream_until_the_job_is_cancelled(api, cli, tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))

    def cancel_the_submitted_job() -> None:
        with JobClient(api.url, "key-acme") as other:
            job = wait_until(lambda: other.jobs(limit=1), 10, "the submitted job")[0]
            time.sleep(0.5)  # the waiting command is following the stream by now
            other.cancel(job["id"])

    canceller = threading.Thread(target=cancel_the_submitted_job)
    canceller.start()
    code, out, _ = cli("submit", tmp_path / "spec.yaml", "--wait")
    canceller.join()
    assert code == 130 and out.splitlines()[0].endswith(" queued") and "state     cancelled" in out


@pytest.mark.parametrize("outcome, exit_code", [("succeeded", 0), ("failed", 1)])
def test_wait_follows_a_running_job_to_the_end_and_exits_as_it_ended(client, cli, redis_server, outcome, exit_code):
    job_id = client.submit(SPEC)["id"]
    store = BlockingJobStore.connect(redis_server.url)  # plays the dispatcher and the job driver

    def run_the_job() -> None:
        time.sleep(0.3)
        store.transition(job_id, "running", ("queued",), {"type": "job_started", "job_id": job_id})
        for fraction in (0.25, 0.5):
            store.append_event(job_id, {"type": "progress", "stage": "recover", "fraction": fraction,
                                        "job_fraction": fraction, "done": 1, "total": 2, "unit": "it"},
                               stage="recover", progress=str(fraction))
        if outcome == "failed":
            store.append_event(job_id, {"type": "error", "stage": "recover", "message": "out of patience"})
            store.finish(job_id, "failed", ("running",), error="recover: out of patience")
        else:
            summary = {"teacher_top1": 80.0, "images": 2, "student_top1": 50.0, "output": "/somewhere"}
            store.finish(job_id, "succeeded", ("running",), summary=json.dumps(summary), progress="1")

    driver = threading.Thread(target=run_the_job)
    driver.start()
    code, out, err = cli("wait", job_id)
    driver.join()
    assert code == exit_code and f"state     {outcome}" in out
    if outcome == "failed":
        assert "error     recover: out of patience" in out and "scdd: recover: out of patience" in err
    else:
        assert "summary   2 images, teacher top-1 80.00%, student top-1 50.00%" in out and "output    /somewhere" in out


def test_errors_carry_the_servers_message_and_the_usage_ones_exit_2(api, cli, tmp_path):
    code, _, err = cli("jobs", "--api-key", "wrong")
    assert code == 1 and "missing or unknown API key" in err and "(HTTP 401): pass --api-key-file or set SCDD_API_KEY" in err
    assert "warning: --api-key shows the key to other users of this machine" in err
    code, _, err = cli("status", "j-00000000000000000000")
    assert code == 1 and "no job 'j-00000000000000000000': list yours with GET /v1/jobs (HTTP 404)" in err
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"recover": {"ipc": 0}, "bogus": 1}))
    code, _, err = cli("submit", tmp_path / "bad.yaml")
    assert code == 2 and "recover.ipc: Input should be greater than or equal to 1" in err and "bogus: " in err
    with JobClient(api.url, "key-acme") as job_client, pytest.raises(ClientError) as caught:
        job_client.submit({"recover": {"ipc": 0}})
    assert caught.value.status == 422 and caught.value.message.startswith("recover.ipc: ")
    code, _, err = cli("submit", tmp_path / "missing.yaml")
    assert code == 2 and "cannot read the job spec" in err
    (tmp_path / "list.yaml").write_text("- 1\n")
    code, _, err = cli("submit", tmp_path / "list.yaml")
    assert code == 2 and "as a mapping, not a list" in err
    nobody = f"http://127.0.0.1:{free_port()}"
    code, _, err = cli("status", "j-00000000000000000000", "--server", nobody)
    assert code == 1 and f"cannot connect to the scdd server at {nobody}" in err
    assert "scdd serve" in err and "SCDD_SERVER" in err


def write_artifacts(prefix: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (prefix / rel).parent.mkdir(parents=True, exist_ok=True)
        (prefix / rel).write_bytes(data)


def test_download_keeps_paths_skips_present_files_and_checks_the_manifest(client, cli, tmp_path):
    job = client.submit(SPEC)
    prefix = tmp_path / "artifacts" / "acme" / job["id"]
    assert job["spec"]["output"]["url"] == str(prefix)
    images = {"images/0/0_0000.png": b"\x89PNG zero", "images/1/1_0000.png": b"\x89PNG one"}
    write_artifacts(prefix, {**images, "report.json": b"{}"})
    dest = tmp_path / "download"
    code, out, _ = cli("download", job["id"], dest)
    assert code == 0 and "3 files downloaded" in out and "no manifest.json yet" in out
    manifest = {"job_id": job["id"], "images": [{"path": rel, "sha256": hashlib.sha256(data).hexdigest(),
                                                 "bytes": len(data)} for rel, data in images.items()]}
    write_artifacts(prefix, {"manifest.json": json.dumps(manifest).encode()})
    code, out, _ = cli("download", job["id"], dest)
    assert code == 0 and "1 files downloaded" in out and "3 already there" in out
    assert "2 images match the sha256 in manifest.json" in out
    assert all((dest / rel).read_bytes() == data for rel, data in images.items())
    assert not list(dest.rglob("*.part"))  # written beside, then renamed
    assert client.download(job["id"], dest) == {"files": 4, "downloaded": 0, "skipped": 4, "bytes": 0, "verified": 2}

    write_artifacts(prefix, {"images/1/1_0000.png": b"\x89PNG ONE"})  # tampered on the server: same size
    (dest / "images/1/1_0000.png").unlink()
    with pytest.raises(ChecksumMismatch) as caught:
        client.download(job["id"], dest)
    assert "1 of 2 images" in str(caught.value) and "images/1/1_0000.png: sha256 " in str(caught.value)
    code, _, err = cli("download", job["id"], dest)  # the bad copy is kept (same size) and reported again
    assert code == 1 and "images/1/1_0000.png" in err and "do not match manifest.json" in err


def test_a_download_waits_out_the_read_rate_instead_of_failing(redis_server, tmp_path):
    """With a read rate of 120 a minute after bursts of 3, a download of 8 files (plus its listing and manifest
    request) is refused 429 midway; the client waits for each Retry-After and gets every file."""
    settings = api_settings(redis_server.url, tmp_path, read_rate=120, read_burst=3)
    server = ApiServer(create_app(settings)).start()
    try:
        with JobClient(server.url, "key-acme") as job_client:
            job = job_client.submit(SPEC)
            files = {f"images/0/0_{i:04d}.png": b"\x89PNG %d" % i for i in range(8)}
            write_artifacts(tmp_path / "artifacts" / "acme" / job["id"], files)
            started = time.monotonic()
            result = job_client.download(job["id"], tmp_path / "download")
            assert result["downloaded"] == 8 and time.monotonic() - started >= 2.0  # it waited for tokens
            assert all((tmp_path / "download" / rel).read_bytes() == data for rel, data in files.items())
    finally:
        server.stop()


@pytest.mark.parametrize("rel", ["../x", "images/../../x", "/etc/passwd", "images//x", "./x", "a\\..\\..\\x", ""])
def test_paths_that_would_leave_the_destination_are_refused(tmp_path, rel):
    with pytest.raises(ClientError, match="refusing artifact path"):
        safe_destination(tmp_path, rel)


def test_a_listing_with_an_escaping_path_downloads_nothing(tmp_path):
    def server(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/jobs/j-1/artifacts", "no file may be fetched"
        return httpx.Response(200, json={"files": [{"path": "images/0/a.png", "size": 3},
                                                   {"path": "../../outside", "size": 3}]})

    with JobClient("http://scdd.test", "key", transport=httpx.MockTransport(server)) as job_client:
        with pytest.raises(ClientError, match="'../../outside'"):
            job_client.download("j-1", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


class Dropping(httpx.SyncByteStream):
    """A response body that stops with a connection error after its chunks."""

    def __init__(self, *chunks: bytes):
        self.chunks = chunks

    def __iter__(self):
        yield from self.chunks
        raise httpx.ReadError("connection reset by peer")


def frame(entry_id: str, kind: str, data: dict) -> bytes:
    return f"id: {entry_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def test_events_resume_once_with_last_event_id_after_a_drop():
    asked: list = []

    def server(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("last-event-id"))
        if len(asked) == 1:
            body = Dropping(b"retry: 2000\n\n", frame("5-0", "job_started", {"job_id": "j-1"}), b": keep-alive\n\n")
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=body)
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=frame("6-0", "job_finished", {"status": "succeeded"}))

    with JobClient("http://scdd.test", "key", transport=httpx.MockTransport(server)) as job_client:
        events = list(job_client.events("j-1"))
    assert [(entry_id, kind) for entry_id, kind, _ in events] == [("5-0", "job_started"), ("6-0", "job_finished")]
    assert asked == [None, "5-0"]


def test_events_give_up_when_the_resumed_stream_drops_too():
    asked: list = []

    def server(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("last-event-id"))
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Dropping(b": keep-alive\n\n"))

    with JobClient("http://scdd.test", "key", transport=httpx.MockTransport(server)) as job_client:
        with pytest.raises(ClientError, match="did not answer: ReadError"):
            list(job_client.events("j-1"))
    assert asked == [None, None]


def test_the_api_key_comes_from_a_file_and_is_not_sent_in_clear_without_a_warning(cli, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SCDD_API_KEY")
    (tmp_path / "key").write_text("key-acme\n")
    code, out, err = cli("jobs", "--api-key-file", tmp_path / "key")
    assert code == 0 and err == ""  # loopback: no warning
    (tmp_path / "empty").write_text("")
    assert cli("jobs", "--api-key-file", tmp_path / "empty")[0] == 2
    code, _, err = cli("jobs", "--api-key-file", tmp_path / "none")
    assert code == 2 and f"cannot read the API key file {tmp_path / 'none'}" in err

    from service.commands import warn_if_sent_in_clear

    for server, warned in (("http://jobs.example.com:8000", True), ("https://jobs.example.com", False),
                           ("http://127.0.0.1:8000", False), ("http://[::1]:8000", False), ("http://localhost", False)):
        warn_if_sent_in_clear(server, "key")
        assert ("warning: the API key goes to jobs.example.com over plain http" in capsys.readouterr().err) == warned
    warn_if_sent_in_clear("http://jobs.example.com", None)  # no key, nothing to read
    assert capsys.readouterr().err == ""
