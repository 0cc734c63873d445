"""The names of the training layers in one place, for scripts written against earlier
versions: building (:mod:`locallearn.build`), the loop (:mod:`locallearn.loop`) and the
run (:mod:`locallearn.runner`)."""

from locallearn.build import (
    build_backbone,
    build_data,
    build_net,
    split_cuts,
    stack_views,
    stage_costs,
)
from locallearn.errors import TrainingError
from locallearn.loop import Placement, SingleProcess
from locallearn.runner import Interrupted, Trainer, resolve_run, run

__all__ = ["Interrupted", "Placement", "SingleProcess", "Trainer", "TrainingError",
           "build_backbone", "build_data", "build_net", "resolve_run", "run", "split_cuts",
           "stack_views", "stage_costs"]
