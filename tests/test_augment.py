import torch

from scdd import augment


def params(n, size, **kw):
    base = dict(crop=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=True, jitter=2)
    base.update(kw)
    return augment.sample_params(n, size, generator=torch.Generator().manual_seed(0), **base)


def test_disabled_augmentation_is_identity():
    # Exact up to float rounding of the sampling grid (pixel centres land within ~1e-7 px).
    x = torch.randn(3, 2, 9, 9, generator=torch.Generator().manual_seed(0))
    p = params(3, 9, crop=False, flip=False, jitter=0)
    torch.testing.assert_close(augment.apply(x, p), x, rtol=0, atol=1e-5)


def test_flip_and_roll_match_torch_reference_per_image():
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    p = augment.AugmentParams(
        x0=torch.zeros(4), y0=torch.zeros(4), w=torch.full((4,), 8.0), h=torch.full((4,), 8.0),
        flip=torch.tensor([True, False, True, False]), roll_x=torch.tensor([1, 2, 0, -3]), roll_y=torch.tensor([0, 1, 2, 3]),
    )
    expected = torch.stack([
        torch.roll(torch.flip(x[i], [-1]) if p.flip[i] else x[i], (int(p.roll_y[i]), int(p.roll_x[i])), (1, 2))
        for i in range(4)
    ])
    torch.testing.assert_close(augment.apply(x, p), expected, rtol=0, atol=1e-6)


def test_crop_of_left_half_matches_bilinear_resize_of_that_half():
    # Inside the crop the result equals resizing the cut-out half. At the crop's inner edge the
    # sampler reads the real neighbouring pixel, where resizing a cut-out replicates the edge,
    # so the last column is left out of the comparison.
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    p = augment.AugmentParams(
        x0=torch.zeros(1), y0=torch.zeros(1), w=torch.full((1,), 4.0), h=torch.full((1,), 8.0),
        flip=torch.tensor([False]), roll_x=torch.zeros(1, dtype=torch.long), roll_y=torch.zeros(1, dtype=torch.long),
    )
    expected = torch.nn.functional.interpolate(x[..., :4], size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(augment.apply(x, p)[..., :7], expected[..., :7], rtol=0, atol=1e-5)


def test_crops_differ_within_a_batch():
    p = params(16, 28)
    boxes = torch.stack([p.x0, p.y0, p.w, p.h], dim=1)
    assert len(torch.unique(boxes, dim=0)) == 16
    same = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0)).expand(16, 1, 28, 28).contiguous()
    out = augment.apply(same, p)
    assert all(not torch.allclose(out[0], out[i]) for i in range(1, 16))


def test_crop_boxes_stay_inside_and_respect_scale():
    p = params(2000, 32, scale=(0.25, 0.5))
    assert (p.x0 >= 0).all() and (p.y0 >= 0).all()
    assert (p.x0 + p.w <= 32 + 1e-4).all() and (p.y0 + p.h <= 32 + 1e-4).all()
    area = p.w * p.h / (32 * 32)
    assert ((area >= 0.25 - 1e-4) & (area <= 0.5 + 1e-4)).all()
    assert p.flip.float().mean().item() == __import__("pytest").approx(0.5, abs=0.05)
    assert set(p.roll_x.unique().tolist()) <= {-2, -1, 0, 1, 2}


def test_augment_is_differentiable():
    x = torch.randn(2, 1, 10, 10, requires_grad=True)
    augment.apply(x, params(2, 10)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
