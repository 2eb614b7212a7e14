"""``ag-news``: AG News topic classification (Zhang, Zhao & LeCun, 2015) as token-id sequences.

Two CSV layouts are read (no header):

* ``label,text`` with labels 0..3 — the development subset in ``ag_news_small/``;
* the official ``"class index","title","description"`` with labels 1..4 (``ag_news_csv/`` of the
  original release), where title and description are joined.

The folder (``ag_news_small``, ``ag_news_csv`` or ``ag_news``, holding ``train.csv`` and ``test.csv``) is
searched in the usual data roots (``--data-dir`` first). Tokenisation is deliberately simple and
deterministic: lower-case, ``[a-z0-9']+`` words, and a vocabulary of the train split's words seen at
least twice, ordered by count then alphabetically (id 0 padding, 1 unknown). Each text keeps its first
``SEQ_LEN`` tokens, left-padded so a recurrent model's last step is a real word. Examples are float32
``(N, 1, SEQ_LEN)`` token ids so the generic batch loader serves them unchanged (mean 0, std 1).
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from gradkit.data._locate import search_roots
from gradkit.data._registry import DATASETS
from gradkit.data._types import Dataset, DatasetInfo
from gradkit.errors import DataError

__all__ = ["AG_NEWS_CLASSES", "SEQ_LEN", "build_vocab", "encode", "load_ag_news", "tokenize"]

AG_NEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")
SEQ_LEN = 48
MIN_COUNT = 2
MAX_VOCAB = 30000
FOLDERS = ("ag_news_small", "ag_news_csv", "ag_news")
_WORD = re.compile(r"[a-z0-9']+")


def tokenize(text: str) -> list[str]:
    """Lower-cased words of letters, digits and apostrophes."""
    return _WORD.findall(text.lower())


def build_vocab(texts: Sequence[str], min_count: int = MIN_COUNT, max_size: int = MAX_VOCAB) -> dict[str, int]:
    """Word -> id (from 2; 0 is padding, 1 unknown), by descending count then alphabetically."""
    counts = Counter(w for t in texts for w in tokenize(t))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return {w: i + 2 for i, w in enumerate(words[: max_size - 2])}


def encode(texts: Sequence[str], vocab: dict[str, int], seq_len: int = SEQ_LEN) -> torch.Tensor:
    """Float32 ``(N, 1, seq_len)`` ids: first ``seq_len`` tokens, left-padded with 0."""
    out = torch.zeros(len(texts), 1, seq_len)
    for i, text in enumerate(texts):
        ids = [vocab.get(w, 1) for w in tokenize(text)][:seq_len]
        if ids:
            out[i, 0, seq_len - len(ids) :] = torch.tensor(ids, dtype=torch.float32)
    return out


def _read(path: Path) -> tuple[list[str], list[int]]:
    texts: list[str] = []
    labels: list[int] = []
    lineno = 0
    data = path.read_bytes()
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x}); re-encode the file as "
                        "UTF-8, e.g. iconv -f latin1 -t utf-8") from None
    try:
        for lineno, row in enumerate(csv.reader(io.StringIO(content, newline="")), start=1):
            _add_row(path, lineno, row, texts, labels)
    except csv.Error as exc:
        raise DataError(f"{path}:{lineno + 1}: not a valid CSV row ({exc}); AG News rows are "
                        "class,title,description with fields under "
                        f"{csv.field_size_limit() // 1000} kB") from None
    if not texts:
        raise DataError(f"{path} holds no rows")
    return texts, labels


def _add_row(path: Path, lineno: int, row: list[str], texts: list[str], labels: list[int]) -> None:
    if not row:
        return
    try:
        label = int(row[0])
    except ValueError:
        raise DataError(f"{path}:{lineno}: first column must be a class number, got {row[0]!r}") from None
    if len(row) == 2:  # label,text with labels 0..3
        text = row[1]
    elif len(row) == 3:  # official: class index 1..4, title, description
        label -= 1
        text = f"{row[1]} {row[2]}"
    else:
        raise DataError(f"{path}:{lineno}: expected 2 (label,text) or 3 (class,title,description) columns, got {len(row)}")
    if not 0 <= label < len(AG_NEWS_CLASSES):
        raise DataError(f"{path}:{lineno}: label {row[0]} is outside the 4 AG News classes")
    texts.append(text)
    labels.append(label)


def find_ag_news(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """The first folder under the data roots holding AG News ``train.csv`` and ``test.csv``."""
    for root in search_roots(data_dir):
        for candidate in (root, *(root / name for name in FOLDERS)):
            if (candidate / "train.csv").is_file() and (candidate / "test.csv").is_file() and (
                candidate != root or root.name in FOLDERS
            ):
                return candidate
    return None


@DATASETS.register("ag-news", help="AG News topics as token ids (CSV: label,text or the official layout), 4 classes")
def load_ag_news(data_dir: str | os.PathLike[str] | None = None, *, download: bool = False) -> Dataset:
    """AG News from ``train.csv``/``test.csv`` (see the module docstring for layouts and tokenisation).

    ``download`` is not supported: the official files must be given with ``--data-dir``.
    """
    folder = find_ag_news(data_dir)
    if folder is None:
        roots = ", ".join(str(r) for r in search_roots(data_dir))
        raise DataError(
            f"dataset 'ag-news' not found; searched {roots} (folders {', '.join(FOLDERS)} with train.csv and "
            "test.csv); point --data-dir at the official ag_news_csv folder"
        )
    train_texts, train_y = _read(folder / "train.csv")
    test_texts, test_y = _read(folder / "test.csv")
    vocab = build_vocab(train_texts)
    info = DatasetInfo("ag-news", (1, SEQ_LEN), 4, AG_NEWS_CLASSES, (0.0,), (1.0,), False, str(folder))
    return Dataset(
        info,
        encode(train_texts, vocab),
        torch.tensor(train_y, dtype=torch.int64),
        encode(test_texts, vocab),
        torch.tensor(test_y, dtype=torch.int64),
        model_args={"vocab_size": len(vocab) + 2},
    )
