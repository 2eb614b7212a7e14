"""Torch's intra-op thread count, set for one piece of work and restored afterwards.

``torch.set_num_threads`` is process-wide: a library call (``gradkit.train`` in a notebook, ``main()``
called in-process by tests) that set it and left it would slow down everything the caller runs next.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["torch_threads"]


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads (``None``: leave the count alone), then put
    back the count it had before, also if the block set its own."""
    before = torch.get_num_threads()
    try:
        if threads is not None and threads != before:
            torch.set_num_threads(threads)
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
