"""A distilled set that already exists (kind evaluate): an ImageFolder, or a scdd output, in a folder or at an
fsspec URL (s3://..., through scdd.store with the spec's output.s3 settings).

- A scdd output (a `manifest.json` beside `images/`) is read through its manifest (`scdd.artifacts.read_distilled`),
  in the manifest's order; its classes are matched to the dataset's by name, else by folder.
- An ImageFolder holds one sub-folder per class (images at any depth under it). Its folders are matched to the
  dataset's classes by name, class folder or the folder a scdd run writes (case-insensitive); when no folder
  matches, in sorted order, which needs as many folders as the dataset has classes. Files are read in sorted order.

Every image is read as uint8, converted to the dataset's channels and, where its size differs, resized (shorter
side) and centre-cropped to the dataset's image size. `index_external_set` only lists (the driver's part);
`read_image_folder` reads all, or one rank's shard (every world_size-th image), as a `PixelSet`.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError

from scdd.artifacts import READ_THREADS, read_distilled
from scdd.data.base import DatasetInfo, PixelSet, slug
from scdd.data.imagefolder import IMAGE_EXTENSIONS
from scdd.errors import CorruptImageError, DataError
from scdd.layout import IMAGES_DIR, MANIFEST
from scdd.shard import Shard
from scdd.store import ArtifactStore, open_store

if TYPE_CHECKING:
    from api_schema import JobSpec


@dataclass(frozen=True)
class ExternalSet:
    """The listing of a set: `entries` ({"path": relative to `store`, "label": dataset class position}) in reading
    order, and the number of images of every dataset class (`counts`)."""

    url: str
    store: ArtifactStore
    entries: list[dict]
    counts: tuple[int, ...]
    scdd_output: bool

    def __len__(self) -> int:
        return len(self.entries)


def _keys(info: DatasetInfo, label: int) -> set[str]:
    name = info.class_names[label]
    return {name.lower(), info.class_dirs[label].lower(), slug(name).lower()}


def match_classes(folders: list[str], info: DatasetInfo, url: str) -> dict[str, int]:
    """Class folder (or a manifest's class name) -> dataset class position: by name where any matches, else in
    sorted order (the same number of classes). DataError naming the folder and the fix otherwise."""
    lookup: dict[str, int] = {}
    for label in range(info.num_classes):
        for key in _keys(info, label):
            lookup.setdefault(key, label)
    matched = {folder: lookup.get(folder.lower()) for folder in folders}
    if any(label is not None for label in matched.values()):
        unknown = [folder for folder, label in matched.items() if label is None]
        if unknown:
            raise DataError(
                f"class folder {unknown[0]!r} of {url} matches none of the dataset's classes "
                f"({', '.join(info.class_names)}); rename it to its class's name, or remove it")
        by_label: dict[int, str] = {}
        for folder, label in matched.items():
            if label in by_label:
                raise DataError(f"class folders {by_label[label]!r} and {folder!r} of {url} both name class "
                                f"{info.class_names[label]!r}; keep one folder per class")
            by_label[label] = folder
        return {folder: int(label) for folder, label in matched.items()}
    if len(folders) != info.num_classes:
        raise DataError(
            f"{url} has {len(folders)} class folders ({', '.join(folders[:5])}{', ...' if len(folders) > 5 else ''}) "
            f"and the dataset has {info.num_classes} classes ({', '.join(info.class_names[:5])}"
            f"{', ...' if info.num_classes > 5 else ''}), and no folder is named after a class; give the set one "
            f"folder per class of the dataset (named after it), or choose the classes with dataset.classes")
    return {folder: label for label, folder in enumerate(sorted(folders))}


def _counts(entries: list[dict], info: DatasetInfo, url: str) -> tuple[int, ...]:
    counts = torch.bincount(torch.tensor([e["label"] for e in entries], dtype=torch.long),
                            minlength=info.num_classes).tolist()
    empty = [info.class_names[label] for label, count in enumerate(counts) if count == 0]
    if empty:
        raise DataError(f"the set at {url} has no images of class {empty[0]!r}"
                        + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else "")
                        + "; every class of the dataset needs images (or choose the classes with dataset.classes)")
    return tuple(counts)


def _manifest_entries(store: ArtifactStore, info: DatasetInfo) -> list[dict]:
    manifest = store.read_json(MANIFEST)
    if not manifest.get("complete", True):
        raise DataError(f"the scdd output at {store.url} is partial (its run stopped before every image was made); "
                        f"resume that run first")
    names = [c["name"] for c in manifest["classes"]]
    try:
        mapping = match_classes(names, info, store.url)
    except DataError:  # the folders then, as an ImageFolder of images/ would be matched
        mapping = match_classes([c["dir"] for c in manifest["classes"]], info, store.url)
        names = [c["dir"] for c in manifest["classes"]]
    label_of = {c["label"]: mapping[name] for c, name in zip(manifest["classes"], names)}
    return [{"path": e["path"], "label": label_of[e["label"]]} for e in manifest["images"]]


def _folder_entries(store: ArtifactStore, info: DatasetInfo) -> list[dict]:
    files = [f for f in store.list() if f.lower().endswith(IMAGE_EXTENSIONS)
             and not any(part.startswith(".") for part in f.split("/"))]
    if not files:
        raise DataError(f"no images at {store.url}: evaluate.images must be a folder (or URL) holding one sub-folder "
                        f"of images per class, or a scdd output")
    loose = [f for f in files if "/" not in f]
    if loose:
        raise DataError(f"{store.url} holds images outside class folders ({loose[0]}); put each class's images in "
                        f"a sub-folder named after the class")
    by_folder: dict[str, list[str]] = {}
    for path in files:
        by_folder.setdefault(path.split("/", 1)[0], []).append(path)
    mapping = match_classes(sorted(by_folder), info, store.url)
    return [{"path": path, "label": mapping[folder]}
            for folder in sorted(by_folder, key=lambda f: (mapping[f], f))
            for path in sorted(by_folder[folder], key=lambda p: p.split("/"))]


def open_set_store(url: str, spec: JobSpec) -> ArtifactStore:
    """The store holding the set (output.s3 applies to s3:// URLs); DataError when a local folder is missing."""
    if "://" not in url and not os.path.isdir(url):
        raise DataError(f"evaluate.images {url} is not a folder; give the folder (or URL) of the distilled set")
    return open_store(spec.output, url)


def index_external_set(url: str, info: DatasetInfo, spec: JobSpec) -> ExternalSet:
    """List the set at `url` and match its classes to the dataset's (no image is read)."""
    store = open_set_store(url, spec)
    scdd_output = store.exists(MANIFEST) and bool(store.list(IMAGES_DIR))
    entries = _manifest_entries(store, info) if scdd_output else _folder_entries(store, info)
    return ExternalSet(store.url, store, entries, _counts(entries, info, store.url), scdd_output)


def decode_image(data: bytes, info: DatasetInfo, name: str) -> torch.Tensor:
    """Image bytes -> (C, S, S) uint8 in the dataset's channels and size (shorter side resized, centre crop)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("L" if info.channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise CorruptImageError(f"cannot decode image {name}: {exc}; remove or replace the file") from None
    size = info.image_size
    if image.size != (size, size):
        image = TF.center_crop(TF.resize(image, size, antialias=True), [size, size])
    array = np.asarray(image, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy())
    return tensor[None] if info.channels == 1 else tensor.permute(2, 0, 1).contiguous()


def read_external(found: ExternalSet, info: DatasetInfo, shard: Shard | None = None,
                  threads: int = READ_THREADS) -> PixelSet:
    """The images of `found` (all, or `shard`'s part) as uint8 with their labels."""
    if found.scdd_output:
        try:
            return read_distilled(found.store, found.entries, info, shard, threads)
        except RuntimeError as exc:  # an image of another size or channel count than the dataset's
            raise DataError(f"the scdd output at {found.url} was made for another image size or channel count than "
                            f"this dataset's ({info.channels} x {info.image_size} px): {str(exc)[:200]}; set "
                            f"dataset.image_size to the set's") from None
    mine = found.entries if shard is None else found.entries[shard.rank::shard.world_size]
    pixels = torch.empty(len(mine), info.channels, info.image_size, info.image_size, dtype=torch.uint8)

    def read(i: int) -> None:
        path = mine[i]["path"]
        pixels[i] = decode_image(found.store.read_bytes(path), info, found.store.url_of(path))

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(read, range(len(mine))))
    return PixelSet(pixels, torch.tensor([e["label"] for e in mine], dtype=torch.long), info.mean, info.std,
                    None if shard is None else len(found))


def read_image_folder(url: str, info: DatasetInfo, spec: JobSpec, shard: Shard | None = None) -> PixelSet:
    """The set at `url` (an ImageFolder or a scdd output), or `shard`'s part of it, as a PixelSet (uint8)."""
    return read_external(index_external_set(url, info, spec), info, shard)
