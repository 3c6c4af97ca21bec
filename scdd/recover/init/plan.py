"""The initialisation plan of a recover run: what it is, how it is stored and read back."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
from torch import nn

from scdd.data import RealData
from scdd.registry import Registry
from scdd.runtime import Runtime
from scdd.layout import INIT_DIR, INIT_DONE, init_origins_path, init_pixels_path
from scdd.store import ArtifactStore

if TYPE_CHECKING:  # annotations only: the compute path imports without pydantic (bench/gpu_check.py)
    from api_schema import RecoverSpec


@dataclass(frozen=True)
class Origin:
    """Where one initial image came from (manifest.json's `origin` of the image)."""

    init: str  # the initialisation's name
    train_index: int  # position in the loaded training split
    source_index: Optional[int]  # index in the source dataset's training split file, where known
    source_file: Optional[str]  # the image file, for file datasets
    box: tuple[float, float, float, float]  # crop (x0, y0, w, h) in pixels of the source image
    loss: Optional[float]  # the recovery teacher's -log p(y | crop), where scored

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class InitPlan:
    """(k, ipc, C, S, S) initial pixels in [0, 1] of the k classes planned and each image's origin [class][round]."""

    pixels: torch.Tensor
    origins: list[list[Origin]]


InitFn = Callable[..., InitPlan]  # (data, teacher, spec, runtime, seed, labels=None) -> the plan of `labels`
INITS: Registry[Optional[InitFn]] = Registry("recover init")
register_init = INITS.register


def plan_init_classes(data: RealData, teacher: nn.Module, spec: RecoverSpec, runtime: Runtime, seed: int,
                      store: ArtifactStore, labels: Sequence[int]) -> int:
    """Plan and store the initialisation of each class in `labels` not stored yet (a resumed or retried slice
    skips the classes it finished): its pixels `state/init/c<label>.pt` ((ipc, C, S, S) uint8), then its
    origins `state/init/c<label>.json`, written last, which marks the class done. Returns the classes planned.
    A class's plan depends on the seed and the class alone (its own generator), so slices of any size, in
    any process, plan the same images."""
    build = INITS.get(spec.init)
    if build is None:
        return 0
    stored = set(store.list(INIT_DIR))
    todo = [label for label in labels if init_origins_path(label) not in stored]
    teacher.eval()
    for label in todo:
        plan = build(data, teacher, spec, runtime, seed, [label])
        pixels = (plan.pixels[0].clamp(0, 1) * 255).round().to(torch.uint8)
        buffer = io.BytesIO()
        torch.save(pixels.contiguous(), buffer)
        store.write_bytes(init_pixels_path(label), buffer.getvalue())
        store.write_json(init_origins_path(label), [o.to_dict() for o in plan.origins[0]])
    return len(todo)


def init_planned(store: ArtifactStore) -> bool:
    return store.exists(INIT_DONE)


def mark_init_planned(store: ArtifactStore, spec: RecoverSpec, classes: int) -> None:
    """Recorded by the driver once every class slice is planned: a resumed run plans nothing again."""
    store.write_json(INIT_DONE, {"init": spec.init, "classes": classes, "ipc": spec.ipc})


def init_reader(store: ArtifactStore, init: str) -> "InitReader | None":
    """The reader of a real-pixel init's stored pixels; None for `noise` (each unit draws its own)."""
    return InitReader(store) if INITS.get(init) is not None else None


class InitReader:
    """Reads the stored initial pixels of a run class by class, keeping the classes read (a worker reads those
    of its own slice: units run round by round over the same classes)."""

    def __init__(self, store: ArtifactStore):
        self.store = store
        self._pixels: dict[int, torch.Tensor] = {}
        self._origins: dict[int, list[dict]] = {}

    def origin(self, label: int, round_index: int) -> dict:
        """The provenance of the initial image of class position `label` in round `round_index`."""
        if label not in self._origins:
            path = init_origins_path(label)
            if not self.store.exists(path):
                raise FileNotFoundError(f"{self.store.url_of(path)} is missing: the run's initialisation was never planned")
            self._origins[label] = self.store.read_json(path)
        return self._origins[label][round_index]

    def pixels(self, round_index: int, labels: tuple[int, ...]) -> torch.Tensor:
        """(n, C, S, S) initial pixels in [0, 1] of `labels` (class positions) in round `round_index`."""
        for label in labels:
            if label not in self._pixels:
                data = self.store.read_bytes(init_pixels_path(label))
                self._pixels[label] = torch.load(io.BytesIO(data), weights_only=True)
        return torch.stack([self._pixels[label][round_index] for label in labels]).float().div(255)
