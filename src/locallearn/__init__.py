"""locallearn: local learning of deep networks as chains of gradient-isolated stages.

The public API::

    import locallearn as ll
    data = ll.load_data("digits")
    net = ll.LocalNet.from_blocks(my_sequential, data.input_shape, data.num_classes, k=4)
    cfg = ll.load_config(overrides=["engine=local", "train.epochs=3"])
    summary = ll.Trainer(net, data, cfg).fit()

The names are imported on first use (PEP 562), so that ``import locallearn.cli`` (the
``locallearn`` command, whose ``--help`` and ``list`` need no torch) does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the static view of the lazy names below
    from locallearn.build import build_net
    from locallearn.config import RunConfig, load_config
    from locallearn.data import load_data
    from locallearn.engines import BackpropEngine, LocalEngine, build_engine
    from locallearn.evaluate import evaluate
    from locallearn.models import build_model, register_model
    from locallearn.network import LocalNet, Stage
    from locallearn.runner import Trainer, run
    from locallearn.types import Masked

_HOME = {  # public name -> the module that defines it
    "RunConfig": "locallearn.config", "load_config": "locallearn.config",
    "load_data": "locallearn.data",
    "BackpropEngine": "locallearn.engines", "LocalEngine": "locallearn.engines",
    "build_engine": "locallearn.engines", "evaluate": "locallearn.evaluate",
    "build_model": "locallearn.models", "LocalNet": "locallearn.network",
    "Stage": "locallearn.network", "Trainer": "locallearn.runner",
    "build_net": "locallearn.build", "run": "locallearn.runner", "Masked": "locallearn.types",
    "register_model": "locallearn.models",
}

__all__ = ["BackpropEngine", "LocalEngine", "LocalNet", "Masked", "RunConfig", "Stage", "Trainer",
           "build_engine", "build_model", "build_net", "evaluate", "load_config", "load_data",
           "register_model", "run"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use."""
    if name not in _HOME:
        raise AttributeError(f"module 'locallearn' has no attribute {name!r}")
    value = getattr(import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
