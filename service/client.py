"""A small synchronous client of the job API (what `scdd submit/status/wait/cancel/download/jobs` use).

Every HTTP error becomes a `ClientError` carrying the server's own message; an unreachable server
becomes one that names the URL. A read (GET) refused by the tenant's read rate (429) is sent again after the
answer's Retry-After. Nothing here imports torch, Ray or the service's server side.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

import httpx

Event = tuple[str, str, dict]  # (event id, type, the event as a dict)
READ_WAIT_S = 600.0  # a read refused by the tenant's read rate is sent again after its Retry-After, this long at most


class ClientError(Exception):
    """What went wrong, in the server's words; `status` is the HTTP status (None: no answer, or a local check)."""

    def __init__(self, status: Optional[int], message: str):
        super().__init__(message)
        self.status, self.message = status, message

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status})" if self.status else self.message


class ChecksumMismatch(ClientError):
    """Downloaded images that do not match the sha256 of manifest.json."""


def _server_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if not isinstance(body, dict):
        return str(body)[:500]
    if body.get("message"):  # 422: every field error on one line, as "path: message; ..."
        return str(body["message"])
    detail = body.get("detail", body)
    if isinstance(detail, list):  # a 422 without the one-line form
        return "; ".join(".".join(str(p) for p in e.get("loc", []) if p != "body") + f": {e.get('msg')}"
                         for e in detail if isinstance(e, dict))
    return str(detail)


def safe_destination(dest_dir: Path, rel: str) -> Path:
    """`dest_dir/rel`, or ClientError when `rel` is not a plain relative path that stays inside `dest_dir`."""
    parts = rel.split("/")
    bad = (not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel
           or any(part in ("", ".", "..") for part in parts))
    target = dest_dir.joinpath(*parts).resolve()
    if bad or not target.is_relative_to(dest_dir.resolve()):
        raise ClientError(None, f"refusing artifact path {rel!r}: it is not a plain relative path inside {dest_dir}")
    return target


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 16):
            digest.update(block)
    return digest.hexdigest()


class JobClient:
    """`JobClient("http://127.0.0.1:8000", "my-key")`; use as a context manager or call `close()`."""

    def __init__(self, server_url: str, api_key: Optional[str], timeout: float = 30.0,
                 transport: Optional[httpx.BaseTransport] = None):
        self.server_url = server_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.server_url, headers=headers, timeout=timeout, transport=transport)
        # the event stream sends a keep-alive every 10 s: a longer silence means the connection is gone
        self.stream_timeout = httpx.Timeout(timeout, read=max(timeout, 60.0))

    def __enter__(self) -> "JobClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # -- plumbing --------------------------------------------------------------------------------
    def _unreachable(self, exc: httpx.TransportError) -> ClientError:
        if isinstance(exc, httpx.ConnectError):
            return ClientError(None, f"cannot connect to the scdd server at {self.server_url} ({exc}): start it "
                                     "with `scdd serve`, or point SCDD_SERVER (or --server) at it")
        return ClientError(None, f"the scdd server at {self.server_url} did not answer: {type(exc).__name__}: {exc}")

    def _rate_limited(self, method: str, response: httpx.Response, waited: float) -> bool:
        """Whether a read refused by the tenant's read rate (429 with Retry-After) is to be sent again: then this
        waits for it first, up to READ_WAIT_S in all for one request. Writes are not retried (their 429 is a quota or
        the submit rate, for the caller to see)."""
        if method != "GET" or response.status_code != 429:
            return False
        try:
            wait = float(response.headers.get("Retry-After", ""))
        except ValueError:
            return False
        if waited + wait > READ_WAIT_S:
            return False
        time.sleep(max(wait, 0.05))
        return True

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        waited = 0.0
        while True:
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise self._unreachable(exc) from None
            started = time.monotonic()
            if not self._rate_limited(method, response, waited):
                break
            waited += time.monotonic() - started
        if response.is_error:
            raise ClientError(response.status_code, _server_message(response))
        return response

    @contextmanager
    def _stream(self, path: str, headers: Optional[dict] = None) -> Iterator[httpx.Response]:
        """A streamed GET whose status was checked (an error answer is read and raised as ClientError); a read refused
        by the read rate is sent again after its Retry-After."""
        waited = 0.0
        while True:
            with self.http.stream("GET", path, headers=headers, timeout=self.stream_timeout) as response:
                if response.is_error:
                    response.read()
                    started = time.monotonic()
                    if self._rate_limited("GET", response, waited):
                        waited += time.monotonic() - started
                        continue
                    raise ClientError(response.status_code, _server_message(response))
                yield response
                return

    @staticmethod
    def _job(job_id: str) -> str:
        return f"/v1/jobs/{quote(job_id, safe='')}"

    # -- jobs ------------------------------------------------------------------------------------
    def submit(self, spec: dict, idempotency_key: Optional[str] = None) -> dict:
        """Queue a job; the same `idempotency_key` with the same spec returns the same job."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/jobs", json=spec, headers=headers).json()

    def status(self, job_id: str) -> dict:
        return self._request("GET", self._job(job_id)).json()

    def jobs(self, state: Optional[str] = None, limit: Optional[int] = 20, page_size: int = 100) -> list[dict]:
        """Up to `limit` of the caller's jobs (None: all), newest first, following `next_cursor` page by page."""
        found: list[dict] = []
        cursor = None
        while limit is None or len(found) < limit:
            size = page_size if limit is None else min(page_size, limit - len(found))
            params = {"limit": size, **({"state": state} if state else {}), **({"cursor": cursor} if cursor else {})}
            page = self._request("GET", "/v1/jobs", params=params).json()
            found += page["jobs"]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return found

    def cancel(self, job_id: str) -> dict:
        return self._request("POST", f"{self._job(job_id)}/cancel").json()

    def delete(self, job_id: str) -> None:
        """Delete a finished job (record, events; its artifacts with the service's next GC run)."""
        self._request("DELETE", self._job(job_id))

    def resume(self, job_id: str, workers: Optional[int] = None) -> dict:
        """Queue a failed or cancelled job again on its own output (its next attempt), on `workers` workers when
        given (refused where that would change its images)."""
        body = {"workers": workers} if workers is not None else {}
        return self._request("POST", f"{self._job(job_id)}/resume", json=body).json()

    # -- events ----------------------------------------------------------------------------------
    def _event_stream(self, job_id: str, last_event_id: Optional[str]) -> Iterator[Event]:
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        with self._stream(f"{self._job(job_id)}/events", headers) as response:
            frame: dict[str, list[str]] = {}
            for line in response.iter_lines():
                if line.startswith(":"):
                    continue  # a comment: the keep-alive
                if line:
                    name, _, value = line.partition(":")
                    frame.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
                    continue
                if "data" in frame:  # a blank line ends a frame
                    try:
                        data = json.loads("\n".join(frame["data"]))
                    except ValueError:
                        raise ClientError(None, f"the server sent an event that is not JSON: {frame}") from None
                    yield frame.get("id", [""])[-1], frame.get("event", ["message"])[-1], data
                frame = {}

    def events(self, job_id: str, last_event_id: Optional[str] = None) -> Iterator[Event]:
        """The job's events as (id, type, event), from the first (or after `last_event_id`) until its last attempt's
        `job_finished` (the server ends the stream there; a resumed job's earlier ones pass). A connection lost
        mid-stream is resumed once with Last-Event-ID; a second loss with no event in between raises ClientError."""
        retried = False
        while True:
            lost: Optional[httpx.TransportError] = None
            finished = False
            try:
                for event in self._event_stream(job_id, last_event_id):
                    last_event_id, retried = event[0], False
                    finished = event[1] == "job_finished"
                    yield event
                if finished:
                    return
            except httpx.TransportError as exc:
                lost = exc
            if retried:
                if lost is not None:
                    raise self._unreachable(lost) from None
                return  # the server ended the stream twice without news: the job has ended
            retried = True

    # -- artifacts -------------------------------------------------------------------------------
    def list_artifacts(self, job_id: str, prefix: Optional[str] = None, page_size: int = 5000) -> list[dict]:
        """[{path, size}] of every file the job has written so far (under `prefix`), following `next_cursor` page
        by page."""
        found: list[dict] = []
        cursor = None
        while True:
            params = {"limit": page_size, **({"prefix": prefix} if prefix else {}), **({"cursor": cursor} if cursor else {})}
            page = self._request("GET", f"{self._job(job_id)}/artifacts", params=params).json()
            found += page["files"]
            cursor = page.get("next_cursor")
            if not cursor:
                return found

    def _fetch(self, job_id: str, rel: str, target: Path) -> int:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.part")  # beside it, then renamed
        try:
            with open(temp, "xb") as out, self._stream(f"{self._job(job_id)}/artifacts/{quote(rel)}") as answer:
                for block in answer.iter_bytes():
                    out.write(block)
            os.replace(temp, target)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        finally:
            if os.path.exists(temp):
                os.unlink(temp)
        return target.stat().st_size

    def download(self, job_id: str, dest_dir: str | os.PathLike) -> dict:
        """Every artifact of the job into `dest_dir` (same relative paths; files already there with the
        listed size are kept), then the images checked against manifest.json's sha256 when there is one.
        Returns {files, downloaded, skipped, bytes, verified}; ChecksumMismatch names the bad files."""
        dest = Path(dest_dir)
        listing = [(item["path"], int(item["size"]), safe_destination(dest, item["path"]))
                   for item in self.list_artifacts(job_id)]  # every path checked before any is written
        downloaded = skipped = size = 0
        for rel, listed_size, target in listing:
            if target.is_file() and target.stat().st_size == listed_size:
                skipped += 1
            else:
                size += self._fetch(job_id, rel, target)
                downloaded += 1
        verified = None
        if any(rel == "manifest.json" for rel, _, _ in listing):
            verified = verify_manifest(dest)
        return {"files": len(listing), "downloaded": downloaded, "skipped": skipped, "bytes": size,
                "verified": verified}


def verify_manifest(dest: Path) -> int:
    """Check every image of `dest/manifest.json` against its sha256; the number checked, or ChecksumMismatch."""
    try:
        images = json.loads((dest / "manifest.json").read_text())["images"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ClientError(None, f"{dest / 'manifest.json'} is not a job manifest: {exc}") from None
    bad = []
    for entry in images:
        rel = entry["path"]
        path = safe_destination(dest, rel)
        if not path.is_file():
            bad.append(f"{rel}: listed in manifest.json but not downloaded")
        elif (actual := sha256_of(path)) != entry["sha256"]:
            bad.append(f"{rel}: sha256 {actual[:12]}... but manifest.json says {entry['sha256'][:12]}...")
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ChecksumMismatch(None, f"{len(bad)} of {len(images)} images in {dest} do not match manifest.json: "
                                     + "; ".join(bad[:5]) + more
                                     + ". Delete them and run the download again (a corrupted copy on the server "
                                       "fails again: report it)")
    return len(images)
