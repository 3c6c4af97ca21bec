"""Real datasets by registered name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from scdd.data import fashion_mnist, imagefolder  # noqa: F401  (register the builders)
from scdd.data.base import DatasetInfo, RealData, apply_normalization
from scdd.data.loader import iterate_batches
from scdd.data.registry import DATASETS

if TYPE_CHECKING:  # annotations only: the compute path imports without pydantic (bench/gpu_check.py)
    from api_schema import DatasetSpec


def load_dataset(spec: DatasetSpec, seed: int = 0) -> RealData:
    """The dataset's splits (the builder applies dataset.test_resize_ratio to the test split), normalised as
    dataset.normalization says (`apply_normalization`: default, measured on the training split with `seed`, or
    given)."""
    return apply_normalization(spec, DATASETS.get(spec.name)(spec, seed), seed)


__all__ = ["DATASETS", "DatasetInfo", "RealData", "iterate_batches", "load_dataset"]
