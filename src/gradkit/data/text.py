"""``text``: character-level language modelling, next-token windows from any text.

Where the text comes from, first match wins:

* ``--data-option path=FILE`` (or ``--data-dir FILE``, a file rather than a folder): any UTF-8 text
  file; its first 90% of characters are the train split, the rest the test split;
* otherwise the texts of the AG News subset (found like the ``ag-news`` dataset, ``--data-dir`` first):
  ``train.csv``'s texts, one per line, are the train split and ``test.csv``'s the test split.

The vocabulary is the train split's characters, in code-point order, after id 0, which stands for any
character the train split lacks. Each split is cut into windows of ``context`` characters every
``stride`` characters (default: ``context``, no overlap): an example is the window's ids, ``(T,)``
int64, and its target the ids one character later (the next character at every position).
``DatasetInfo.task`` is ``"next-token"``, ``num_classes`` the vocabulary size; the per-token loss in
bits is bits per character (``test_bpc`` in the epoch records).

Example:
    >>> ds = load_dataset("text", options={"context": 32})  # doctest: +SKIP
    >>> ds.train_x.shape, ds.train_y[0, :-1].equal(ds.train_x[0, 1:])  # doctest: +SKIP
    (torch.Size([30381, 32]), True)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from gradkit.data._registry import DATASETS
from gradkit.data._types import Dataset, DatasetInfo
from gradkit.data.ag_news import FOLDERS, _read, find_ag_news
from gradkit.errors import ConfigError, DataError

__all__ = ["CharVocab", "load_text", "windows"]

CONTEXT = 64
TRAIN_FRACTION = 0.9
UNKNOWN = "\ufffd"


class CharVocab:
    """Characters <-> ids: id 0 is the unknown character, then the given characters in code-point order."""

    def __init__(self, text: str) -> None:
        chars = sorted(set(text) - {UNKNOWN})
        self.chars: tuple[str, ...] = (UNKNOWN, *chars)
        self._codes = np.array([ord(c) for c in chars], dtype=np.uint32)

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """int64 ids of ``text``'s characters (0 for characters outside the vocabulary)."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        where = np.searchsorted(self._codes, codes)
        where = np.minimum(where, max(len(self._codes) - 1, 0))
        known = self._codes[where] == codes if len(self._codes) else np.zeros(len(codes), dtype=bool)
        return torch.from_numpy(np.where(known, where + 1, 0).astype(np.int64))

    def decode(self, ids: torch.Tensor) -> str:
        """The text of ``ids``."""
        return "".join(self.chars[i] for i in ids.tolist())


def windows(ids: torch.Tensor, context: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples ``ids[s : s+context]`` and targets ``ids[s+1 : s+context+1]`` for ``s = 0, stride, ...``."""
    count = (len(ids) - context - 1) // stride + 1 if len(ids) > context else 0
    starts = torch.arange(count) * stride
    offsets = torch.arange(context)
    index = starts[:, None] + offsets[None, :]
    return ids[index], ids[index + 1]


def _texts(path: str | None, data_dir: str | os.PathLike[str] | None) -> tuple[str, str, str]:
    """(train text, test text, source)."""
    file = Path(path) if path is not None else None
    if file is None and data_dir is not None and Path(data_dir).is_file():
        file = Path(data_dir)
    if file is not None:
        if not file.is_file():
            raise DataError(f"text file {file} not found; give --data-option path=FILE with a UTF-8 text file")
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{file} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        cut = int(len(text) * TRAIN_FRACTION)
        return text[:cut], text[cut:], str(file)
    folder = find_ag_news(data_dir)
    if folder is None:
        raise DataError("dataset 'text' needs a text file: give --data-option path=FILE (or --data-dir FILE); "
                        f"without one it reads the AG News subset ({', '.join(FOLDERS)}), which was not found")
    train, _ = _read(folder / "train.csv")
    test, _ = _read(folder / "test.csv")
    return "\n".join(train) + "\n", "\n".join(test) + "\n", str(folder)


@DATASETS.register("text", help="characters of a text file (default: AG News texts) as next-token windows; for gpt")
def load_text(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    path: str | None = None,
    context: int = CONTEXT,
    stride: int | None = None,
) -> Dataset:
    """Character-level next-token windows (see the module docstring for sources and layout).

    Args:
        data_dir: a text file, or the folder searched first for the AG News subset.
        download: not supported (the AG News subset is read from disk, any file is yours).
        path: a UTF-8 text file (``--data-option path=FILE``); wins over ``data_dir``.
        context: characters per example, ``T``.
        stride: characters between the starts of consecutive windows (default ``context``).

    Raises:
        ConfigError: a non-positive context or stride.
        DataError: no text found, not UTF-8, or too short for one window.
    """
    stride = context if stride is None else stride
    for name, value in (("context", context), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"text option {name} must be a positive integer, got {value!r}")
    train_text, test_text, source = _texts(path, data_dir)
    vocab = CharVocab(train_text)
    train_x, train_y = windows(vocab.encode(train_text), context, stride)
    test_x, test_y = windows(vocab.encode(test_text), context, stride)
    if len(train_x) == 0 or len(test_x) == 0:
        raise DataError(f"{source}: too short for one window of {context} characters in each split "
                        f"({len(train_text)} train, {len(test_text)} test characters); lower context")
    info = DatasetInfo("text", (context,), len(vocab), vocab.chars, (), (), False, source, task="next-token")
    return Dataset(info, train_x, train_y, test_x, test_y)
