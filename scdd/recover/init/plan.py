"""The initialisation plan of a recover run: what it is, how it is stored and read back."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn

from scdd.data import RealData
from scdd.registry import Registry
from scdd.runtime import Runtime
from scdd.layout import ORIGINS_PATH, init_round_path
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
    """(K, ipc, C, S, S) initial pixels in [0, 1] and each image's origin [class][round]."""

    pixels: torch.Tensor
    origins: list[list[Origin]]


InitFn = Callable[[RealData, nn.Module, "RecoverSpec", Runtime, int], InitPlan]
INITS: Registry[Optional[InitFn]] = Registry("recover init")
register_init = INITS.register


def plan_initialisation(data: RealData, teacher: nn.Module, spec: RecoverSpec, runtime: Runtime, seed: int,
                        store: ArtifactStore) -> None:
    """Plan and store the initialisation of a real-pixel init, once: a resumed run keeps the stored one
    (recover units read it through `InitReader`). Nothing to do for `noise`."""
    build = INITS.get(spec.init)
    if build is not None and not store.exists(ORIGINS_PATH):
        teacher.eval()
        plan = build(data, teacher, spec, runtime, seed)
        for r in range(spec.ipc):
            pixels = (plan.pixels[:, r].clamp(0, 1) * 255).round().to(torch.uint8)
            buffer = io.BytesIO()
            torch.save(pixels.contiguous(), buffer)
            store.write_bytes(init_round_path(r), buffer.getvalue())
        store.write_json(ORIGINS_PATH, [[o.to_dict() for o in per_class] for per_class in plan.origins])


def load_origins(store: ArtifactStore) -> list[list[dict]] | None:
    return store.read_json(ORIGINS_PATH) if store.exists(ORIGINS_PATH) else None


def init_reader(store: ArtifactStore, init: str) -> "InitReader | None":
    """The reader of a real-pixel init's stored pixels; None for `noise` (each unit draws its own)."""
    return InitReader(store) if INITS.get(init) is not None else None


class InitReader:
    """Reads the stored initial pixels of a run, keeping the last round read (units run round by round)."""

    def __init__(self, store: ArtifactStore):
        self.store = store
        self._round: int | None = None
        self._pixels: torch.Tensor | None = None
        self._origins: list[list[dict]] | None = None

    def origin(self, label: int, round_index: int) -> dict:
        """The provenance of the initial image of class position `label` in round `round_index`."""
        if self._origins is None:
            self._origins = load_origins(self.store)
            if self._origins is None:
                raise FileNotFoundError(f"{self.store.url_of(ORIGINS_PATH)} is missing: the run's initialisation was never planned")
        return self._origins[label][round_index]

    def pixels(self, round_index: int, labels: tuple[int, ...]) -> torch.Tensor:
        """(n, C, S, S) initial pixels in [0, 1] of `labels` (class positions) in round `round_index`."""
        if self._round != round_index:
            data = self.store.read_bytes(init_round_path(round_index))
            self._pixels = torch.load(io.BytesIO(data), weights_only=True)
            self._round = round_index
        return self._pixels[list(labels)].float().div(255)
