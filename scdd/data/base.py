"""What every dataset provides: class metadata, normalisation and train/test splits.

Splits yield `(image, label)` with `image` a normalised float tensor of shape (C, S, S) and
`label` the position of the class in `DatasetInfo.class_names` (0..K-1 after a class subset).
"""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import torch
from torch.utils.data import Dataset

from scdd.errors import DataError, SpecError

if TYPE_CHECKING:  # annotations only: the compute path imports without pydantic (bench/gpu_check.py)
    from api_schema import DatasetSpec


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    class_names: tuple[str, ...]
    class_dirs: tuple[str, ...]  # output folder per class (scdd.layout.class_folders); sorts in class order but where
    # a name had to be encoded: read a set back through its manifest
    source_indices: tuple[int, ...]  # each class's index in the full source dataset
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    normalization: str = "default"  # where mean/std come from: default, measured or given (dataset.normalization)
    test_resize_ratio: float = 1.0  # test images: resized to round(image_size x ratio), centre-cropped to image_size

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def pixel_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (low, high) of valid normalised pixels, shaped (C, 1, 1)."""
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (0 - mean) / std, (1 - mean) / std

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) pixels in [0, 1] -> normalised."""
        mean = torch.tensor(self.mean, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, -1, 1, 1)
        return (pixels - mean) / std

    def normalize_uint8(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) uint8 pixels -> normalised float32, on the pixels' device (the float copy is per batch)."""
        return self.normalize(pixels.float().div_(255))

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) normalised -> pixels in [0, 1]."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float() * std + mean).clamp(0, 1)


@dataclass(frozen=True)
class PixelSet:
    """Images as they travel and wait: uint8 pixels (n, C, S, S) and labels (n,); `batch` makes the float copy
    of one batch, normalised with (mean, std), on the pixels' device. A rank's shard of a larger set (the
    distilled set, the random-real baseline) is a PixelSet of its part; `total` is the whole set's size."""

    pixels: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    total: int | None = None  # None: this is the whole set

    def __post_init__(self) -> None:
        if self.pixels.dtype != torch.uint8 or self.pixels.dim() != 4 or len(self.pixels) != len(self.labels):
            raise ValueError("a PixelSet holds uint8 pixels (n, C, S, S) and n labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def set_size(self) -> int:
        return len(self) if self.total is None else self.total

    def to(self, device: torch.device | str) -> "PixelSet":
        return PixelSet(self.pixels.to(device), self.labels.to(device), self.mean, self.std, self.total)

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        """(b, C, S, S) normalised float32 images of the samples at `index`."""
        images = self.pixels[index].float().div_(255)
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std

    @staticmethod
    def from_normalized(images: torch.Tensor, labels: torch.Tensor, info: "DatasetInfo") -> "PixelSet":
        """Normalised float images back to uint8 pixels (exact for images that came from uint8 pixels)."""
        pixels = (info.denormalize(images) * 255).round().to(torch.uint8)
        return PixelSet(pixels, labels.long(), info.mean, info.std)

    def normalized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image, normalised float, and the labels (small sets only: tests and benches)."""
        return self.batch(torch.arange(len(self))), self.labels


@dataclass(frozen=True)
class RealData:
    info: DatasetInfo
    train: Dataset
    test: Dataset


class TensorImageDataset(Dataset):
    """Images held in memory as uint8 (N, C, H, W); normalised on access."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 source_index: torch.Tensor | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be uint8 (N, C, H, W)")
        self.images = images
        self.labels = labels.long()
        self.source_index = source_index  # (N,) each image's index in the source split file, where known
        self.mean, self.std = tuple(mean), tuple(std)
        self._mean = torch.tensor(mean).view(1, -1, 1, 1)
        self._std = torch.tensor(std).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((n, C, S, S) uint8 pixels, (n,) labels) of the samples at `index` (no float copy)."""
        return self.images[index], self.labels[index]

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.images[index].float().div_(255)
        return (images - self._mean) / self._std, self.labels[index]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        images, labels = self.batch(torch.tensor([i]))
        return images[0], int(labels[0])

    def with_stats(self, mean: Sequence[float], std: Sequence[float]) -> "TensorImageDataset":
        """The same images, normalised with (mean, std)."""
        return TensorImageDataset(self.images, self.labels, mean, std, self.source_index)


def slug(name: str) -> str:
    """A class name made safe as a folder name."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned or "class"


def select_classes(all_names: Sequence[str], wanted: Sequence[int | str] | None) -> list[int]:
    """Resolve a subset given by source index or name into sorted, unique source indices."""
    if wanted is None:
        return list(range(len(all_names)))
    by_name = {name: i for i, name in enumerate(all_names)}
    chosen: set[int] = set()
    for ref in wanted:
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit() and ref not in by_name):
            index = int(ref)
            if not 0 <= index < len(all_names):
                raise DataError(
                    f"class index {index} is out of range: the dataset has {len(all_names)} classes (0..{len(all_names) - 1})"
                )
            chosen.add(index)
        elif ref in by_name:
            chosen.add(by_name[ref])
        else:
            raise DataError(f"unknown class {ref!r}; the dataset's classes are: {', '.join(all_names)}")
    return sorted(chosen)


def class_members(labels: torch.Tensor, num_classes: int | None = None) -> list[torch.Tensor]:
    """Per label 0..K-1, the indices of its samples in ascending order (one stable sort, not a scan per class)."""
    num_classes = int(labels.max()) + 1 if num_classes is None and len(labels) else (num_classes or 0)
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=num_classes)[:num_classes].tolist()
    return list(torch.split(order, counts))


def limit_per_class(labels: torch.Tensor, limit: int | None, seed: int) -> torch.Tensor:
    """Indices of at most `limit` samples of each label, a seeded random pick, in original order."""
    if limit is None:
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    keep = []
    present = labels.unique()
    members = class_members(labels)
    for label in present.tolist():
        pick = torch.randperm(len(members[label]), generator=generator)[:limit]
        keep.append(members[label][pick])
    return torch.cat(keep).sort().values


MEASURE_LIMIT = 10_000  # normalization measured: at most this many training images, a seeded pick
MEASURE_CHUNK = 64  # images decoded per task
MEASURE_THREADS = 8  # decodes in flight (file-decoding datasets: PIL releases the GIL)


Stats = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std), one value per channel


def measure_mean_std(train: Dataset, seed: int, limit: int = MEASURE_LIMIT) -> Stats:
    """Per-channel mean and std of the pixels, in [0, 1], of at most `limit` images of `train` (a seeded random pick
    when it holds more; all of them otherwise): only those are decoded, through the dataset's `pixels(index)`. The
    std is the population std over every pixel of the picked images."""
    if not hasattr(train, "pixels"):
        raise DataError(f"dataset.normalization 'measured' needs a dataset that gives its pixels; "
                        f"{type(train).__name__} does not: use normalization 'given' with dataset.mean and dataset.std")
    n = len(train)
    if n == 0:
        raise DataError("dataset.normalization 'measured' found no training images to measure; check dataset.classes "
                        "and dataset.train_limit, or use normalization 'given'")
    if n > limit:
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    else:
        pick = torch.arange(n)

    def sums(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        pixels = train.pixels(index)[0].to(torch.float64).div_(255)  # (b, C, H, W)
        flat = pixels.transpose(0, 1).reshape(pixels.shape[1], -1)
        return flat.sum(1), flat.square().sum(1), flat.shape[1]

    chunks = list(torch.split(pick, MEASURE_CHUNK))
    with ThreadPoolExecutor(min(MEASURE_THREADS, len(chunks))) as pool:
        parts = list(pool.map(sums, chunks))
    count = sum(part[2] for part in parts)
    total = torch.stack([part[0] for part in parts]).sum(0)
    squares = torch.stack([part[1] for part in parts]).sum(0)
    mean = total / count
    var = (squares / count - mean.square()).clamp_min(0)
    return tuple(float(m) for m in mean), tuple(max(float(math.sqrt(v)), 1e-6) for v in var)


def normalization_stats(spec: DatasetSpec, data: RealData, seed: int) -> Stats:
    """The (mean, std) every model of the job sees: dataset.normalization default (the dataset's own values), given
    (dataset.mean / dataset.std, one per image channel) or measured (`measure_mean_std` on the training split)."""
    how = getattr(spec, "normalization", "default")
    info = data.info
    if how == "default":
        return info.mean, info.std
    if how == "given":
        mean, std = tuple(spec.mean or ()), tuple(spec.std or ())
        if len(mean) != info.channels or len(std) != info.channels:
            plural = "s" if info.channels != 1 else ""
            raise SpecError(f"dataset.mean and dataset.std give {len(mean)} and {len(std)} values, but {info.name} "
                            f"images have {info.channels} channel{plural}: give one value per channel in each")
        return tuple(float(m) for m in mean), tuple(float(v) for v in std)
    if how == "measured":
        return measure_mean_std(data.train, seed)
    raise SpecError(f"dataset.normalization {how!r} is unknown; use default, measured or given")


def apply_normalization(spec: DatasetSpec, data: RealData, seed: int) -> RealData:
    """`data` with the job's normalisation (`normalization_stats`) in its info and both splits, and the info's record
    of it (normalization, test_resize_ratio). Default normalisation returns the splits as they are."""
    how = getattr(spec, "normalization", "default")
    info = replace(data.info, normalization=how, test_resize_ratio=float(getattr(spec, "test_resize_ratio", 1.0)))
    if how == "default":
        return RealData(info, data.train, data.test)
    mean, std = normalization_stats(spec, data, seed)
    splits = []
    for split in (data.train, data.test):
        if not hasattr(split, "with_stats"):
            raise DataError(f"dataset {info.name!r} cannot change its normalisation ({type(split).__name__} has no "
                            "with_stats); use dataset.normalization 'default'")
        splits.append(split.with_stats(mean, std))
    return RealData(replace(info, mean=mean, std=std), splits[0], splits[1])
