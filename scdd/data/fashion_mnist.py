"""Fashion-MNIST from its IDX files on disk (Debian package `dataset-fashion-mnist`)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from scdd.data.base import DatasetInfo, RealData, TensorImageDataset, limit_per_class, select_classes, slug
from scdd.data.registry import register_dataset
from scdd.errors import DataError

if TYPE_CHECKING:  # annotations only: the compute path imports without pydantic (bench/gpu_check.py)
    from api_schema import DatasetSpec

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Mean and std of the 60k training pixels (computed from the IDX files).
MEAN, STD = (0.2860,), (0.3530,)
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}; install the Debian package "
        f"dataset-fashion-mnist or point --data-dir at a folder with the four IDX files"
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}; replace the file") from None
    if len(raw) < 4:
        raise DataError(f"IDX file {path} is truncated; replace the file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic); replace the file")
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(shape))
    if len(raw) - header != count:
        raise DataError(f"IDX file {path} holds {len(raw) - header} bytes, its header says {count}; replace the file")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    image_path, label_path = (_find(root, stem) for stem in FILES[split])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{image_path} and {label_path} do not match: shapes {images.shape} and {labels.shape}")
    if labels.max() >= len(CLASS_NAMES):
        raise DataError(f"{label_path} has label {labels.max()}; Fashion-MNIST has 10 classes")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def resize_center_crop(images: torch.Tensor, size: int, ratio: float) -> torch.Tensor:
    """(N, C, H, W) uint8 -> resized to round(size x ratio) (antialiased bilinear), centre-cropped to (size, size):
    the test split's Resize + CenterCrop (dataset.test_resize_ratio), once when the split is built."""
    resized = TF.resize(images, [round(size * ratio)] * 2, antialias=True)
    return TF.center_crop(resized, [size, size]).contiguous()


@register_dataset("fashion-mnist")
def fashion_mnist(spec: DatasetSpec, seed: int) -> RealData:
    root = Path(spec.root or DEFAULT_ROOT)
    if not root.is_dir():
        raise DataError(
            f"Fashion-MNIST folder {root} does not exist; install the Debian package dataset-fashion-mnist "
            f"or pass --data-dir pointing at the IDX files"
        )
    chosen = select_classes(CLASS_NAMES, spec.classes)
    remap = torch.full((len(CLASS_NAMES),), -1, dtype=torch.long)
    remap[chosen] = torch.arange(len(chosen))
    size = spec.image_size or 28
    ratio = float(getattr(spec, "test_resize_ratio", 1.0))

    def load(split: str, limit: int | None) -> TensorImageDataset:
        images, labels = _split(root, split)
        keep = (remap[labels] >= 0).nonzero().flatten()
        keep = keep[limit_per_class(labels[keep], limit, seed)]
        images, labels = images[keep], remap[labels[keep]]
        if split == "test" and ratio != 1:
            images = resize_center_crop(images, size, ratio)
        elif size != 28:
            images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
            images = images.round().clamp(0, 255).to(torch.uint8)
        return TensorImageDataset(images, labels, MEAN, STD, source_index=keep)

    width = len(str(len(CLASS_NAMES) - 1))
    info = DatasetInfo(
        name="fashion-mnist",
        class_names=tuple(CLASS_NAMES[i] for i in chosen),
        class_dirs=tuple(f"{i:0{width}d}-{slug(CLASS_NAMES[i])}" for i in chosen),
        source_indices=tuple(chosen),
        channels=1,
        image_size=size,
        mean=MEAN,
        std=STD,
    )
    return RealData(info=info, train=load("train", spec.train_limit), test=load("test", spec.test_limit))
