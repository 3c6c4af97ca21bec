"""An ImageNet-style folder: `root/train/<class>/*.jpg` and `root/val/<class>/*.jpg`.

The layout is checked up front (missing folders, empty classes, train/val class mismatch) so a
mistake is reported before any training starts; a file that cannot be decoded is reported by name
when it is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from scdd.data.base import DatasetInfo, RealData, limit_per_class, select_classes
from scdd.data.registry import register_dataset
from scdd.errors import CorruptImageError, DataError

if TYPE_CHECKING:  # annotations only: the compute path imports without pydantic (bench/gpu_check.py)
    from api_schema import DatasetSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise CorruptImageError(f"cannot decode image {path}: {exc}; remove or replace the file") from None


class ImageFileDataset(Dataset):
    """(path, label) samples -> (normalised (3, S, S) tensor, label): resize shorter side, centre crop."""

    def __init__(self, samples: list[tuple[Path, int]], size: int, mean, std):
        self.samples = samples
        self.size = size
        self.mean, self.std = list(mean), list(std)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        image = load_rgb(path)
        image = TF.center_crop(TF.resize(image, self.size, antialias=True), [self.size, self.size])
        return TF.normalize(TF.to_tensor(image), self.mean, self.std), label


def _class_folders(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise DataError(f"folder {split_dir} does not exist; an imagefolder dataset needs train/ and val/ sub-folders")
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"folder {split_dir} has no class sub-folders; put each class's images in {split_dir}/<class>/")
    return names


def _images_of(class_dir: Path) -> list[Path]:
    files = sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(
            f"class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
        )
    return files


@register_dataset("imagefolder")
def imagefolder(spec: DatasetSpec, seed: int) -> RealData:
    if not spec.root:
        raise DataError("dataset 'imagefolder' needs a root folder with train/ and val/; pass --data-dir")
    root = Path(spec.root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist; pass --data-dir pointing at a folder with train/ and val/")
    train_classes, val_classes = _class_folders(root / "train"), _class_folders(root / "val")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(
            f"train/ and val/ of {root} hold different classes (only in train: {only_train or 'none'}; "
            f"only in val: {only_val or 'none'}); make the class folders match"
        )
    chosen = select_classes(train_classes, spec.classes)

    def samples(split: str) -> tuple[list[Path], torch.Tensor]:
        paths, labels = [], []
        for label, source_index in enumerate(chosen):
            files = _images_of(root / split / train_classes[source_index])
            paths += files
            labels += [label] * len(files)
        return paths, torch.tensor(labels)

    train_paths, train_labels = samples("train")
    keep = limit_per_class(train_labels, spec.train_limit, seed).tolist()
    train_samples = [(train_paths[i], int(train_labels[i])) for i in keep]
    val_paths, val_labels = samples("val")
    val_samples = [(val_paths[i], int(val_labels[i])) for i in limit_per_class(val_labels, spec.test_limit, seed).tolist()]

    size = spec.image_size or min(load_rgb(train_samples[0][0]).size)
    info = DatasetInfo(
        name="imagefolder",
        class_names=tuple(train_classes[i] for i in chosen),
        class_dirs=tuple(train_classes[i] for i in chosen),
        source_indices=tuple(chosen),
        channels=3,
        image_size=size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    return RealData(
        info=info,
        train=ImageFileDataset(train_samples, size, IMAGENET_MEAN, IMAGENET_STD),
        test=ImageFileDataset(val_samples, size, IMAGENET_MEAN, IMAGENET_STD),
    )
