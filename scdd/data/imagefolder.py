"""An ImageNet-style folder: `root/train/<class>/*.jpg` and `root/val/<class>/*.jpg`.

The layout is checked up front (missing folders, empty classes, train/val class mismatch) so a
mistake is reported before any training starts; a file that cannot be decoded is reported by name
when it is read.

The list of image files (the index) is built once per dataset and cached under
`$SCDD_CACHE_DIR/imagefolder-index/` (default `~/.cache/scdd`), keyed by the root's absolute path and its
modification state: the mtime_ns of `train/`, `val/` and of every class folder, which change when a file is
added to, removed from or renamed in a class folder. Files in sub-folders nested inside a class folder are
indexed, but those sub-folders' own times are not part of the key: a change made only inside one is not seen
until the class folder itself changes (or the cache file is deleted). The root must be a folder every worker
reads at the same path (a shared volume); a URL is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from scdd.data.base import DatasetInfo, RealData, limit_per_class, select_classes
from scdd.data.registry import register_dataset
from scdd.errors import CorruptImageError, DataError
from scdd.layout import class_folders

if TYPE_CHECKING:  # annotations only: the compute path imports without pydantic (bench/gpu_check.py)
    from api_schema import DatasetSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SPLITS = ("train", "val")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise CorruptImageError(f"cannot decode image {path}: {exc}; remove or replace the file") from None


class ImageFileDataset(Dataset):
    """(path, label) samples -> (normalised (3, S, S) tensor, label): resize shorter side to `resize` (default S),
    centre crop to S."""

    def __init__(self, samples: list[tuple[Path, int]], size: int, mean, std, resize: int | None = None):
        self.samples = samples
        self.size = size
        self.resize = size if resize is None else resize  # the test split: round(S x dataset.test_resize_ratio)
        self.mean, self.std = tuple(mean), tuple(std)

    def with_stats(self, mean, std) -> "ImageFileDataset":
        """The same samples, normalised with (mean, std)."""
        return ImageFileDataset(self.samples, self.size, mean, std, self.resize)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> torch.Tensor:
        """(n,) every sample's label, without making its path."""
        if isinstance(self.samples, SampleList):
            return self.samples.labels
        return torch.tensor([label for _path, label in self.samples], dtype=torch.long)

    def pixel(self, i: int) -> torch.Tensor:
        """Sample i decoded, shorter side resized to `resize` (S unless the test split's ratio says more),
        centre-cropped to S: (3, S, S) uint8."""
        image = load_rgb(self.samples[i][0])
        image = TF.center_crop(TF.resize(image, self.resize, antialias=True), [self.size, self.size])
        return TF.pil_to_tensor(image)

    def pixels(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((n, 3, S, S) uint8 pixels, (n,) labels) of the samples at `index`."""
        index = [int(i) for i in index]
        if not index:
            return torch.empty(0, 3, self.size, self.size, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
        return torch.stack([self.pixel(i) for i in index]), torch.tensor([self.samples[i][1] for i in index])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        pixels = self.pixel(i).float().div_(255)
        return TF.normalize(pixels, self.mean, self.std), self.samples[i][1]


def _class_folders(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise DataError(f"folder {split_dir} does not exist; an imagefolder dataset needs train/ and val/ sub-folders")
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"folder {split_dir} has no class sub-folders; put each class's images in {split_dir}/<class>/")
    return names


def _no_images(class_dir: Path) -> DataError:
    return DataError(
        f"class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
    )


def _list_images(class_dir: str) -> list[str]:
    """The image files under `class_dir` as '/'-joined names relative to it, the same files in the same order as
    `sorted(p for p in Path(class_dir).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)`:
    sub-folders are walked (symlinked ones not followed), symlinked files count, unreadable folders are skipped,
    sorted by path components. One `scandir` per folder and no `stat` per file (the directory entry's type)."""
    found: list[str] = []

    def walk(folder: str, prefix: str) -> None:
        try:
            with os.scandir(folder) as entries_it:
                entries = list(entries_it)
        except PermissionError:
            return
        for entry in entries:
            name = entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    walk(entry.path, f"{prefix}{name}/")
                    continue
                # Path.suffix: the text from the last dot, if that dot is neither the first nor the last character
                if name.lower().endswith(IMAGE_EXTENSIONS) and name.rfind(".") > 0 and entry.is_file():
                    found.append(prefix + name)
            except OSError:
                continue

    walk(class_dir, "")
    found.sort(key=lambda name: name.split("/"))
    return found


# ---- the index cache --------------------------------------------------------------------------------------------

INDEX_FORMAT = "scdd-imagefolder-index/1"
# A folder modified this recently may still change within the same mtime tick (coarse clocks, NFS, FAT's 2 s):
# an index of it is used but not cached, so a file added in that tick is never missed ("racy git").
_RACY_NS = 2_000_000_000
_log = logging.getLogger(__name__)


def index_cache_dir() -> Path:
    """Where ImageFolder indexes are cached: `$SCDD_CACHE_DIR/imagefolder-index` (default `~/.cache/scdd`)."""
    base = os.environ.get("SCDD_CACHE_DIR") or str(Path.home() / ".cache" / "scdd")
    return Path(base) / "imagefolder-index"


def _index_file(root: Path) -> Path:
    return index_cache_dir() / f"{hashlib.sha256(str(root).encode()).hexdigest()[:32]}.json"


def _folder_state(root: Path, classes: Sequence[str]) -> dict[str, int]:
    """The cache key's modification state: mtime_ns of train/, val/ and of each class folder of both."""
    state = {}
    for split in SPLITS:
        state[split] = os.stat(root / split).st_mtime_ns
        for name in classes:
            state[f"{split}/{name}"] = os.stat(root / split / name).st_mtime_ns
    return state


def _read_index(path: Path, root: Path, classes: Sequence[str], state: dict[str, int]) -> dict | None:
    """The cached {split: {class: [file names]}} when `path` holds the index of this root in this state; None when
    it is missing, stale, unreadable or malformed (then the caller rebuilds it)."""
    try:
        with open(path, encoding="utf-8") as handle:
            cached = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(cached, dict) or cached.get("format") != INDEX_FORMAT or cached.get("root") != str(root):
        return None
    if cached.get("extensions") != list(IMAGE_EXTENSIONS) or cached.get("state") != state:
        return None
    splits = cached.get("splits")
    if not isinstance(splits, dict):
        return None
    for split in SPLITS:
        files = splits.get(split)
        if not isinstance(files, dict) or set(files) != set(classes):
            return None
        for names in files.values():
            if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
                return None
    return splits


def _write_index(path: Path, root: Path, state: dict[str, int], splits: dict) -> None:
    """Write atomically (a temporary file in the same folder, then os.replace): a reader sees the old file or the
    new one, never half of one. A cache that cannot be written is only a warning."""
    document = {"format": INDEX_FORMAT, "root": str(root), "extensions": list(IMAGE_EXTENSIONS), "state": state,
                "splits": splits}
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        os.fchmod(descriptor, 0o644)  # mkstemp's 0600 would hide a shared cache from other users' jobs
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(document, handle, separators=(",", ":"))
        os.replace(temporary, path)
        temporary = None
    except OSError as exc:
        _log.warning("cannot cache the index of %s in %s (%s); set SCDD_CACHE_DIR to a writable folder", root,
                     path.parent, exc)
    finally:
        if temporary is not None:
            try:
                os.unlink(temporary)
            except OSError:
                pass


def load_index(root: Path, classes: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    """{split: {class folder: image file names relative to it, in order}} for train/ and val/ of `root`, read from
    the cache when it matches the folders' modification state, else listed once and cached."""
    root = Path(root).resolve()
    state = _folder_state(root, classes)
    path = _index_file(root)
    cached = _read_index(path, root, classes, state)
    if cached is not None:
        return cached
    splits = {split: {name: _list_images(str(root / split / name)) for name in classes} for split in SPLITS}
    if max(state.values()) < time.time_ns() - _RACY_NS:
        _write_index(path, root, state, splits)
    return splits


class SampleList(Sequence):
    """A split's (path, label) samples, held compactly: a file name (relative to its class folder) and a label
    per sample; the Path is made when a sample is read. `labels` is the (n,) tensor of every label."""

    def __init__(self, class_dirs: Sequence[Path], names: list[str], labels: torch.Tensor):
        self._dirs = list(class_dirs)  # label -> its class folder
        self._names = names
        self.labels = labels

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        label = int(self.labels[i])
        return self._dirs[label] / self._names[i], label

    def __iter__(self) -> Iterator[tuple[Path, int]]:
        for name, label in zip(self._names, self.labels.tolist()):
            yield self._dirs[label] / name, label

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return f"SampleList({len(self)} samples of {len(self._dirs)} classes)"


@register_dataset("imagefolder")
def imagefolder(spec: DatasetSpec, seed: int) -> RealData:
    if not spec.root:
        raise DataError("dataset 'imagefolder' needs a root folder with train/ and val/; pass --data-dir")
    if _URL.match(spec.root):
        raise DataError(
            f"dataset root {spec.root} is a URL, but an imagefolder dataset is read from a folder: put train/ and val/ "
            "on a shared volume mounted at the same path on every node (a PVC or an NFS export, under the service's "
            "SCDD_DATA_ROOTS) and pass that path as --data-dir / dataset.root"
        )
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
    index = load_index(root, train_classes)

    def samples(split: str, limit: int | None) -> SampleList:
        class_dirs, names, counts = [], [], []
        for source_index in chosen:
            class_dir = root / split / train_classes[source_index]
            files = index[split][train_classes[source_index]]
            if not files:
                raise _no_images(class_dir)
            class_dirs.append(class_dir)
            names += files
            counts.append(len(files))
        labels = torch.repeat_interleave(torch.arange(len(chosen)), torch.tensor(counts))
        if limit is not None:  # limit None keeps every sample (limit_per_class would return them all)
            keep = limit_per_class(labels, limit, seed)
            names, labels = [names[i] for i in keep.tolist()], labels[keep]
        return SampleList(class_dirs, names, labels)

    train_samples = samples("train", spec.train_limit)
    val_samples = samples("val", spec.test_limit)

    size = spec.image_size or min(load_rgb(train_samples[0][0]).size)
    folders = class_folders(train_classes)  # the output's class folders: a name the service cannot carry is encoded
    info = DatasetInfo(
        name="imagefolder",
        class_names=tuple(train_classes[i] for i in chosen),
        class_dirs=tuple(folders[i] for i in chosen),
        source_indices=tuple(chosen),
        channels=3,
        image_size=size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    return RealData(
        info=info,
        train=ImageFileDataset(train_samples, size, IMAGENET_MEAN, IMAGENET_STD),
        test=ImageFileDataset(val_samples, size, IMAGENET_MEAN, IMAGENET_STD,
                              round(size * float(getattr(spec, "test_resize_ratio", 1.0)))),
    )
