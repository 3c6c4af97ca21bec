"""Issue 26's recover and data options: per-batch / forward augmentation, JPEG output, measured or given
normalisation and the test split's resize ratio (tiny tensors, a 12 px teacher, 3 Fashion-MNIST classes)."""

import io
import json

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from api_schema import DatasetSpec, JobSpec, RecoverSpec
from scdd import augment
from scdd.artifacts import ImageFormat, decode_image, encode_jpeg, read_distilled, render_grid
from scdd.data import load_dataset
from scdd.data.base import DatasetInfo, measure_mean_std
from scdd.errors import SpecError
from scdd.layout import SPEC_RECORD
from scdd.progress import SilentProgress
from scdd.recover import BNStatLoss, plan_units, recover_dataset, run_share
from scdd.report import dataset_facts
from scdd.store import ArtifactStore
from tests.conftest import tiny_job, tiny_teacher


def draw(n, size=16, seed=0, **kw):
    base = dict(crop=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=True, jitter=3)
    base.update(kw)
    return augment.sample_params(n, size, generator=torch.Generator().manual_seed(seed), **base)


def fields(p):
    return torch.stack([p.x0, p.y0, p.w, p.h, p.flip.float(), p.roll_x.float(), p.roll_y.float()], dim=1)


def test_per_batch_draws_one_box_flip_and_roll_for_every_image():
    p = draw(8, per="batch")
    rows = fields(p)
    assert (rows == rows[0]).all() and len(p.x0) == 8
    x = torch.randn(1, 1, 16, 16).expand(8, 1, 16, 16).contiguous()
    out = augment.apply(x, p)
    assert all(torch.equal(out[0], out[i]) for i in range(8))
    per_image = fields(draw(8))
    assert len(torch.unique(per_image, dim=0)) == 8  # per image (the default) stays per image


def test_defaults_keep_todays_draws():
    a, b = draw(6), draw(6, per="image", jitter_direction="both")
    assert torch.equal(fields(a), fields(b))


def test_forward_rolls_lie_in_0_to_jitter_and_both_take_both_signs():
    forward = draw(500, jitter=3, jitter_direction="forward")
    rolls = torch.cat([forward.roll_x, forward.roll_y])
    assert set(rolls.tolist()) == {0, 1, 2, 3}
    both = draw(500, jitter=3)
    rolls = torch.cat([both.roll_x, both.roll_y])
    assert set(rolls.tolist()) == set(range(-3, 4))
    batch = draw(4, jitter=3, jitter_direction="forward", per="batch")
    assert 0 <= int(batch.roll_x[0]) <= 3 and (batch.roll_x == batch.roll_x[0]).all()


@pytest.mark.parametrize("per", ["image", "batch"])
def test_crop_and_flip_off_give_the_identity_box_no_flips_and_draw_nothing(per):
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    p = augment.sample_params(5, 16, crop=False, scale=(0.08, 1), ratio=(3 / 4, 4 / 3), flip=False, jitter=0,
                              generator=generator, per=per)
    assert torch.equal(generator.get_state(), state)  # nothing drawn
    assert (p.x0 == 0).all() and (p.y0 == 0).all() and (p.w == 16).all() and (p.h == 16).all()
    assert not p.flip.any() and not p.roll_x.any() and not p.roll_y.any()
    rolled = draw(5, crop=False, flip=False, jitter=2, per=per)
    assert (rolled.w == 16).all() and not rolled.flip.any()


def test_per_batch_shares_of_a_distributed_unit_see_the_same_draw(cpu, monkeypatch):
    """Two workers' shares of one unit (each its own generator for the noise) draw the same crop, flip and roll."""
    seen = []
    original = augment.sample_params

    def recording(*args, **kwargs):
        params = original(*args, **kwargs)
        seen.append(fields(params))
        return params

    monkeypatch.setattr(augment, "sample_params", recording)
    info = DatasetInfo("t", ("a", "b", "c", "d"), ("a", "b", "c", "d"), (0, 1, 2, 3), 1, 12, (0.5,), (0.5,))
    unit = plan_units(4, 1, 2, workers=2)[0]  # shares (0, 1) and (2, 3)
    spec = RecoverSpec(init="noise", iterations=2, augment={"per": "batch", "jitter_direction": "forward"})
    teacher = tiny_teacher(classes=4)
    for rank in (0, 1):
        with BNStatLoss(teacher, 10.0) as bn:
            run_share(unit, rank, teacher, info, spec, cpu, 5, bn, SilentProgress(), store=None)
    assert len(seen) == 4 and torch.equal(seen[0], seen[2]) and torch.equal(seen[1], seen[3])
    assert not torch.equal(seen[0], seen[1])  # a fresh draw every step


INFO = DatasetInfo("t", ("a", "b", "c"), ("0-a", "1-b", "2-c"), (0, 1, 2), 1, 12, (0.5,), (0.5,))


def recover_into(tmp_path, name, cpu, image_format=None, info=INFO):
    store = ArtifactStore(str(tmp_path / name))
    teacher = tiny_teacher(channels=info.channels)
    result = recover_dataset(teacher, info, RecoverSpec(init="noise", ipc=1, iterations=2, batch_size=3), cpu, store,
                             seed=1, image_format=image_format)
    return store, [e.to_dict() for e in result.entries]


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_output_writes_jpgs_the_students_read_as_their_decoded_pixels(tmp_path, cpu, channels):
    info = INFO if channels == 1 else DatasetInfo("t", ("a", "b", "c"), ("0-a", "1-b", "2-c"), (0, 1, 2), 3, 12,
                                                  (0.5,) * 3, (0.5,) * 3)
    png_store, png_entries = recover_into(tmp_path, "png", cpu, info=info)
    jpg_store, jpg_entries = recover_into(tmp_path, "jpg", cpu, ImageFormat("jpeg", 90), info=info)
    assert [e["path"] for e in png_entries] == [f"images/{d}/{i}_0000.png" for i, d in enumerate(info.class_dirs)]
    assert [e["path"] for e in jpg_entries] == [e["path"][:-4] + ".jpg" for e in png_entries]
    for entry in jpg_entries:
        data = jpg_store.read_bytes(entry["path"])
        assert data[:3] == b"\xff\xd8\xff" and len(data) == entry["bytes"]
        with Image.open(io.BytesIO(data)) as image:
            assert image.mode == ("L" if channels == 1 else "RGB")
    exact = read_distilled(png_store, png_entries, info).pixels  # the same images (same seed), lossless
    round_trip = torch.stack([decode_image(encode_jpeg(p.float() / 255, 90), channels, "x.jpg") for p in exact])
    read = read_distilled(jpg_store, jpg_entries, info)
    assert read.pixels.dtype == torch.uint8 and torch.equal(read.pixels, round_trip)
    assert not torch.equal(read.pixels, exact)  # lossy
    assert render_grid(jpg_store, jpg_entries, info, 1)[:4] == b"\x89PNG"


def test_the_format_comes_from_the_spec_the_output_records(tmp_path, cpu):
    store = ArtifactStore(str(tmp_path / "out"))
    store.write_json(SPEC_RECORD, {"recover_digest": "x", "spec": {"output": {"image_format": "jpeg",
                                                                               "jpeg_quality": 50}}})
    _, entries = recover_into(tmp_path, "out", cpu)
    assert all(e["path"].endswith(".jpg") for e in entries)
    with pytest.raises(Exception):  # read by extension: a .png name does not decode JPEG bytes
        decode_image(store.read_bytes(entries[0]["path"]), 1, "a.png")


def test_a_jpeg_job_writes_jpgs_in_its_manifest_and_reports_its_normalisation(tmp_path, fmnist_root,
                                                                             fmnist_teacher_ckpt):
    from scdd.pipeline import run_distillation

    out = tmp_path / "run"
    spec = tiny_job(fmnist_root, out, fmnist_teacher_ckpt, recover={"ipc": 1, "iterations": 2},
                    dataset={"normalization": "measured"}, output={"image_format": "jpeg", "jpeg_quality": 80})
    report = run_distillation(JobSpec.model_validate(spec))
    manifest = json.loads((out / "manifest.json").read_text())
    paths = [e["path"] for e in manifest["images"]]
    assert len(paths) == 3 and all(p.endswith(".jpg") and (out / p).read_bytes()[:2] == b"\xff\xd8" for p in paths)
    assert not list((out / "images").rglob("*.png")) and (out / "grid.png").exists()
    assert report.dataset.normalization == "measured" and report.dataset.mean != [0.286]


def fmnist(root, **kw):
    return load_dataset(DatasetSpec(root=str(root), classes=[0, 1, 2], train_limit=50, test_limit=20, **kw), seed=3)


def test_measured_normalisation_is_the_training_pixels_mean_and_std(fmnist_root):
    data = fmnist(fmnist_root, normalization="measured")
    pixels = data.train.images.double() / 255
    assert data.info.mean == pytest.approx((float(pixels.mean()),), abs=1e-9)
    assert data.info.std == pytest.approx((float(pixels.std(unbiased=False)),), abs=1e-9)
    assert data.info.normalization == "measured"
    assert data.train.mean == data.test.mean == data.info.mean and data.test.std == data.info.std
    default = fmnist(fmnist_root)
    assert torch.equal(default.train.images, data.train.images) and default.info.mean == (0.2860,)
    facts = dataset_facts(data, 20)
    assert facts.normalization == "measured" and facts.mean == [round(data.info.mean[0], 6)]
    assert facts.test_resize_ratio is None and dataset_facts(default, 20).normalization == "default"
    # More images than the limit: a seeded pick of `limit`, and only those
    pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(4))[:20]
    mean, std = measure_mean_std(data.train, 4, limit=20)
    assert mean[0] == pytest.approx(float(pixels[pick].mean()), abs=1e-9)
    assert std[0] == pytest.approx(float(pixels[pick].std(unbiased=False)), abs=1e-9)


def test_given_normalisation_is_used_and_a_wrong_channel_count_is_refused(fmnist_root):
    data = fmnist(fmnist_root, normalization="given", mean=[0.25], std=[0.5])
    assert data.info.mean == (0.25,) and data.info.std == (0.5,) and data.info.normalization == "given"
    image, _ = data.test[0]
    assert torch.allclose(image, (data.test.images[0].float() / 255 - 0.25) / 0.5)
    with pytest.raises(SpecError, match=r"dataset.mean and dataset.std give 3 and 3 values, but fashion-mnist "
                                        r"images have 1 channel: give one value per channel"):
        fmnist(fmnist_root, normalization="given", mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2])


def test_test_resize_ratio_resizes_then_centre_crops_the_test_split_only(fmnist_root):
    plain, ratio = fmnist(fmnist_root), 256 / 224
    resized = fmnist(fmnist_root, test_resize_ratio=ratio)
    assert torch.equal(resized.train.images, plain.train.images)
    expected = TF.center_crop(TF.resize(plain.test.images, [32, 32], antialias=True), [28, 28])  # round(28 x 8/7)
    assert torch.equal(resized.test.images, expected) and not torch.equal(expected, plain.test.images)
    assert resized.info.test_resize_ratio == ratio and dataset_facts(resized, 20).test_resize_ratio == ratio
    one = fmnist(fmnist_root, test_resize_ratio=1.0)
    assert torch.equal(one.test.images, plain.test.images)


def test_imagefolder_test_split_is_decoded_at_the_ratio(tmp_path):
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for name in ("a", "b"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            pixels = torch.randint(0, 256, (3, 20, 24), generator=generator, dtype=torch.uint8)
            TF.to_pil_image(pixels).save(folder / "0.png")
    spec = {"name": "imagefolder", "root": str(tmp_path), "image_size": 16}
    plain = load_dataset(DatasetSpec(**spec))
    resized = load_dataset(DatasetSpec(**spec, test_resize_ratio=1.5))
    assert torch.equal(resized.train.pixel(0), plain.train.pixel(0))
    with Image.open(tmp_path / "val" / "a" / "0.png") as image:
        expected = TF.pil_to_tensor(TF.center_crop(TF.resize(image.convert("RGB"), 24, antialias=True), [16, 16]))
    assert torch.equal(resized.test.pixel(0), expected) and not torch.equal(expected, plain.test.pixel(0))
    measured = load_dataset(DatasetSpec(**spec, normalization="measured"), seed=0)
    train = torch.stack([plain.train.pixel(i) for i in range(2)]).double() / 255
    assert measured.info.mean == pytest.approx(tuple(train.mean(dim=(0, 2, 3)).tolist()), abs=1e-9)
    assert measured.test.mean == measured.info.mean
