"""Soft labels a user can keep: the relabel teacher's logits of the student's augmented batches, FKD style
(the SRe2L reference's relabel/generate_soft_label.py stores, per batch, the crop coordinates, flips, mix
parameters and fp16 logits), so a student trains from them later without the teacher.

Format version 1, under `soft_labels/` of a job's output (docs/output-and-s3.md, "Soft labels"):

soft_labels/index.json                  format_version, epochs, batches, images, topk, bytes, protocol, files, ...
soft_labels/epoch-00000.pt              one process: every batch of stored epoch 0, in training order
soft_labels/epoch-00000-rank-001.pt     data-parallel: rank 1's batches of epoch 0 (each rank writes its own)

An epoch file is a dict readable with `torch.load(..., weights_only=True)`:
  format_version 1, epoch, rank, world_size, num_classes, image_size, crop ("resized"|"padded"), topk (int|None),
  batches: a list, per batch a dict
    index   int64 (B,)      the images, indices into the distilled set in manifest order
    crop    float32 (B, 4)  x0, y0, w, h in pixels of the image (scdd/validate/crops.py)
    flip    bool (B,)       flipped after the crop
    mix     str             none, cutmix or mixup
    lam     float           each image's own share (the Beta draw; cutmix: the kept area fraction)
    perm    int64 (B,)      image i is mixed with image perm[i]
    box     int64 (4,)      cutmix: y0, y1, x0, x1 of the pasted box; zeros otherwise
    logits  float16 (B, K)  the teacher's logits of the mixed batch (topk None), or
    topk_values float16 (B, k) and topk_indices int16 (K <= 32767) / int32 (B, k): the k largest logits.
A student trained from them (`train_student(..., soft_label_source=SoftLabelReader(...))`) replays epoch
e mod N of the N stored, batch by batch: images `index`, crop, flip, mix, and the stored logits as the target.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch

from scdd.store import ArtifactStore
from scdd.validate.crops import CropDraw
from scdd.validate.mix import MixDraw

FORMAT_VERSION = 1
SOFT_LABELS_DIR = "soft_labels"
INDEX = f"{SOFT_LABELS_DIR}/index.json"
MISSING_LOGIT = -1.0e4  # top-k: the classes not kept (probability 0 at any temperature the KD loss uses)


def epoch_path(epoch: int, rank: int | None = None) -> str:
    """One file per stored epoch (and per rank when data-parallel)."""
    if rank is None:
        return f"{SOFT_LABELS_DIR}/epoch-{epoch:05d}.pt"
    return f"{SOFT_LABELS_DIR}/epoch-{epoch:05d}-rank-{rank:03d}.pt"


def part_path(rank: int | None) -> str:
    """A writer's record of the files it wrote (merged into index.json by `write_index`)."""
    return f"{SOFT_LABELS_DIR}/parts/rank-{rank or 0:03d}.json"


@dataclass
class SoftLabelRequest:
    """A student run that stores its soft labels (validate.store_soft_labels, validate.soft_label_topk); the
    backend sets `facts` (the report's SoftLabelFacts as a dict) when they are written."""

    epochs: int
    topk: int | None = None
    facts: dict | None = None


def request_for(vspec: Any, protocol: Any) -> SoftLabelRequest | None:
    """The request of the validate stage's student, None when the spec stores no soft labels (or not kd)."""
    if not vspec.store_soft_labels or protocol.mode != "kd":
        return None
    return SoftLabelRequest(vspec.store_soft_labels, vspec.soft_label_topk)


def _index_dtype(num_classes: int) -> torch.dtype:
    return torch.int16 if num_classes <= 32767 else torch.int32


class SoftLabelWriter:
    """Collects the batches of the first `epochs` epochs of a student loop and writes one file per epoch
    (`end_epoch`); `rank`/`world_size` when data-parallel."""

    def __init__(self, store: ArtifactStore, epochs: int, topk: int | None = None, rank: int | None = None,
                 world_size: int = 1):
        self.store, self.epochs, self.topk = store, epochs, topk
        self.rank, self.world_size = rank, world_size
        self.files: list[dict] = []
        self.batches: list[dict] = []
        self.header: dict = {}

    def begin(self, first_epoch: int, image_size: int, crop: str) -> None:
        """Start (or resume at `first_epoch`: the files of earlier epochs, recorded in this rank's part, stay)."""
        self.header = {"num_classes": None, "image_size": image_size, "crop": crop}
        path = part_path(self.rank)
        recorded = self.store.read_json(path)["files"] if first_epoch and self.store.exists(path) else []
        self.files = [f for f in recorded if f["epoch"] < first_epoch]
        self.batches = []

    def wants(self, epoch: int) -> bool:
        return epoch < self.epochs

    def add(self, index: torch.Tensor, crops: CropDraw, mix: MixDraw, logits: torch.Tensor) -> None:
        """One batch: `index` (B,) into the set in manifest order, its draws and the teacher's logits (B, K)."""
        record = {"index": index.detach().to("cpu", torch.int64), "crop": crops.boxes.detach().to("cpu", torch.float32),
                  "flip": crops.flip.detach().to("cpu", torch.bool), "mix": mix.kind, "lam": float(mix.lam),
                  "perm": mix.perm.detach().to("cpu", torch.int64), "box": torch.tensor(mix.box, dtype=torch.int64)}
        logits = logits.detach().float()
        self.header["num_classes"] = logits.shape[1]
        if self.topk is not None and self.topk < logits.shape[1]:
            values, indices = logits.topk(self.topk, dim=1)
            record["topk_values"] = values.to("cpu", torch.float16)
            record["topk_indices"] = indices.to("cpu", _index_dtype(logits.shape[1]))
        else:
            record["logits"] = logits.to("cpu", torch.float16)
        self.batches.append(record)

    def end_epoch(self, epoch: int) -> None:
        if not self.wants(epoch):
            return
        blob = {"format_version": FORMAT_VERSION, "epoch": epoch, "rank": self.rank or 0,
                "world_size": self.world_size, **self.header, "topk": self.topk, "batches": self.batches}
        buffer = io.BytesIO()
        torch.save(blob, buffer)
        path = epoch_path(epoch, self.rank)
        self.store.write_bytes(path, buffer.getvalue())
        self.files = [f for f in self.files if f["epoch"] != epoch] + [{
            "epoch": epoch, "rank": self.rank or 0, "path": path, "batches": len(self.batches),
            "images": sum(len(b["index"]) for b in self.batches), "bytes": len(buffer.getvalue())}]
        self.batches = []
        self.store.write_json(part_path(self.rank), {"files": self.files})


def write_index(store: ArtifactStore, topk: int | None, world_size: int, protocol: dict,
                extra: dict | None = None) -> dict:
    """Merge the `world_size` writers' parts into soft_labels/index.json (`protocol`: the student protocol's dict
    the batches were drawn under, `extra`: more keys); the report's SoftLabelFacts as a dict."""
    files: list[dict] = []
    for rank in range(world_size):
        files += store.read_json(part_path(rank if world_size > 1 else None))["files"]
    files.sort(key=lambda f: (f["epoch"], f["rank"]))
    epochs = len({f["epoch"] for f in files})
    totals = {key: sum(f[key] for f in files) for key in ("batches", "images", "bytes")}
    index = {"format_version": FORMAT_VERSION, "epochs": epochs, "world_size": world_size, "topk": topk,
             **totals, "protocol": protocol, **(extra or {}), "files": files}
    store.write_json(INDEX, index)
    return {"path": SOFT_LABELS_DIR, "epochs": epochs, **totals, "topk": topk, "format_version": FORMAT_VERSION}


class SoftLabelReader:
    """Stored soft labels (format version 1) to train a student from, without the teacher."""

    def __init__(self, store: ArtifactStore):
        self.store = store
        self.index = store.read_json(INDEX)
        if self.index["format_version"] != FORMAT_VERSION:
            raise ValueError(f"soft labels at {store.url_of(INDEX)} are format version {self.index['format_version']}; "
                             f"this scdd reads version {FORMAT_VERSION}")
        self.epochs = int(self.index["epochs"])
        self.world_size = int(self.index.get("world_size", 1))

    def epoch(self, epoch: int, rank: int | None = None) -> dict:
        """The file of stored epoch `epoch` (of `rank` when the labels were written data-parallel)."""
        path = epoch_path(epoch, rank if self.world_size > 1 else None)
        return torch.load(io.BytesIO(self.store.read_bytes(path)), weights_only=True)

    def for_training(self, epoch: int, rank: int | None = None) -> dict:
        """The stored epoch a student's epoch `epoch` replays: epoch mod N (as FKD)."""
        return self.epoch(epoch % self.epochs, rank)


def batch_logits(batch: dict, num_classes: int) -> torch.Tensor:
    """A stored batch's target logits as float32 (B, K): the stored ones, or the top-k with every other class at
    MISSING_LOGIT (probability 0)."""
    if "logits" in batch:
        return batch["logits"].float()
    values, indices = batch["topk_values"].float(), batch["topk_indices"].long()
    full = torch.full((len(values), num_classes), MISSING_LOGIT)
    return full.scatter_(1, indices, values)


def batch_draws(batch: dict) -> tuple[CropDraw, MixDraw]:
    """A stored batch's crop and mix draws."""
    box = tuple(int(v) for v in batch["box"])
    return CropDraw(batch["crop"], batch["flip"]), MixDraw(batch["mix"], float(batch["lam"]), batch["perm"], box)


def read_facts(store: ArtifactStore) -> dict:
    """SoftLabelFacts of the soft labels in `store` (from their index)."""
    index = store.read_json(INDEX)
    return {"path": SOFT_LABELS_DIR, "epochs": index["epochs"], "batches": index["batches"],
            "images": index["images"], "topk": index["topk"], "bytes": index["bytes"],
            "format_version": index["format_version"]}
