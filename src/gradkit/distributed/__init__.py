"""One process per pipeline stage on torch.distributed (gloo on CPU, NCCL on GPUs).

``gradkit train --method fr --stages K --workers K`` starts K processes on this machine
(:mod:`gradkit.distributed.launch`); ``torchrun --nproc-per-node K -m gradkit train --method fr
--stages K`` (and ``--nnodes`` for several machines) runs the same code with one rank per stage. Each
rank executes its stage's column of the same schedule the single-process executor runs
(:class:`DistributedExecutor`), so a run with ``--threads 1`` computes exactly what one process does.
"""

import os


def in_worker_process() -> bool:
    """Whether this process was started as one rank of a multi-process run (torchrun or the launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


__all__ = ["in_worker_process"]
