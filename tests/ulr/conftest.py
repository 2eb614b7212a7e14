"""ULR tests run many tiny tensor ops: one torch thread avoids OpenMP spin-waits on a busy 2-core
machine (measured 24 ms per tiny Linear call with 2 threads under load, 0.02 ms with 1)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
