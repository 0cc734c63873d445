"""locallearn: local learning of deep networks as chains of gradient-isolated stages.

The public API::

    import locallearn as ll
    data = ll.load_data("digits")
    net = ll.LocalNet.from_blocks(my_sequential, data.input_shape, data.num_classes, k=4)
    cfg = ll.load_config(overrides=["engine=local", "train.epochs=3"])
    summary = ll.Trainer(net, data, cfg).fit()
"""

from locallearn.config import RunConfig, load_config
from locallearn.data import load_data
from locallearn.engines import BackpropEngine, LocalEngine, build_engine
from locallearn.evaluate import evaluate
from locallearn.models import build_model
from locallearn.network import LocalNet, Stage
from locallearn.train import Trainer, build_net, run

__all__ = ["BackpropEngine", "LocalEngine", "LocalNet", "RunConfig", "Stage", "Trainer",
           "build_engine", "build_model", "build_net", "evaluate", "load_config", "load_data", "run"]
__version__ = "0.1.0"
