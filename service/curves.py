"""Loss curves that outlive the event stream.

A job's event stream is trimmed at SCDD_EVENTS_MAXLEN entries, so a day-long job would keep only its
last hour of `progress` events. Beside the stream, each (attempt, stage, loop) of a job keeps a
downsampled curve of the float metrics of its progress events (ce, bn, loss, ...): at most
`max_points` points however long the job runs, spread over the whole run, always with the latest one.
They live in the hash `<p>:job:<id>:curves` (field `<attempt>/<stage>/<loop>`, value: the curve as
JSON with its downsampler's state, so a new process of the job continues it) and go with the job at
retention. The job's Ray entrypoint records them (`CurveRecorder`, service/entrypoint.py);
GET /v1/jobs/{id}/curves reads them (`curves_out`). No I/O here.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable, Mapping, Optional

from api_schema import CurveOut, CurvesOut

# Fields of a progress event that are not metrics (some are floats: fraction, job_fraction, eta_s, time).
NOT_METRICS = frozenset({"type", "seq", "time", "stage", "loop", "fraction", "job_fraction", "done", "total", "unit",
                         "eta_s"})

# KEYS: job, curves. ARGV: field/value pairs. Writes only while the job's record exists (it always has an `id`):
# a driver still publishing after its job ended and expired (retention) must not leave a curves key nothing deletes.
WRITE = """
if redis.call('HEXISTS', KEYS[1], 'id') == 0 then return 0 end
redis.call('HSET', KEYS[2], unpack(ARGV))
return 1
"""


def curve_key(attempt: int, stage: str, loop: str) -> str:
    return f"{attempt}/{stage}/{loop}"


def point_of(event: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The curve point of a progress event: x = its done count, t = its time, values = its finite float metrics.
    None when it has none (a bare step event): such a point draws nothing. Counters (ints such as round or
    images_written) are left out, and so are NaN and infinities, which JSON cannot carry."""
    values = {name: value for name, value in event.items()
              if name not in NOT_METRICS and type(value) is float and math.isfinite(value)}
    if not values:
        return None
    at = event.get("time") or round(time.time(), 3)
    return {"x": float(event.get("done") or 0), "t": float(at), "values": values}


class Curve:
    """At most `max_points` points of one loop, by stride doubling: point i (0, 1, 2, ... in arrival order) is kept
    when i is a multiple of the stride; when more than max_points - 1 are kept, every other one goes and the stride
    doubles. So the kept points are always i = 0, stride, 2 stride, ...: evenly spread over the whole run, whatever
    its length, at O(1) amortised cost per point. The latest point is shown after them (unless it is kept anyway),
    so a curve always ends where the run is."""

    def __init__(self, max_points: int, stride: int = 1, seen: int = 0, kept: Optional[list] = None,
                 last: Optional[dict] = None) -> None:
        if max_points < 2:
            raise ValueError(f"a curve needs max_points >= 2, not {max_points}")
        self.max_points, self.stride, self.seen = max_points, stride, seen
        self.kept: list[dict] = kept or []
        self.last = last
        self._fit()

    def _fit(self) -> None:
        while len(self.kept) > self.max_points - 1:
            self.kept = self.kept[::2]
            self.stride *= 2

    def add(self, point: dict) -> bool:
        """Add the next point; True when it was kept (not only shown as the latest)."""
        index, self.seen, self.last = self.seen, self.seen + 1, point
        if index % self.stride:
            return False
        self.kept.append(point)
        self._fit()
        return True

    def _last_is_kept(self) -> bool:
        return (self.seen - 1) % self.stride == 0

    @property
    def points(self) -> list[dict]:
        if self.last is None or self._last_is_kept():
            return list(self.kept)
        return [*self.kept, self.last]

    def state(self) -> dict[str, Any]:
        return {"max_points": self.max_points, "stride": self.stride, "seen": self.seen, "points": self.points}

    @classmethod
    def restore(cls, state: Mapping[str, Any], max_points: int) -> "Curve":
        """A stored curve, continued under this process's `max_points` (thinned further when that is smaller)."""
        curve = cls(max_points, stride=int(state["stride"]), seen=int(state["seen"]))
        points = list(state["points"])
        curve.last = points[-1] if points else None
        curve.kept = points if curve.last is None or curve._last_is_kept() else points[:-1]
        curve._fit()
        return curve


class CurveRecorder:
    """The curves of one attempt of a job, as its entrypoint records them. `feed` takes every event and answers the
    fields of the curves hash to write now ({} mostly): a curve is written when it changed, at most every
    `min_interval_s` (progress arrives a few times a second per loop), at once when its loop ends (fraction 1), and
    every changed curve at any other event (stage boundaries, errors, the job's end), so what is stored is complete
    when the job ends. Curves already stored for this attempt (a restarted driver) are continued."""

    def __init__(self, attempt: int, max_points: int, stored: Mapping[str, str], min_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.attempt, self.max_points, self.min_interval_s, self.clock = attempt, max_points, min_interval_s, clock
        self.curves: dict[str, Curve] = {}
        self._names: dict[str, tuple[str, str]] = {}  # key -> (stage, loop)
        for key, text in stored.items():
            state = json.loads(text)
            if int(state["attempt"]) == attempt:
                self.curves[key], self._names[key] = Curve.restore(state, max_points), (state["stage"], state["loop"])
        self._dirty: set[str] = set()
        self._written: dict[str, float] = {}

    def feed(self, event: Mapping[str, Any]) -> dict[str, str]:
        if event["type"] != "progress":
            return self.flush()
        point = point_of(event)
        if point is None:
            return {}
        stage, loop = str(event.get("stage") or ""), str(event.get("loop") or "")
        key = curve_key(self.attempt, stage, loop)
        if key not in self.curves:
            self.curves[key], self._names[key] = Curve(self.max_points), (stage, loop)
        self.curves[key].add(point)
        self._dirty.add(key)
        now = self.clock()
        if event.get("fraction", 0) >= 1 or now - self._written.get(key, -math.inf) >= self.min_interval_s:
            return self._take([key], now)
        return {}

    def flush(self) -> dict[str, str]:
        """Every curve changed since it was last written."""
        return self._take(sorted(self._dirty), self.clock())

    def _take(self, keys: list[str], now: float) -> dict[str, str]:
        fields = {}
        for key in keys:
            stage, loop = self._names[key]
            fields[key] = json.dumps({"attempt": self.attempt, "stage": stage, "loop": loop,
                                      **self.curves[key].state()}, separators=(",", ":"))
            self._dirty.discard(key)
            self._written[key] = now
        return fields


def curves_out(job_id: str, stored: Mapping[str, str], max_points: int) -> CurvesOut:
    """The API's view of a job's stored curves, ordered by attempt, then by the time of their first point.
    `max_points` is the bound the curves were recorded with (the driver's setting), else the caller's."""
    states = [json.loads(text) for text in stored.values()]
    states.sort(key=lambda s: (int(s["attempt"]), s["points"][0]["t"] if s["points"] else math.inf,
                               s["stage"], s["loop"]))
    return CurvesOut(job_id=job_id, max_points=max((int(s["max_points"]) for s in states), default=max_points),
                     curves=[CurveOut(attempt=s["attempt"], stage=s["stage"], loop=s["loop"], points=s["points"])
                             for s in states])
