"""Job events: what the job driver publishes while a job runs, and the sinks it publishes to.

An event is a flat JSON-able dict with `type`, `seq` (1, 2, ... per job), `time` (unix seconds) and
type-specific fields:
- `job_started` (job_id, workers), `job_finished` (status: succeeded / failed / cancelled, plus
  error or the report summary);
- `stage_started` / `stage_finished` (stage; seconds on finish);
- `progress` (stage, fraction 0..1 of the stage, done, total, unit, eta_s, and the loop's latest
  metrics: losses, round, images_written, epoch ...);
- `error` (stage, message).
The CLI prints them (`HumanSink`) and can log them (`FileSink`, `scdd distill --events FILE`); a service
job's Ray entrypoint adds its Redis sink (service/entrypoint.py). `ThrottledSink` passes at most a few
progress events per second per stage; every other event passes.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, Protocol, TextIO

from scdd.progress import Metric


class EventSink(Protocol):
    def publish(self, event: dict[str, Any]) -> None: ...


class ListSink:
    """Keeps the events (tests, and the driver's own record)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def publish(self, event: dict[str, Any]) -> None:
        self.events.append(event)


class HumanSink:
    """Readable lines for a terminal: stage boundaries, every 10 % of a loop, errors, the end."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._shown: dict[str, int] = {}

    def publish(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "progress":
            key, tenth = f'{event["stage"]}/{event.get("loop")}', int(event["fraction"] * 10)
            if self._shown.get(key, -1) >= tenth:
                return
            self._shown[key] = tenth
            skip = {"type", "stage", "loop", "fraction", "job_fraction", "done", "total", "unit", "eta_s", "seq", "time"}
            metrics = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in event.items() if k not in skip)
            eta = f", ETA {event['eta_s']:.0f} s" if event.get("eta_s") else ""
            line = (f"  {event['stage']:>9} {event.get('loop', ''):>9} {100 * event['fraction']:5.1f}% "
                    f"({event['done']}/{event['total']} {event['unit']}{eta}) {metrics}")
        elif kind == "stage_started":
            line = f"scdd: {event['stage']} ..."
        elif kind == "stage_finished":
            line = f"scdd: {event['stage']} done in {event['seconds']:.1f} s"
        elif kind == "error":
            line = f"scdd: {event['message']}"
        elif kind == "job_finished":
            line = f"scdd: job {event['job_id']} {event['status']} after {event['seconds']:.1f} s"
        else:
            line = f"scdd: {kind} {event.get('job_id', '')}"
        print(line, file=self.stream, flush=True)


class FileSink:
    """One JSON line per event, appended to a local file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def publish(self, event: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(event, sort_keys=True) + "\n")


class FanOut:
    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = sinks

    def publish(self, event: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.publish(event)


PROGRESS_FIELDS = {"type", "stage", "loop", "fraction", "job_fraction", "done", "total", "unit", "eta_s"}


class ThrottledSink:
    """Numbers the events and forwards them; progress events of a loop at most every `interval_s` (the last of a
    stage, fraction 1, always passes), counted apart for each set of metrics an event carries: a recover unit's
    CE/BN record is not dropped because a bare step event went out just before it. Thread-safe."""

    def __init__(self, sink: EventSink, interval_s: float = 0.25) -> None:
        self.sink, self.interval_s = sink, interval_s
        self._seq = 0
        self._last_progress: dict[str, float] = {}
        self._lock = threading.Lock()

    def publish(self, event: dict[str, Any]) -> None:
        with self._lock:
            now = time.time()
            if event["type"] == "progress" and event.get("fraction", 0) < 1:
                metrics = ",".join(sorted(set(event) - PROGRESS_FIELDS))
                key = f'{event["stage"]}/{event.get("loop")}/{metrics}'
                if now - self._last_progress.get(key, 0.0) < self.interval_s:
                    return
                self._last_progress[key] = now
            self._seq += 1
            self.sink.publish({**event, "seq": self._seq, "time": round(now, 3)})


def plain(metrics: dict[str, Metric]) -> dict[str, float | int]:
    return {key: value if isinstance(value, int) else round(float(value), 6) for key, value in metrics.items()}


# Share of a whole job's time each pipeline stage is counted as, in pipeline order, for the
# job-level fraction (a stage that comes again later, as squeeze does for the relabel teacher,
# cannot move it back).
STAGE_WEIGHTS = {"load": 0.02, "squeeze": 0.30, "recover": 0.48, "write": 0.02, "validate": 0.09, "baseline": 0.09}
STAGE_BASE = {name: sum(list(STAGE_WEIGHTS.values())[:i]) for i, name in enumerate(STAGE_WEIGHTS)}


class JobEvents:
    """Publishes one job's events: stage boundaries (`stage`, called by the pipeline's stage clock)
    and progress (as a `scdd.progress.Progress` for the loops of the current stage, in this process
    or relayed from remote workers). `job_fraction` in progress events never decreases."""

    def __init__(self, sink: EventSink) -> None:
        self.sink = sink
        self.stage_name = ""
        self.job_fraction = 0.0
        self._base = 0.0
        self._loop, self._total, self._done, self._unit, self._started = "", 1, 0, "", 0.0

    def stage(self, what: str, name: str, seconds: float) -> None:
        if what == "started":
            self.stage_name = name
            self._base = STAGE_BASE.get(name, self.job_fraction)
            self.sink.publish({"type": "stage_started", "stage": name})
        else:
            self._raise_fraction(self._base + STAGE_WEIGHTS.get(name, 0.0))
            self.sink.publish({"type": "stage_finished", "stage": name, "seconds": round(seconds, 3)})

    def _raise_fraction(self, value: float) -> None:
        self.job_fraction = round(min(1.0, max(self.job_fraction, value)), 4)

    def start(self, stage: str, total: int, unit: str) -> None:
        self._loop, self._total, self._done, self._unit = stage, max(total, 1), 0, unit
        self._started = time.monotonic()

    def advance(self, n: int = 1, **metrics: Metric) -> None:
        self._done = min(self._total, self._done + n)
        fraction = self._done / self._total
        elapsed = time.monotonic() - self._started
        eta = elapsed / fraction * (1 - fraction) if fraction > 0 else None
        self.publish_progress(self._loop, fraction, self._done, self._total, self._unit, eta, plain(metrics))

    def publish_progress(self, loop: str, fraction: float, done: int, total: int, unit: str, eta_s: float | None,
                         metrics: dict[str, float]) -> None:
        self._raise_fraction(self._base + STAGE_WEIGHTS.get(self.stage_name, 0.0) * fraction)
        self.sink.publish({"type": "progress", "stage": self.stage_name, "loop": loop, "fraction": round(fraction, 4),
                           "job_fraction": self.job_fraction, "done": done, "total": total, "unit": unit,
                           "eta_s": None if eta_s is None else round(eta_s, 1), **metrics})

    def finish(self) -> None:
        pass
