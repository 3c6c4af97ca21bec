import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from api_schema import DatasetSpec
from scdd.data import iterate_batches, load_dataset
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
