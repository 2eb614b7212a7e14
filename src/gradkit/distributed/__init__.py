"""One process per pipeline stage on torch.distributed (gloo on CPU, NCCL on GPUs).

``gradkit train --method fr --stages K --workers K`` starts K processes on this machine
(:mod:`gradkit.distributed.launch`); ``torchrun --nproc-per-node K -m gradkit train --method fr
--stages K`` (and ``--nnodes`` for several machines) runs the same code with one rank per stage. Each
rank runs the one training loop with :class:`~gradkit.distributed.backend.StageProcessBackend`,
executing its stage's column of the same schedule the single-process executor runs
(:class:`~gradkit.distributed.executor.DistributedExecutor`), so a run with ``--threads 1`` computes
exactly what one process does.
"""
