"""The user's own model in real worker processes, from Python: ``ll.Trainer(net, data,
cfg).fit()`` with ``engine=pipeline`` starts the workers, trains each stage where the
config places it, and gives the weights of ``engine=local`` back in ``net``."""

import copy

import pytest
import torch
from helpers import vit_blocks
from torch import nn

import locallearn as ll
from locallearn.errors import ConfigError, TrainingError


def settings(tmp_path, engine: str):
    return ll.load_config(engine={"name": engine, "threads": 1}, split={"k": 2},
                          data={"train_subset": 128, "test_subset": 64, "batch_size": 32},
                          train={"epochs": 1, "progress": False, "out_dir": str(tmp_path)},
                          optim={"lr": 0.05})


def test_a_vit_like_net_built_in_python_trains_in_real_workers_like_the_local_engine(tmp_path):
    data = ll.load_data("digits")
    torch.manual_seed(0)
    net = ll.LocalNet.from_blocks(vit_blocks(), data.input_shape, data.num_classes, k=2, head="mlp")
    twin = copy.deepcopy(net)
    piped = ll.Trainer(net, data, settings(tmp_path, "pipeline")).fit()
    local = ll.Trainer(twin, data, settings(tmp_path, "local")).fit()
    assert piped["workers"] == 2 and piped["engine"] == "pipeline"
    for (name, a), b in zip(net.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert piped["final_acc"] == local["final_acc"]


def test_a_module_that_cannot_be_pickled_is_refused_naming_the_reason(tmp_path):
    class Local(nn.Module):  # defined inside a function: workers cannot import it
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)

    data = ll.load_data("digits")
    net = ll.LocalNet.from_blocks([Local(), nn.Linear(64, 16)], data.input_shape,
                                  data.num_classes, k=2)
    with pytest.raises(ConfigError, match="cannot ship the net.*module level"):
        ll.Trainer(net, data, settings(tmp_path, "pipeline")).fit()


def test_user_optimizers_and_batches_train_in_one_process(tmp_path):
    data = ll.load_data("digits")
    net = ll.LocalNet.from_blocks(vit_blocks(), data.input_shape, data.num_classes, k=2)
    optimizers = [torch.optim.Adam(s.parameters(), lr=1e-3) for s in net.stages]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.train.x[:64].float(), data.train.y[:64]), batch_size=16)
    before = [p.clone() for p in net.parameters()]
    summary = ll.Trainer(net, data, settings(tmp_path, "local"), optimizers=optimizers,
                         train_data=loader).fit()
    assert optimizers[0].state  # the user's optimizer stepped
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert summary["final_acc"] is not None
    with pytest.raises(TrainingError, match="1 optimizers given for 2 stages"):
        ll.Trainer(net, data, settings(tmp_path, "local"), optimizers=optimizers[:1])
