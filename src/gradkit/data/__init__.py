"""Datasets by name, loaded into memory as tensors, and fast reproducible batches over them.

Example:
    >>> from gradkit.data import BatchLoader, load_dataset
    >>> ds = load_dataset("synthetic")
    >>> loader = BatchLoader(ds.train_x, ds.train_y, ds.info, 64, train=True, seed=0)
    >>> x, y = next(iter(loader.epoch(0)))
    >>> x.shape, y.dtype
    (torch.Size([64, 1, 8, 8]), torch.int64)

Files are searched in ``data_dir`` (or ``$GRADKIT_DATA``), ``~/.cache/gradkit``, ``/usr/share/datasets``
and ``../shared/datasets`` next to the repository; see :func:`search_roots` and
:func:`describe_datasets`. ``download=True`` fetches the official files (SHA-256 verified).
"""

# Importing these registers their datasets.
from gradkit.data import ag_news, graphs, text  # noqa: E402, F401, I001
from gradkit.data._augment import normalize, random_crop_flip
from gradkit.data._download import download, fetch
from gradkit.data._loader import BatchLoader
from gradkit.data._locate import search_roots
from gradkit.data._registry import DATASETS, data_label, describe_datasets, load_dataset
from gradkit.data._subset import stratified_subset
from gradkit.data._types import Dataset, DatasetInfo, DatasetStatus

__all__ = [
    "DATASETS",
    "BatchLoader",
    "Dataset",
    "DatasetInfo",
    "DatasetStatus",
    "data_label",
    "describe_datasets",
    "download",
    "fetch",
    "load_dataset",
    "normalize",
    "random_crop_flip",
    "search_roots",
    "stratified_subset",
]
