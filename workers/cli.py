"""`scdd distill` through the Ray job driver: the workers' part of the command line (with `--workers N`,
N > 1, or `--events FILE`). Every stage runs on `resources.workers` workers; events are shown on stderr
and, with `--events`, appended to a file as JSON lines."""

from __future__ import annotations

import logging
import sys

from scdd.cli import DistillRun, describe_report


def distill_on_ray(run: DistillRun) -> int:
    from workers.driver import run_job
    from workers.events import FanOut, FileSink, HumanSink, ListSink

    logging.basicConfig(level=logging.INFO, format="scdd: %(message)s")
    sinks = [ListSink() if run.quiet else HumanSink()] + ([FileSink(run.events_file)] if run.events_file else [])
    outcome = run_job(run.spec, FanOut(*sinks))
    if outcome.status == "cancelled":
        print("scdd: cancelled; rerun the same command to resume", file=sys.stderr)
        return 130
    if outcome.status != "succeeded":
        print(f"scdd: error: {outcome.error}", file=sys.stderr)
        return 2
    print(describe_report(outcome.report))
    return 0
