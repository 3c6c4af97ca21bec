"""Rows, part results, the printed table and the JSON file of bench/gpu_check.py."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional


class Skipped(Exception):
    """A part that does not apply on this machine; the message says why."""


class PartFailed(Exception):
    """Some cases of a part failed after others were measured: their rows are kept."""

    def __init__(self, cause: str, rows: list["Row"]):
        super().__init__(cause)
        self.rows = rows


@dataclass(frozen=True)
class Row:
    """One measured case. Rates are per second: image-iterations (recover) or images (KD student)."""

    case: str
    rate: Optional[float] = None
    unit: str = "img-it/s"
    vs_yardstick: Optional[float] = None  # rate / the published loop's rate on the same teacher
    tflops: Optional[float] = None  # rate x counted FLOPs per unit (bench/gpu_check_parts/flops.py)
    mib_per_image: Optional[float] = None  # device memory the measured call allocated, per image (CUDA only)
    compile_s: Optional[float] = None  # one-time cost of the first call (torch.compile), where compiled
    workload_h: Optional[float] = None  # hours of the shape's workload at this rate
    note: str = ""


@dataclass
class PartResult:
    part: str
    status: str  # "ok", "failed" or "skipped"
    budget_s: float
    seconds: float
    rows: list[Row] = field(default_factory=list)
    cause: str = ""  # failed or skipped: one line


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def run_part(name: str, budget_s: float, measure: Callable[[float], list[Row]]) -> PartResult:
    """Run one part with its budget; a failure becomes the part's status and one-line cause."""
    started = time.perf_counter()
    try:
        rows = measure(budget_s)
        status, cause = "ok", ""
    except Skipped as skip:
        rows, status, cause = [], "skipped", str(skip)
    except PartFailed as failed:
        rows, status, cause = failed.rows, "failed", str(failed)
    except Exception as exc:  # one failing part must not stop the others
        rows, status, cause = [], "failed", one_line(exc)
    return PartResult(name, status, budget_s, time.perf_counter() - started, rows, cause)


COLUMNS = (  # header, width, how a row's value is shown
    ("rate", 9, lambda r: _num(r.rate, ".1f")),
    ("unit", 8, lambda r: r.unit if r.rate is not None else "-"),
    ("x yard", 6, lambda r: _num(r.vs_yardstick, ".2f")),
    ("TFLOP/s", 7, lambda r: _num(r.tflops, ".3g")),
    ("MiB/img", 7, lambda r: _num(r.mib_per_image, ".1f")),
    ("compile s", 9, lambda r: _num(r.compile_s, ".1f")),
    ("workload h", 10, lambda r: _num(r.workload_h, ".3g")),
)


def _num(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(parts: list[PartResult]) -> str:
    """One line per row; a part's name, status and seconds/budget on its first line only."""
    width = max([len(p.part) for p in parts] + [4])
    case_width = max([len(r.case) for p in parts for r in p.rows] + [4])
    head = (f"{'part':<{width}} {'status':<7} {'s/budget':>8}  {'case':<{case_width}} "
            + " ".join(f"{h:>{w}}" for h, w, _ in COLUMNS) + "  note")
    lines = [head, "-" * len(head)]
    for part in parts:
        first = f"{part.part:<{width}} {part.status:<7} {f'{part.seconds:.0f}/{part.budget_s:.0f}':>8}"
        if not part.rows:
            cells = " ".join(f"{'-':>{w}}" for _, w, _ in COLUMNS)
            lines.append(f"{first}  {'':<{case_width}} {cells}  {part.cause}")
        for index, row in enumerate(part.rows):
            cells = " ".join(f"{show(row):>{w}}" for _, w, show in COLUMNS)
            lines.append(f"{first if index == 0 else '':<{len(first)}}  {row.case:<{case_width}} {cells}  {row.note}")
    return "\n".join(lines)


def write_json(path: Path, header: dict[str, Any], parts: list[PartResult], seconds: float) -> None:
    document = {**header, "seconds": round(seconds, 1), "parts": [asdict(p) for p in parts]}
    path.write_text(json.dumps(document, indent=2) + "\n")
