"""Compression tests run many small ops: one torch thread (see ``one_torch_thread`` in tests/conftest.py)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# Without a GPU, Triton's interpreter runs the Triton kernels on CPU tensors (test_triton.py calls them
# directly; the normal CPU dispatch never does). It must be chosen before triton is first imported.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    return None


@pytest.fixture(params=["native", "torch"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on the fused C kernels and again on the pure-torch fast path."""
    from gradkit.compress import _native

    if request.param == "torch":
        monkeypatch.setattr(_native, "_lib", None)
        monkeypatch.setattr(_native, "_tried", True)
    elif _native.kernels() is None:
        pytest.skip("no C compiler here: the fused kernels cannot be built")
    return str(request.param)
