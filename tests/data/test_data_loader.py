"""BatchLoader: every sample once per epoch, exact resume from a step, reproducible augmentation."""

from __future__ import annotations

import pytest
import torch

from gradkit.data import BatchLoader, DatasetInfo
from gradkit.errors import ConfigError


def info(n_classes: int, augment: bool, channels: int = 3) -> DatasetInfo:
    return DatasetInfo(
        "fake",
        (channels, 8, 8),
        n_classes,
        tuple(map(str, range(n_classes))),
        (0.4,) * channels,
        (0.2,) * channels,
        augment,
        "generated",
    )


def data(n: int = 103, augment: bool = True):
    """uint8 images with labels that are the sample ids, so batches can be traced back."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    return x, torch.arange(n), info(n, augment)


def collect(batches):
    xs, ys = zip(*batches, strict=True)
    return list(xs), list(ys)


@pytest.mark.parametrize("drop_last", [False, True])
def test_each_sample_once_per_epoch(drop_last: bool) -> None:
    x, y, i = data()
    loader = BatchLoader(x, y, i, 10, train=True, seed=1, drop_last=drop_last)
    assert loader.num_samples == 103
    assert len(loader) == (10 if drop_last else 11)
    _, ys = collect(loader.epoch(0))
    assert len(ys) == len(loader)
    sizes = [len(b) for b in ys]
    if drop_last:
        assert sizes == [10] * 10
        assert len(set(torch.cat(ys).tolist())) == 100
    else:
        assert sizes == [10] * 10 + [3]  # the last partial batch is kept
        assert sorted(torch.cat(ys).tolist()) == list(range(103))


def test_resume_from_a_step_gives_the_tail() -> None:
    x, y, i = data()
    loader = BatchLoader(x, y, i, 10, train=True, seed=4)
    full_x, full_y = collect(loader.epoch(3))
    for start in (0, 1, 5, 10):
        # A fresh loader, as after a restart from a checkpoint.
        resumed = BatchLoader(x, y, i, 10, train=True, seed=4)
        tail_x, tail_y = collect(resumed.epoch(3, start_step=start))
        assert len(tail_x) == len(full_x) - start
        for a, b in zip(tail_x, full_x[start:], strict=True):
            assert torch.equal(a, b)
        for a, b in zip(tail_y, full_y[start:], strict=True):
            assert torch.equal(a, b)
    assert list(loader.epoch(3, start_step=len(loader))) == []
    with pytest.raises(ConfigError, match="start_step"):
        loader.epoch(0, start_step=len(loader) + 1)


def test_epochs_differ_and_seeds_matter() -> None:
    x, y, i = data()
    loader = BatchLoader(x, y, i, 10, train=True, seed=0)
    order0 = torch.cat(collect(loader.epoch(0))[1])
    order1 = torch.cat(collect(loader.epoch(1))[1])
    assert not torch.equal(order0, order1)
    assert torch.equal(order0, torch.cat(collect(loader.epoch(0))[1]))
    other = BatchLoader(x, y, i, 10, train=True, seed=1)
    assert not torch.equal(order0, torch.cat(collect(other.epoch(0))[1]))


def expected_batch(x: torch.Tensor, inf: DatasetInfo) -> torch.Tensor:
    mean = torch.tensor(inf.mean).view(1, -1, 1, 1)
    std = torch.tensor(inf.std).view(1, -1, 1, 1)
    return (x.float() / 255 - mean) / std


def test_augmented_batches_are_crops_of_the_right_samples() -> None:
    x, y, i = data()
    loader = BatchLoader(x, y, i, 16, train=True, seed=2)
    xb, yb = next(iter(loader.epoch(0)))
    assert xb.dtype == torch.float32 and yb.dtype == torch.int64
    plain = expected_batch(x[yb], i)
    assert not torch.allclose(xb, plain)  # augmented
    # Undo the normalisation: every value is a pixel of the sample or the zero padding.
    pixels = (
        xb * torch.tensor(i.std).view(1, -1, 1, 1) + torch.tensor(i.mean).view(1, -1, 1, 1)
    ) * 255
    pixels = pixels.round()
    for k, sid in enumerate(yb.tolist()):
        allowed = set(x[sid].flatten().tolist()) | {0}
        assert set(pixels[k].flatten().tolist()) <= allowed


def test_no_augmentation_without_the_flag_or_in_eval() -> None:
    x, y, _ = data()
    for inf, train in ((info(103, False), True), (info(103, True), False)):
        loader = BatchLoader(x, y, inf, 16, train=train, seed=0)
        for xb, yb in loader.epoch(0):
            torch.testing.assert_close(xb, expected_batch(x[yb], inf))


def test_eval_order_fixed() -> None:
    x, y, i = data()
    loader = BatchLoader(x, y, i, 25, train=False)
    ys = collect(loader.epoch(0))[1]
    assert torch.equal(torch.cat(ys), torch.arange(103))
    assert torch.equal(torch.cat(collect(loader.epoch(5))[1]), torch.arange(103))


def test_float_dataset_not_modified() -> None:
    x = torch.rand(20, 1, 8, 8)
    before = x.clone()
    inf = info(20, False, channels=1)
    loader = BatchLoader(x, torch.arange(20), inf, 8, train=False)
    first = collect(loader.epoch(0))[0]
    second = collect(loader.epoch(0))[0]
    assert torch.equal(x, before)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(torch.cat(first), (x - 0.4) / 0.2)


def test_bad_arguments() -> None:
    x, y, i = data()
    with pytest.raises(ConfigError, match="batch_size"):
        BatchLoader(x, y, i, 0, train=True)
    with pytest.raises(ConfigError, match="labels"):
        BatchLoader(x, y[:5], i, 4, train=True)
    with pytest.raises(ConfigError, match="channel"):
        BatchLoader(x, y, info(103, True, channels=1), 4, train=True)
