"""Running the stages of a network in separate processes with torch.distributed.

==============  ==============================================================
``wire``         the packet format between ranks (header + tensors)
``comm``         point-to-point links (bounded async queues) and collectives
``worker``       one worker: set-up from rank 0, epochs, metrics, checkpoints
``group_worker`` one (stage, group) node per worker (``engine.placement=groups``)
``launch``       spawning the workers on this machine, or joining torchrun
``faults``       failure reports of workers and the rank the launcher blames
==============  ==============================================================

The engine itself (what one rank does per batch) is
:class:`locallearn.engines.pipeline.PipelineEngine`, for both placements.
Importing this package does not import ``torch.distributed``; its modules do.
"""

from __future__ import annotations

import os

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """True in a process that torchrun (or another launcher setting RANK etc.) started."""
    return all(k in os.environ for k in TORCHRUN_ENV)
