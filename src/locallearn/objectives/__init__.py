"""Local objectives: heads and losses that train one stage each.

Importing this package registers every objective in :data:`OBJECTIVES`.
"""

from locallearn.objectives import auglocal, ce, infopro, momentum, predsim, simclr, supcon  # noqa: F401
from locallearn.objectives.base import OBJECTIVES, Objective, build_objective, register_objective
from locallearn.objectives.diversity import diversity_penalty
from locallearn.objectives.groups import GroupObjective, build_group_objective
from locallearn.objectives.heads import HEAD_KINDS, build_head
from locallearn.objectives.reconstruct import ReconstructObjective, reconstruct_weights

__all__ = ["OBJECTIVES", "Objective", "build_objective", "register_objective", "HEAD_KINDS",
           "build_head", "diversity_penalty", "GroupObjective", "build_group_objective",
           "ReconstructObjective", "reconstruct_weights"]
