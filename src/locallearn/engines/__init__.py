"""Engines decide how the stages of a LocalNet are run; the stage and objective code is shared.

=============  ==========================================================
``backprop``    end-to-end BP of the whole model (the reference)
``local``       sequential local training, one stage after another
``pipeline``    stages in separate processes (torch.distributed); built per rank
                by :mod:`locallearn.distributed.launch`, not by :func:`build_engine`
=============  ==========================================================
"""

from __future__ import annotations

from typing import Any

from locallearn.engines.backprop import BackpropEngine
from locallearn.engines.base import Engine, InProcess, StageUpdate, stage_loss
from locallearn.engines.multiexit import MultiExitEngine
from locallearn.engines.sequential import LocalEngine
from locallearn.types import detach

ENGINES = {
    "backprop": "end-to-end backpropagation with only the task loss (aux heads on detached features)",
    "local": "sequential local training: each stage updates from its own loss on a detached input",
    "pipeline": "stages in separate processes, activations sent forward with torch.distributed",
    "multiexit": "early-exit network: BP of the sum of every stage's loss into the trunk",
}


def build_engine(name: str, **options: Any) -> Engine:
    """Build an in-process engine by name.

    Raises:
        ValueError: for an unknown name (the message lists the choices).
    """
    update = options.get("update")
    if name == "backprop":
        return BackpropEngine(aux_heads=options.get("aux_heads", True),
                              checkpoint=options.get("checkpoint", "none"), update=update)
    if name == "local":
        return LocalEngine(update)
    if name == "pipeline":  # never a silent one-process stand-in
        raise ValueError("engine=pipeline is built per worker process: train with "
                         "ll.Trainer(net, data, cfg).fit() or ll.run(cfg), which start the "
                         "workers; in one process use engine=local (the same updates)")
    if name == "multiexit":
        return MultiExitEngine(options.get("exit_weights"), update)
    raise ValueError(f"unknown engine {name!r}; choose one of: {', '.join(ENGINES)}")


__all__ = ["ENGINES", "BackpropEngine", "Engine", "InProcess", "LocalEngine", "MultiExitEngine",
           "StageUpdate", "build_engine", "detach", "stage_loss"]
