"""Shared-memory mailboxes (gradkit.distributed.shm): exact round trips, growing rings, no leftovers."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from gradkit.distributed import shm

pytestmark = pytest.mark.skipif(not shm.available(), reason="no /dev/shm on x86-64 here")


def _links() -> tuple[str, shm.SharedMemoryLinks, shm.SharedMemoryLinks]:
    run_id = "test" + uuid.uuid4().hex[:8]
    return run_id, shm.SharedMemoryLinks(run_id, 0), shm.SharedMemoryLinks(run_id, 1)


def test_messages_arrive_bit_exact_in_order() -> None:
    run_id, sender, receiver = _links()
    sent = [torch.randn(4, 3, 5), torch.randn(4, 3, 5).double(), torch.arange(7), torch.rand(2, 2) > 0.5]
    headers = [sender.write("activation", 1, t.contiguous()) for t in sent]
    for t, (generation, slot, sequence) in zip(sent, headers, strict=True):
        got = receiver.read("activation", 0, generation, slot, sequence, t.dtype, list(t.shape))
        assert got.dtype == t.dtype and torch.equal(got, t)
    sender.close()
    receiver.close()
    assert not list(Path("/dev/shm").glob(f"gradkit-{run_id}-*"))


def test_a_larger_message_starts_a_larger_ring_and_slots_are_reused() -> None:
    run_id, sender, receiver = _links()
    small, big = torch.randn(10), torch.randn(1000)
    for i in range(3 * shm.SLOTS):  # more messages than slots: each is read before the ring wraps
        g, slot, seq = sender.write("delta", 1, small + i)
        assert (g, slot, seq) == (0, i % shm.SLOTS, i)
        assert torch.equal(receiver.read("delta", 0, g, slot, seq, small.dtype, [10]), small + i)
    g, slot, seq = sender.write("delta", 1, big)
    assert g == 1 and seq == 0
    assert torch.equal(receiver.read("delta", 0, g, slot, seq, big.dtype, [1000]), big)
    sender.close()
    receiver.close()
    shm.cleanup(run_id)
    assert not list(Path("/dev/shm").glob(f"gradkit-{run_id}-*"))


def test_cleanup_removes_files_a_killed_run_left() -> None:
    run_id, sender, _ = _links()
    sender.write("label", 1, torch.arange(5))  # never read: the file stays until cleanup
    assert list(Path("/dev/shm").glob(f"gradkit-{run_id}-*"))
    shm.cleanup(run_id)
    assert not list(Path("/dev/shm").glob(f"gradkit-{run_id}-*"))


def test_no_room_in_dev_shm_means_no_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    """A small /dev/shm (containers) makes the sender fall back to the process group, not crash."""
    run_id, sender, _ = _links()
    monkeypatch.setattr(shm, "_room_for", lambda nbytes: False)
    assert sender.write("activation", 1, torch.randn(100)) is None
    assert not list(Path("/dev/shm").glob(f"gradkit-{run_id}-*"))
