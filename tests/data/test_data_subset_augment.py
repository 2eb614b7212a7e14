"""Stratified subsets; crop/flip augmentation and normalisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradkit.data import normalize, random_crop_flip, stratified_subset
from gradkit.data._subset import class_quotas
from gradkit.errors import ConfigError

# --- stratified subsets ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 10, 95, 333, 999])
def test_balanced_classes_equal_within_one(n: int) -> None:
    y = torch.arange(1000) % 10
    idx = stratified_subset(y, n, seed=3)
    assert len(idx) == n and len(set(idx.tolist())) == n
    counts = torch.bincount(y[idx], minlength=10)
    assert int(counts.max() - counts.min()) <= 1


def test_unequal_classes_water_filling() -> None:
    sizes = [50, 30, 5, 20]
    y = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    idx = stratified_subset(y, 40, seed=0)
    counts = torch.bincount(y[idx], minlength=4).tolist()
    assert sum(counts) == 40
    assert counts[2] == 5  # the small class gives all it has
    others = [counts[c] for c in (0, 1, 3)]
    assert max(others) - min(others) <= 1  # the rest is shared equally
    assert class_quotas([50, 30, 5, 20], 40, [0, 1, 2, 3]) == [12, 12, 5, 11]


def test_deterministic_for_a_seed_and_varies_with_it() -> None:
    y = torch.arange(500) % 5
    a = stratified_subset(y, 50, seed=1)
    assert torch.equal(a, stratified_subset(y, 50, seed=1))
    assert not torch.equal(a, stratified_subset(y, 50, seed=2))
    assert torch.equal(a, torch.sort(a).values)  # original order kept


def test_limit_larger_than_split_keeps_all() -> None:
    y = torch.arange(30) % 3
    assert torch.equal(stratified_subset(y, 30, 0), torch.arange(30))
    assert torch.equal(stratified_subset(y, 10**6, 0), torch.arange(30))
    with pytest.raises(ConfigError, match="positive"):
        stratified_subset(y, 0, 0)


# --- augmentation ---------------------------------------------------------------------------------


def reference_crop_flip(
    x: torch.Tensor, dy: int, dx: int, flip: bool, padding: int
) -> torch.Tensor:
    """Crop window (dy, dx) of the zero-padded image, then an optional flip: the textbook way."""
    h, w = x.shape[-2:]
    out = F.pad(x, (padding,) * 4)[..., dy : dy + h, dx : dx + w]
    return out.flip(-1) if flip else out


def recover_params(
    img: torch.Tensor, out: torch.Tensor, padding: int
) -> list[tuple[int, int, bool]]:
    return [
        (dy, dx, flip)
        for dy in range(2 * padding + 1)
        for dx in range(2 * padding + 1)
        for flip in (False, True)
        if torch.equal(reference_crop_flip(img, dy, dx, flip, padding), out)
    ]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_each_output_is_a_padded_crop_maybe_flipped(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 12, 10), generator=g).to(dtype)
    out = random_crop_flip(x, torch.Generator().manual_seed(1), padding=4)
    assert out.shape == x.shape and out.dtype == dtype
    seen_dy, seen_dx, seen_flip = set(), set(), set()
    for i in range(len(x)):
        params = recover_params(x[i], out[i], 4)
        assert params, f"image {i} is not a crop of its padded input"
        dy, dx, flip = params[0]
        seen_dy.add(dy), seen_dx.add(dx), seen_flip.add(flip)
    assert seen_flip == {False, True}
    assert min(seen_dy) >= 0 and max(seen_dy) <= 8 and len(seen_dy) >= 5
    assert min(seen_dx) >= 0 and max(seen_dx) <= 8 and len(seen_dx) >= 5


def test_ones_image_zero_border_at_most_padding_wide() -> None:
    x = torch.ones(200, 1, 32, 32)
    out = random_crop_flip(x, torch.Generator().manual_seed(5))
    for img in out[:, 0]:
        rows = img.sum(1) > 0
        cols = img.sum(0) > 0
        # The ones form one rectangle; the zeros around it are border strips at most 4 wide.
        assert int((~rows).sum()) <= 4 and int((~cols).sum()) <= 4
        r = torch.nonzero(rows).flatten()
        c = torch.nonzero(cols).flatten()
        assert torch.equal(img[r[0] : r[-1] + 1, c[0] : c[-1] + 1], torch.ones(len(r), len(c)))
        assert int(img.sum()) == len(r) * len(c)
        assert r[-1] - r[0] + 1 == len(r) and c[-1] - c[0] + 1 == len(c)


def test_flip_really_flips() -> None:
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 1, 16).repeat(64, 1, 1, 1)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), padding=0)
    flipped = [torch.equal(o, x[0].flip(-1)) for o in out]
    same = [torch.equal(o, x[0]) for o in out]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert 16 <= sum(flipped) <= 48


def test_augmentation_reproducible() -> None:
    x = torch.rand(32, 3, 32, 32)
    a = random_crop_flip(x, torch.Generator().manual_seed(7))
    b = random_crop_flip(x, torch.Generator().manual_seed(7))
    c = random_crop_flip(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(random_crop_flip(x[:0], torch.Generator()), x[:0])


def test_normalize() -> None:
    x = torch.rand(4, 3, 5, 5)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    expected = torch.stack([(x[:, c] - mean[c]) / std[c] for c in range(3)], dim=1)
    torch.testing.assert_close(normalize(x, mean, std), expected)
