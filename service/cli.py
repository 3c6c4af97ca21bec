"""The job service's part of the `scdd` command line: `serve` and the client commands (submit, status,
wait, cancel, resume, delete, download, jobs); scdd_cli composes them with the other layers' commands. The commands
themselves run in service/serve.py and service/commands.py, imported when one runs."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from api_schema import JOB_STATES


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


SERVER_TEXT = ("The server is --server, else $SCDD_SERVER, else http://127.0.0.1:8000; the API key --api-key-file, "
               "else --api-key (which other users of this machine can read in ps), else $SCDD_API_KEY.")
CLIENT_EPILOG = SERVER_TEXT + " Exit codes: 0 ok, 1 error, 2 usage error or a request the server refused as invalid."
WAIT_EPILOG = (SERVER_TEXT + " Exit codes: 0 the job succeeded, 1 it failed (or an error), 2 usage error, 130 it was "
               "cancelled (also when Ctrl-C stops the waiting: the job goes on).")


def add_client(sub: argparse._SubParsersAction) -> None:
    """The job service's client commands (service/commands.py runs them)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", metavar="URL", help="job service URL (default $SCDD_SERVER, else http://127.0.0.1:8000)")
    common.add_argument("--api-key-file", metavar="FILE", help="read your tenant's API key from this file")
    common.add_argument("--api-key", metavar="KEY", help="API key of your tenant (default $SCDD_API_KEY); visible to "
                        "other users in ps: prefer --api-key-file or $SCDD_API_KEY")

    def add(name: str, text: str, epilog: str = CLIENT_EPILOG) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, parents=[common], help=text, description=text + ".", epilog=epilog)
        parser.set_defaults(handler=_client_command)
        return parser

    parser = add("submit", "submit a job spec to the job service; prints the job id and state")
    parser.add_argument("spec", metavar="SPEC", help="job spec file, YAML or JSON (the fields of `distill --config`)")
    parser.add_argument("--idempotency-key", metavar="K", help="a retry with the same key returns the same job")
    parser.add_argument("--wait", action="store_true", help="then follow it as `scdd wait` does (same exit codes)")
    add("status", "show a job's state, stage, progress, error and summary").add_argument("job_id", metavar="ID")
    add("wait", "follow a job's progress until it ends", WAIT_EPILOG).add_argument("job_id", metavar="ID")
    add("cancel", "cancel a job (a queued one at once, a running one at its next check)").add_argument(
        "job_id", metavar="ID")
    add("delete", "delete a finished job from the service (record and events now, artifacts with the next GC run; "
               "it frees the tenant's storage bound)").add_argument("job_id", metavar="ID")
    parser = add("resume", "run a failed or cancelled job again on its own output, keeping what it made")
    parser.add_argument("job_id", metavar="ID")
    parser.add_argument("--workers", type=_positive, metavar="N", help="run it on N workers (accepted only where that "
                        "leaves its images the same: recover.iterations 0; else the server names the count that can)")
    parser.add_argument("--wait", action="store_true", help="then follow it as `scdd wait` does (same exit codes)")
    parser = add("download", "download a job's artifacts and check the images against manifest.json")
    parser.add_argument("job_id", metavar="ID")
    parser.add_argument("dir", metavar="DIR", help="destination folder (files there with the same size are kept)")
    parser = add("jobs", "list your jobs, newest first")
    parser.add_argument("--state", choices=JOB_STATES, help="only jobs in this state")
    parser.add_argument("--limit", type=_positive, default=20, metavar="N", help="at most N jobs (default 20)")


def _client_command(args: argparse.Namespace) -> int:
    from service.commands import run

    return run(args)


def add_serve(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve", help="run the job service: HTTP API + dispatcher (+ Redis and a Ray head when not given)",
        description="Run the job service: the HTTP API and a dispatcher feeding Ray. With no REDIS_URL it starts a "
        "private redis-server (append-only file under DATA-DIR/redis); with no RAY_ADDRESS (the Ray Jobs API, "
        "http://head:8265) a local Ray head; with no SCDD_API_KEYS / SCDD_API_KEYS_FILE it keeps keys in "
        "DATA-DIR/api-keys.yaml and writes the first key, for tenant 'default', to DATA-DIR/api-key.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--data-dir", default="scdd-service", metavar="DIR",
                        help="Redis data, artifacts, API keys and logs (default ./scdd-service)")
    parser.add_argument("--max-running", type=_positive, metavar="N", help="jobs running at once (SCDD_MAX_RUNNING)")
    parser.add_argument("--redis-maxmemory", default="1gb", metavar="SIZE",
                        help="memory limit of the private redis-server (default 1gb); at it writes fail with 503 "
                             "and nothing stored is evicted")
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from service.redact import redact_text
    from service.serve import ServeError, ServeOptions, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return serve(ServeOptions(args.host, args.port, Path(args.data_dir), args.max_running, args.redis_maxmemory))
    except ServeError as exc:
        print(f"scdd serve: {redact_text(str(exc))}", file=sys.stderr)
        return 1
