"""Real datasets by registered name."""

from api_schema import DatasetSpec
from scdd.data import fashion_mnist, imagefolder  # noqa: F401  (register the builders)
from scdd.data.base import DatasetInfo, RealData
from scdd.data.loader import iterate_batches
from scdd.data.registry import DATASETS


def load_dataset(spec: DatasetSpec, seed: int = 0) -> RealData:
    return DATASETS.get(spec.name)(spec, seed)


__all__ = ["DATASETS", "DatasetInfo", "RealData", "iterate_batches", "load_dataset"]
