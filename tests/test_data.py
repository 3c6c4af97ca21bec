import gzip
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from api_schema import DatasetSpec
from scdd.data import imagefolder as imagefolder_module
from scdd.data import iterate_batches, load_dataset
from scdd.data.base import limit_per_class
from scdd.data.imagefolder import IMAGE_EXTENSIONS, index_cache_dir
from scdd.data.loader import decode_workers, load_pixels
from scdd.errors import CorruptImageError, DataError


def test_fashion_mnist_reads_real_idx_files(fmnist_root):
    data = load_dataset(DatasetSpec(root=str(fmnist_root), train_limit=None))
    assert (len(data.train), len(data.test)) == (60000, 10000)
    info = data.info
    assert (info.channels, info.image_size, info.num_classes) == (1, 28, 10)
    assert info.class_names[0] == "T-shirt/top" and info.class_names[9] == "Ankle boot"
    assert list(info.class_dirs) == sorted(info.class_dirs)  # ImageFolder order == class order
    image, label = data.test[0]
    assert image.shape == (1, 28, 28) and label == 9  # the first test image is an ankle boot
    pixels = data.train.images.float() / 255
    assert pixels.mean().item() == pytest.approx(info.mean[0], abs=1e-3)
    assert pixels.std().item() == pytest.approx(info.std[0], abs=1e-3)


def test_class_subset_and_train_limit(fmnist_root):
    data = load_dataset(DatasetSpec(root=str(fmnist_root), classes=["Bag", 3], train_limit=7), seed=1)
    assert data.info.class_names == ("Dress", "Bag") and data.info.source_indices == (3, 8)
    assert data.info.class_dirs == ("3-Dress", "8-Bag")
    assert len(data.train) == 14 and sorted(data.train.labels.tolist()) == [0] * 7 + [1] * 7
    assert len(data.test) == 2000
    again = load_dataset(DatasetSpec(root=str(fmnist_root), classes=[3, 8], train_limit=7), seed=1)
    assert torch.equal(data.train.images, again.train.images)  # seeded pick


def test_test_limit_keeps_a_seeded_pick_per_class_and_leaves_training_and_digests_alone(fmnist_root):
    from api_schema import JobSpec

    spec = DatasetSpec(root=str(fmnist_root), classes=[3, 8], train_limit=7, test_limit=5)
    data = load_dataset(spec, seed=1)
    assert len(data.test) == 10 and sorted(data.test.labels.tolist()) == [0] * 5 + [1] * 5
    whole = load_dataset(DatasetSpec(root=str(fmnist_root), classes=[3, 8], train_limit=7), seed=1)
    assert torch.equal(data.train.images, whole.train.images)  # the training pick does not depend on it
    kept = [any(torch.equal(image, other) for other in whole.test.images) for image in data.test.images]
    assert all(kept)  # the kept test images are the split's own
    assert torch.equal(load_dataset(spec, seed=1).test.images, data.test.images)  # seeded
    job = {"dataset": {"root": str(fmnist_root), "classes": [3, 8], "train_limit": 7}}
    cut = JobSpec.model_validate({**job, "dataset": {**job["dataset"], "test_limit": 5}})
    full = JobSpec.model_validate(job)
    assert cut.teacher_digest() == full.teacher_digest() and cut.recover_digest() == full.recover_digest()
    assert cut.supervised_teacher_digest() == full.supervised_teacher_digest() and cut.job_id() == full.job_id()


def test_batches_cover_the_split_once(fmnist_root):
    data = load_dataset(DatasetSpec(root=str(fmnist_root), classes=[0]))
    seen = sum(len(labels) for _, labels in iterate_batches(data.test, 300))
    assert seen == 1000


@pytest.mark.parametrize(
    "classes, message",
    [([10], "out of range"), (["Socks"], "unknown class 'Socks'")],
)
def test_bad_class_subset_names_the_class(fmnist_root, classes, message):
    with pytest.raises(DataError, match=message):
        load_dataset(DatasetSpec(root=str(fmnist_root), classes=classes))


def test_missing_data_path_is_named(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}/nope does not exist"):
        load_dataset(DatasetSpec(root=str(tmp_path / "nope")))


def test_missing_idx_file_is_named(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_dataset(DatasetSpec(root=str(tmp_path)))


def test_corrupt_idx_file_is_named(tmp_path, fmnist_root):
    for name in ("train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(fmnist_root / name, tmp_path / name)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") * 3 + b"short")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz holds 5 bytes"):
        load_dataset(DatasetSpec(root=str(tmp_path)))


def make_imagefolder(root: Path, classes=("cat", "dog"), per_class=3, size=(20, 16)) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(array).save(folder / f"{i}.png")
    return root


def test_imagefolder_loads_classes_and_sizes(tmp_path):
    root = make_imagefolder(tmp_path)
    data = load_dataset(DatasetSpec(name="imagefolder", root=str(root)))
    assert data.info.class_names == ("cat", "dog") and data.info.channels == 3
    assert data.info.image_size == 16  # shorter side of the first image
    image, label = data.train[4]
    assert image.shape == (3, 16, 16) and label == 1
    assert len(data.test) == 6
    cut = load_dataset(DatasetSpec(name="imagefolder", root=str(root), test_limit=2))
    assert sorted(label for _, label in cut.test.samples) == [0, 0, 1, 1]


def test_corrupt_image_error_names_the_file(tmp_path):
    root = make_imagefolder(tmp_path)
    bad = root / "train" / "dog" / "1.png"
    bad.write_bytes(b"not a png")
    data = load_dataset(DatasetSpec(name="imagefolder", root=str(root)))
    with pytest.raises(CorruptImageError, match=str(bad)):
        list(iterate_batches(data.train, 4))


def test_empty_class_folder_is_named(tmp_path):
    root = make_imagefolder(tmp_path)
    for f in (root / "val" / "cat").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=f"class folder {root / 'val' / 'cat'} holds no images"):
        load_dataset(DatasetSpec(name="imagefolder", root=str(root)))


def test_train_val_class_mismatch_names_the_classes(tmp_path):
    root = make_imagefolder(tmp_path)
    (root / "val" / "dog").rename(root / "val" / "wolf")
    with pytest.raises(DataError, match=r"only in train: \['dog'\]; only in val: \['wolf'\]"):
        load_dataset(DatasetSpec(name="imagefolder", root=str(root)))


def test_missing_val_folder_is_named(tmp_path):
    root = make_imagefolder(tmp_path)
    shutil.rmtree(root / "val")
    with pytest.raises(DataError, match=f"folder {root / 'val'} does not exist"):
        load_dataset(DatasetSpec(name="imagefolder", root=str(root)))


def age_folders(root: Path, seconds: float = 60) -> None:
    """Date every folder under `root` `seconds` back: a folder changed within the last 2 s is indexed but not
    cached (its mtime may still move within the same tick), and a test writes its folders just before loading."""
    stamp = time.time() - seconds
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        os.utime(folder, (stamp, stamp))


def listed_by_rglob(root: Path, split: str, classes: list[str]) -> list[tuple[Path, int]]:
    """The samples as the index listed them before it was cached: rglob + is_file over every file."""
    return [(path, label) for label, name in enumerate(classes)
            for path in sorted(p for p in (root / split / name).rglob("*")
                               if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)]


def index_files() -> list[Path]:
    return sorted(index_cache_dir().glob("*.json"))


def test_imagefolder_index_is_built_once_then_read_from_the_cache_without_listing_files(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path / "data", classes=("cat", "dog", "emu"), per_class=4)
    nested = root / "train" / "dog" / "more"
    nested.mkdir()
    shutil.copy(root / "train" / "dog" / "0.png", nested / "0.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    age_folders(root)
    spec = DatasetSpec(name="imagefolder", root=str(root), train_limit=3, test_limit=2)
    first = load_dataset(spec, seed=5)
    assert [path.parent for path in index_files()] == [Path(os.environ["SCDD_CACHE_DIR"]) / "imagefolder-index"]

    def no_listing(*args, **kwargs):
        raise AssertionError("the cached index was listed again")

    monkeypatch.setattr(imagefolder_module, "_list_images", no_listing)
    monkeypatch.setattr(Path, "rglob", no_listing)
    again = load_dataset(spec, seed=5)
    assert list(again.train.samples) == list(first.train.samples)
    assert list(again.test.samples) == list(first.test.samples)
    monkeypatch.undo()
    # the same samples as listing every file: the same seeded pick of the same files in the same order
    for split, limit, data in (("train", 3, first.train), ("val", 2, first.test)):
        listed = listed_by_rglob(root, split, ["cat", "dog", "emu"])
        keep = limit_per_class(torch.tensor([label for _, label in listed]), limit, 5).tolist()
        assert list(data.samples) == [listed[i] for i in keep]
    whole = load_dataset(DatasetSpec(name="imagefolder", root=str(root), train_limit=None), seed=5)
    assert list(whole.train.samples) == listed_by_rglob(root, "train", ["cat", "dog", "emu"])
    assert root / "train" / "dog" / "more" / "0.png" in [path for path, _ in whole.train.samples]
    assert whole.train.labels.tolist() == [label for _, label in whole.train.samples] == [0] * 4 + [1] * 5 + [2] * 4


def test_imagefolder_index_is_rebuilt_when_a_class_folder_gains_or_loses_a_file(tmp_path):
    root = make_imagefolder(tmp_path / "data")
    age_folders(root)
    spec = DatasetSpec(name="imagefolder", root=str(root), train_limit=None)
    assert len(load_dataset(spec).train) == 6
    shutil.copy(root / "train" / "cat" / "0.png", root / "train" / "cat" / "00.png")
    added = load_dataset(spec)
    assert list(added.train.samples) == listed_by_rglob(root, "train", ["cat", "dog"])
    assert [path.name for path, _ in added.train.samples][:4] == ["0.png", "00.png", "1.png", "2.png"]
    (root / "train" / "dog" / "1.png").unlink()
    age_folders(root)
    removed = load_dataset(spec)
    assert [path.name for path, label in removed.train.samples if label == 1] == ["0.png", "2.png"]
    cached = json.loads(index_files()[0].read_text())
    assert cached["splits"]["train"] == {"cat": ["0.png", "00.png", "1.png", "2.png"], "dog": ["0.png", "2.png"]}


def test_a_folder_changed_within_the_last_seconds_is_indexed_but_not_cached(tmp_path):
    root = make_imagefolder(tmp_path / "data")  # just written: its mtime could still move within the same tick
    assert len(load_dataset(DatasetSpec(name="imagefolder", root=str(root))).train) == 6
    assert index_files() == []


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe\x00", b'{"format": "scdd-imagefolder-index/1"}',
                                     b"[1, 2]", b"null"])
def test_a_corrupt_index_cache_file_is_rebuilt_not_an_error(tmp_path, content):
    root = make_imagefolder(tmp_path / "data")
    age_folders(root)
    spec = DatasetSpec(name="imagefolder", root=str(root), train_limit=2)
    first = load_dataset(spec, seed=1)
    index_files()[0].write_bytes(content)
    again = load_dataset(spec, seed=1)
    assert list(again.train.samples) == list(first.train.samples)
    assert json.loads(index_files()[0].read_text())["splits"]["val"]["dog"] == ["0.png", "1.png", "2.png"]


def test_a_cache_folder_that_cannot_be_written_only_costs_the_cache(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path / "data")
    age_folders(root)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("SCDD_CACHE_DIR", str(tmp_path / "a-file"))  # mkdir under a file fails
    assert len(load_dataset(DatasetSpec(name="imagefolder", root=str(root))).train) == 6


@pytest.mark.parametrize("root", ["s3://bucket/imagenet", "gs://bucket/imagenet", "https://example.com/imagenet",
                                  "file:///data/imagenet"])
def test_an_imagefolder_url_is_refused_with_where_to_put_the_data(root):
    with pytest.raises(DataError, match=r"is a URL, .*shared volume mounted at the same path on every node") as error:
        load_dataset(DatasetSpec(name="imagefolder", root=root))
    assert root in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_load_pixels_equals_decoding_each_sample_in_the_index_order(tmp_path, workers):
    root = make_imagefolder(tmp_path / "data", classes=("cat", "dog", "emu"), per_class=4, size=(23, 17))
    data = load_dataset(DatasetSpec(name="imagefolder", root=str(root), image_size=12))
    index = [11, 0, 5, 5, 3, 8, 1]
    pixels, labels = load_pixels(data.train, index, workers=workers, batch_size=2)
    assert pixels.dtype == torch.uint8 and pixels.shape == (7, 3, 12, 12)
    assert torch.equal(pixels, torch.stack([data.train.pixel(i) for i in index]))
    assert labels.tolist() == [data.train.samples[i][1] for i in index] == [2, 0, 1, 1, 0, 2, 0]
    assert torch.equal(pixels, data.train.pixels(torch.tensor(index))[0])
    empty, no_labels = load_pixels(data.train, [], workers=workers)
    assert empty.shape == (0, 3, 12, 12) and no_labels.shape == (0,)


def test_load_pixels_indexes_an_in_memory_dataset(fmnist_root):
    data = load_dataset(DatasetSpec(root=str(fmnist_root), classes=[0, 1], train_limit=5))
    pixels, labels = load_pixels(data.train, torch.tensor([9, 2]), workers=2)
    assert torch.equal(pixels, data.train.images[[9, 2]]) and labels.tolist() == [1, 0]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_file_decoded_in_a_worker_is_named_in_one_line(tmp_path, workers):
    root = make_imagefolder(tmp_path / "data")
    bad = root / "train" / "dog" / "1.png"
    bad.write_bytes(b"not a png")
    data = load_dataset(DatasetSpec(name="imagefolder", root=str(root)))
    whole_line = f"^cannot decode image {re.escape(str(bad))}: .*remove or replace the file$"
    with pytest.raises(CorruptImageError, match=whole_line):
        load_pixels(data.train, range(6), workers=workers, batch_size=2)
    with pytest.raises(CorruptImageError, match=f"^cannot decode image {re.escape(str(bad))}: "):
        list(iterate_batches(data.train, 2, workers=workers))


def test_evaluate_with_decoding_workers_counts_the_same_as_in_process(tmp_path, cpu):
    from scdd.evaluate import evaluate

    root = make_imagefolder(tmp_path / "data", classes=("a", "b", "c"), per_class=5)
    data = load_dataset(DatasetSpec(name="imagefolder", root=str(root), image_size=8))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    alone, parallel = (evaluate(model, data.test, cpu, batch_size=4, workers=w) for w in (0, 2))
    assert parallel == alone and alone.total == 15


def test_decode_workers_keep_a_thread_for_the_process_and_never_fork_on_one(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert [decode_workers(t) for t in (None, 1, 2, 4, 8, 16, 64)] == [0, 0, 1, 3, 7, 7, 7]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert decode_workers(8) == 1
