"""The dataset registry: name -> builder(DatasetSpec, seed) -> RealData."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from scdd.data.base import RealData
from scdd.registry import Registry

if TYPE_CHECKING:  # annotations only: the compute path imports without pydantic (bench/gpu_check.py)
    from api_schema import DatasetSpec

DatasetBuilder = Callable[["DatasetSpec", int], RealData]
DATASETS: Registry[DatasetBuilder] = Registry("dataset")
register_dataset = DATASETS.register
