"""Progress reporting, decoupled from how it is shown (console bars, or the job driver's events), and the
stage clock that times a job's stages and tells a listener where they start and end."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Union

import torch

Metric = Union[float, torch.Tensor]  # tensors are read (a device sync) only when shown


class Progress(Protocol):
    def start(self, stage: str, total: int, unit: str) -> None: ...

    def advance(self, n: int = 1, **metrics: Metric) -> None: ...

    def finish(self) -> None: ...


class SilentProgress:
    def start(self, stage: str, total: int, unit: str) -> None:
        pass

    def advance(self, n: int = 1, **metrics: Metric) -> None:
        pass

    def finish(self) -> None:
        pass


class ConsoleProgress:
    """tqdm bars on stderr, one per stage."""

    def __init__(self, refresh_seconds: float = 0.5) -> None:
        self._bar = None
        self._refresh_seconds = refresh_seconds
        self._last_postfix = 0.0

    def start(self, stage: str, total: int, unit: str) -> None:
        from tqdm import tqdm

        self.finish()
        self._bar = tqdm(total=total, desc=f"{stage:>8}", unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def advance(self, n: int = 1, **metrics: Metric) -> None:
        if self._bar is None:
            return
        now = time.monotonic()
        if metrics and now - self._last_postfix >= self._refresh_seconds:
            self._bar.set_postfix({k: f"{float(v):.3g}" for k, v in metrics.items()}, refresh=False)
            self._last_postfix = now
        self._bar.update(n)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class CheckedProgress:
    """Another Progress, plus a `check` called on every `start` and `advance`: the check raises
    (e.g. `JobCancelled`) to stop the loop that reports, between two of its steps."""

    def __init__(self, inner: Progress, check: Callable[[], None]) -> None:
        self.inner, self.check = inner, check

    def start(self, stage: str, total: int, unit: str) -> None:
        self.check()
        self.inner.start(stage, total, unit)

    def advance(self, n: int = 1, **metrics: Metric) -> None:
        self.check()
        self.inner.advance(n, **metrics)

    def finish(self) -> None:
        self.inner.finish()


StageListener = Callable[[str, str, float], None]  # ("started" | "finished", stage, seconds)


@dataclass
class StageClock:
    """Seconds per stage (a stage that comes again adds up), told to `listener` as stages start and end."""

    seconds: dict[str, float] = field(default_factory=dict)
    listener: StageListener | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        if self.listener is not None:
            self.listener("started", name, 0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self.seconds[name] = round(self.seconds.get(name, 0.0) + elapsed, 3)
        if self.listener is not None:
            self.listener("finished", name, elapsed)
