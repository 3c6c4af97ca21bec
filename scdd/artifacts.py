"""What a run writes: PNG (or JPEG: output.image_format) images in an ImageFolder layout, the manifest and the
preview grid; and how they are read back (by file extension)."""

from __future__ import annotations

import hashlib
import io
import platform
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from scdd.data.base import DatasetInfo, PixelSet
from scdd.layout import IMAGES_DIR
from scdd.shard import Shard
from scdd.store import ArtifactStore


@dataclass(frozen=True)
class ImageEntry:
    path: str  # relative to the store root
    class_name: str
    class_dir: str
    class_index: int  # index of the class in the source dataset
    label: int  # position among the distilled classes (the teacher's output index)
    round: int  # ipc index
    sha256: str
    bytes: int
    worker: int = 0  # rank of the recover worker that synthesised it
    origin: Optional[dict] = None  # real-pixel inits: the training image (and crop) it started from

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ImageFormat:
    """How the distilled images are written (output.image_format, output.jpeg_quality)."""

    format: str = "png"  # png | jpeg
    quality: int = 75  # jpeg only

    def __post_init__(self) -> None:
        if self.format not in ("png", "jpeg"):
            raise ValueError(f"image format must be 'png' or 'jpeg', not {self.format!r}")

    @property
    def extension(self) -> str:
        return ".png" if self.format == "png" else ".jpg"

    def encode(self, pixels: torch.Tensor) -> bytes:
        """(C, H, W) pixels in [0, 1] -> the file's bytes."""
        return encode_png(pixels) if self.format == "png" else encode_jpeg(pixels, self.quality)

    @staticmethod
    def of(spec: dict | None) -> "ImageFormat":
        """The format of a job spec's dict (`JobSpec.to_dict()`, as state/spec.json records it): png when absent."""
        output = (spec or {}).get("output") or {}
        return ImageFormat(output.get("image_format", "png"), int(output.get("jpeg_quality", 75)))


PNG = ImageFormat()


def image_path(info: DatasetInfo, label: int, round_index: int, extension: str = ".png") -> str:
    return f"{IMAGES_DIR}/{info.class_dirs[label]}/{info.source_indices[label]}_{round_index:04d}{extension}"


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W) or (H, W, C) uint8."""
    array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return array[:, :, 0] if array.shape[2] == 1 else array


def encode_png(pixels: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_jpeg(pixels: torch.Tensor, quality: int = 75) -> bytes:
    """(C, H, W) in [0, 1] -> JPEG bytes at `quality` (PIL's encoder, its default chroma subsampling: what the
    reference scripts' `Image.save(... .jpg)` writes); one channel: a greyscale JPEG."""
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(pixels)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


_FORMATS_BY_EXTENSION = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def decode_image(data: bytes, channels: int, path: str | None = None) -> torch.Tensor:
    """Image bytes -> (C, H, W) uint8. `path`: the file's name; its extension (.png, .jpg, .jpeg) names the format
    the bytes must be in (None or another extension: whatever PIL recognises)."""
    known = _FORMATS_BY_EXTENSION.get(posixpath.splitext(path)[1].lower()) if path is not None else None
    with Image.open(io.BytesIO(data), formats=[known] if known else None) as image:
        array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    tensor = torch.from_numpy(array.copy())
    return tensor[None] if channels == 1 else tensor.permute(2, 0, 1).contiguous()


def decode_png(data: bytes, channels: int) -> torch.Tensor:
    """PNG bytes -> (C, H, W) uint8."""
    return decode_image(data, channels, "image.png")


READ_THREADS = 8  # store reads and image decodes in flight per process (I/O bound on object stores)


def read_distilled(store: ArtifactStore, entries: list[dict], info: DatasetInfo, shard: Shard | None = None,
                   threads: int = READ_THREADS) -> PixelSet:
    """The written images of `entries` (manifest order) read back from the store, what a user gets: all of them,
    or `shard`'s part (every world_size-th from its rank), as uint8, decoded by extension (PNG or JPEG: students
    train on the decoded JPEGs). Nothing else is read."""
    mine = entries if shard is None else entries[shard.rank::shard.world_size]
    pixels = torch.empty(len(mine), info.channels, info.image_size, info.image_size, dtype=torch.uint8)

    def read(i: int) -> None:  # each image decoded straight into its row: no second copy of the shard
        pixels[i] = decode_image(store.read_bytes(mine[i]["path"]), info.channels, mine[i]["path"])

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(read, range(len(mine))))
    return PixelSet(pixels, torch.tensor([e["label"] for e in mine], dtype=torch.long), info.mean, info.std,
                    None if shard is None else len(entries))


def entry_for(info: DatasetInfo, label: int, round_index: int, data: bytes, worker: int = 0,
              origin: Optional[dict] = None, image_format: ImageFormat = PNG) -> ImageEntry:
    return ImageEntry(
        path=image_path(info, label, round_index, image_format.extension),
        class_name=info.class_names[label],
        class_dir=info.class_dirs[label],
        class_index=info.source_indices[label],
        label=label,
        round=round_index,
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
        worker=worker,
        origin=origin,
    )


def library_versions() -> dict[str, str]:
    import pydantic
    import torchvision

    import scdd

    return {
        "scdd": scdd.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pydantic": pydantic.__version__,
        "python": platform.python_version(),
    }


GRID_MAX_ROWS = 100  # grid.png shows at most this many classes, evenly spaced over the set


def grid_classes(num_classes: int, max_rows: int = GRID_MAX_ROWS) -> list[int]:
    """The class positions grid.png shows: all up to `max_rows`, else `max_rows` evenly spaced (first and last)."""
    if num_classes <= max_rows:
        return list(range(num_classes))
    return sorted({round(i * (num_classes - 1) / (max_rows - 1)) for i in range(max_rows)})


def render_grid(store: ArtifactStore, entries: list[dict], info: DatasetInfo, per_class: int) -> bytes:
    """grid.png from the written images: the first `per_class` images of each class of `grid_classes`, read back
    from the store (at most GRID_MAX_ROWS x per_class images, whatever the set's size)."""
    shown = set(grid_classes(info.num_classes))
    chosen: dict[int, list[dict]] = {}
    for entry in entries:
        row = chosen.setdefault(entry["label"], []) if entry["label"] in shown else None
        if row is not None and len(row) < per_class:
            row.append(entry)
    pixels = {label: [decode_image(store.read_bytes(e["path"]), info.channels, e["path"]).float().div(255)
                      for e in row] for label, row in chosen.items()}
    return grid_png(pixels, info, per_class)


def grid_png(images: dict[int, list[torch.Tensor]], info: DatasetInfo, per_class: int, scale: int | None = None) -> bytes:
    """A labelled grid: one row per class, up to `per_class` (C, S, S) images in [0, 1]."""
    size = info.image_size
    scale = scale or max(1, 64 // size)
    cell = size * scale
    label_width = 110
    rows = sorted(images)
    canvas = Image.new("RGB", (label_width + per_class * (cell + 2), max(1, len(rows)) * (cell + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, label in enumerate(rows):
        top = r * (cell + 2)
        draw.text((4, top + cell // 2 - 6), info.class_names[label][:16], fill="black")
        for c, pixels in enumerate(images[label][:per_class]):
            tile = Image.fromarray(to_uint8(pixels)).convert("RGB").resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (label_width + c * (cell + 2), top))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
