"""``text``: character-level next-token windows from a text file or the AG News subset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradkit.data import BatchLoader, load_dataset
from gradkit.data.text import CharVocab, windows
from gradkit.errors import ConfigError, DataError


def test_windows_are_inputs_and_the_next_characters() -> None:
    x, y = windows(torch.arange(10), context=4, stride=3)
    assert x.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6]]
    assert y.tolist() == [[1, 2, 3, 4], [4, 5, 6, 7]]


def test_vocabulary_from_train_with_unknown_zero() -> None:
    vocab = CharVocab("banana")
    assert vocab.chars[1:] == ("a", "b", "n") and len(vocab) == 4
    assert vocab.encode("abnz").tolist() == [1, 2, 3, 0]
    assert vocab.decode(vocab.encode("nab")) == "nab"


def test_a_text_file_given_by_path_or_data_dir(tmp_path: Path) -> None:
    file = tmp_path / "book.txt"
    file.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    by_path = load_dataset("text", options={"path": str(file), "context": 16})
    by_dir = load_dataset("text", str(file), options={"context": 16})
    assert torch.equal(by_path.train_x, by_dir.train_x)
    info = by_path.info
    assert info.task == "next-token" and info.input_shape == (16,) and info.source == str(file)
    assert info.num_classes == len(set("the quick brown fox jumps over the lazy dog.")) + 1
    assert by_path.train_x.dtype == torch.int64 and by_path.train_y.shape == by_path.train_x.shape
    assert torch.equal(by_path.train_y[:, :-1], by_path.train_x[:, 1:])
    x, y = next(iter(BatchLoader(by_path.train_x, by_path.train_y, info, 8, train=True).epoch(0)))
    assert x.dtype == torch.int64 and x.shape == (8, 16) and y.shape == (8, 16)  # served as they are


def test_ag_news_texts_are_the_default(shared_datasets: Path) -> None:
    ds = load_dataset("text", shared_datasets, options={"context": 32}, limit_train=300, limit_test=50, seed=1)
    assert ds.info.source.endswith("ag_news_small")
    assert ds.train_x.shape == (300, 32) and ds.test_x.shape == (50, 32)
    assert 40 < ds.info.num_classes < 200 and " " in ds.info.classes


def test_bad_options_and_short_text_are_one_line(tmp_path: Path) -> None:
    file = tmp_path / "short.txt"
    file.write_text("tiny", encoding="utf-8")
    with pytest.raises(DataError, match="too short"):
        load_dataset("text", options={"path": str(file), "context": 8})
    with pytest.raises(ConfigError, match="context must be a positive integer"):
        load_dataset("text", options={"path": str(file), "context": 0})
    with pytest.raises(ConfigError, match="unknown option.*accepts: path, context, stride"):
        load_dataset("text", options={"window": 8})
