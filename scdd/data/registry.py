"""The dataset registry: name -> builder(DatasetSpec, seed) -> RealData."""

from __future__ import annotations

from typing import Callable

from api_schema import DatasetSpec
from scdd.data.base import RealData
from scdd.registry import Registry

DatasetBuilder = Callable[[DatasetSpec, int], RealData]
DATASETS: Registry[DatasetBuilder] = Registry("dataset")
register_dataset = DATASETS.register
