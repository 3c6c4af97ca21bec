"""The job-service commands of `scdd`: submit, status, wait, cancel, download, jobs (parsers in service/cli.py).

Exit codes: 0 done; 1 an error (the server's message on stderr); 2 a usage error (an unreadable spec
file, or the server refused the request as invalid: 400, 413, 422). `wait` (and `submit --wait`)
return the job's outcome: 0 succeeded, 1 failed, 130 cancelled (130 too when Ctrl-C stops the
waiting; the job goes on).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from service.client import ClientError, JobClient

DEFAULT_SERVER = "http://127.0.0.1:8000"
USAGE_STATUSES = frozenset({400, 413, 422})
OUTCOME_EXIT = {"succeeded": 0, "failed": 1, "cancelled": 130}


class UsageError(ClientError):
    """A local mistake of the caller (exit code 2)."""


def api_key(args: argparse.Namespace) -> Optional[str]:
    """--api-key-file, else --api-key (with a warning: the command line is public), else $SCDD_API_KEY."""
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text().strip()
        except OSError as exc:
            raise UsageError(None, f"cannot read the API key file {args.api_key_file}: {exc.strerror}") from None
        if not key:
            raise UsageError(None, f"the API key file {args.api_key_file} is empty")
        return key
    if args.api_key:
        print("scdd: warning: --api-key shows the key to other users of this machine (ps, shell history); use "
              "--api-key-file or SCDD_API_KEY", file=sys.stderr)
        return args.api_key
    return os.environ.get("SCDD_API_KEY")


def warn_if_sent_in_clear(server: str, key: Optional[str]) -> None:
    """A key sent over plain http beyond this machine can be read by anyone on the path."""
    url = urlsplit(server)
    if key and url.scheme == "http" and not is_loopback(url.hostname or ""):
        print(f"scdd: warning: the API key goes to {url.hostname} over plain http, readable by anyone on the way; "
              f"use https://", file=sys.stderr)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    server = args.server or os.environ.get("SCDD_SERVER") or DEFAULT_SERVER
    try:
        key = api_key(args)
        warn_if_sent_in_clear(server, key)
        with JobClient(server, key) as client:
            return COMMANDS[args.command](client, args)
    except ClientError as exc:
        hint = ": pass --api-key-file or set SCDD_API_KEY" if exc.status == 401 else ""
        print(f"scdd: error: {exc}{hint}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) or exc.status in USAGE_STATUSES else 1
    except OSError as exc:  # the download folder
        print(f"scdd: error: {exc}", file=sys.stderr)
        return 1


def load_spec(path: str) -> dict:
    """A job spec from a YAML or JSON file (JSON when it ends in .json; YAML reads JSON too)."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(None, f"cannot read the job spec {path}: {exc.strerror}") from None
    try:
        spec = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise UsageError(None, f"{path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {exc}") from None
    if not isinstance(spec, dict):
        raise UsageError(None, f"{path} must hold the job spec's fields as a mapping, not a {type(spec).__name__}")
    return spec


def _when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def describe(job: dict) -> str:
    """What `scdd status` prints."""
    cancelling = job["cancel_requested"] and job["state"] not in OUTCOME_EXIT
    lines = [f"job       {job['id']}", f"state     {job['state']}" + ("  (cancel requested)" if cancelling else ""),
             f"stage     {job['stage'] or '-'}", f"progress  {100 * job['progress']:.1f}%",
             f"created   {_when(job['created_at'])}"]
    if job.get("attempt", 1) > 1:
        lines.insert(2, f"attempt   {job['attempt']} (resumed)")
    if job.get("finished_at"):
        lines.append(f"finished  {_when(job['finished_at'])}")
    if job.get("error"):
        lines.append(f"error     {job['error']}")
    summary = job.get("summary") or {}
    parts = [f"{label} {summary[key]:.2f}%" for key, label in
             (("teacher_top1", "teacher top-1"), ("student_top1", "student top-1"), ("baseline_top1", "baseline top-1"))
             if summary.get(key) is not None]
    if summary.get("ior") is not None:
        parts.append(f"IOR {summary['ior']:+.2f} points")
    if summary.get("images") is not None:
        parts.insert(0, f"{summary['images']} images")
    if parts:
        lines.append("summary   " + ", ".join(parts))
    if summary.get("output"):
        lines.append(f"output    {summary['output']}")
    return "\n".join(lines)


def follow(client: JobClient, job_id: str) -> int:
    """Show the job's progress (a tqdm bar on stderr) until it ends; its outcome as the exit code."""
    from tqdm import tqdm

    outcome = None
    bar = tqdm(total=100, desc="waiting", file=sys.stderr, dynamic_ncols=True, disable=None,
               bar_format="{desc} {percentage:5.1f}%|{bar}| [{elapsed}<{remaining}]")
    try:
        for _, kind, event in client.events(job_id):
            if event.get("stage") and kind in ("stage_started", "progress"):
                bar.set_description(event["stage"], refresh=False)
            if kind == "progress" and event.get("job_fraction") is not None:
                bar.update(max(0.0, 100 * event["job_fraction"] - bar.n))
            elif kind == "error":
                bar.write(f"scdd: {event.get('stage') or 'job'}: {event.get('message')}", file=sys.stderr)
            elif kind == "job_finished":
                outcome = event.get("status")
                if outcome == "succeeded":
                    bar.update(100 - bar.n)
    except KeyboardInterrupt:
        bar.close()
        print(f"scdd: stopped following job {job_id}; it goes on: `scdd wait {job_id}` follows it again, "
              f"`scdd cancel {job_id}` stops it", file=sys.stderr)
        return 130
    finally:
        bar.close()
    job = client.status(job_id)
    outcome = outcome if outcome in OUTCOME_EXIT else job["state"]
    if outcome not in OUTCOME_EXIT:
        raise ClientError(None, f"the event stream of job {job_id} ended while it is {outcome}: "
                                f"run `scdd wait {job_id}` again")
    print(describe(job))
    return OUTCOME_EXIT[outcome]


def submit(client: JobClient, args: argparse.Namespace) -> int:
    job = client.submit(load_spec(args.spec), args.idempotency_key)
    print(f"{job['id']} {job['state']}", flush=True)
    return follow(client, job["id"]) if args.wait else 0


def status(client: JobClient, args: argparse.Namespace) -> int:
    print(describe(client.status(args.job_id)))
    return 0


def wait(client: JobClient, args: argparse.Namespace) -> int:
    return follow(client, args.job_id)


def cancel(client: JobClient, args: argparse.Namespace) -> int:
    job = client.cancel(args.job_id)
    note = "" if job["state"] == "cancelled" else "  (cancel requested: it stops at its next check)"
    print(f"{job['id']} {job['state']}{note}")
    return 0


def delete(client: JobClient, args: argparse.Namespace) -> int:
    client.delete(args.job_id)
    print(f"{args.job_id} deleted (its artifacts go with the service's next GC run)")
    return 0


def resume(client: JobClient, args: argparse.Namespace) -> int:
    job = client.resume(args.job_id, args.workers)
    print(f"{job['id']} {job['state']} (attempt {job['attempt']}, {job['spec']['resources']['workers']} workers)",
          flush=True)
    return follow(client, job["id"]) if args.wait else 0


def download(client: JobClient, args: argparse.Namespace) -> int:
    result = client.download(args.job_id, args.dir)
    print(f"{result['downloaded']} files downloaded ({result['bytes'] / 1e6:.1f} MB), "
          f"{result['skipped']} already there, in {args.dir}")
    if result["verified"] is None:
        print("no manifest.json yet: images not verified")
    else:
        print(f"{result['verified']} images match the sha256 in manifest.json")
    return 0


def jobs(client: JobClient, args: argparse.Namespace) -> int:
    header = ("ID", "STATE", "STAGE", "PROGRESS", "CREATED")
    rows = [(job["id"], job["state"], job["stage"] or "-", f"{100 * job['progress']:.0f}%", _when(job["created_at"]))
            for job in client.jobs(args.state, args.limit)]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


COMMANDS = {"submit": submit, "status": status, "wait": wait, "cancel": cancel, "resume": resume, "download": download,
            "jobs": jobs, "delete": delete}
