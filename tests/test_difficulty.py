"""Difficulty schedules: rules, lists, validation through the run config, and nets whose
stages get their scheduled objective options."""

import pytest
import torch

from locallearn.config import ConfigError, load_config
from locallearn.data import ArrayData, DataSplits
from locallearn.difficulty import apply_difficulty, knob_values, stage_options
from locallearn.models import build_model
from locallearn.network import LocalNet
from locallearn.train import build_net

torch.set_num_threads(1)


def test_rules_give_the_documented_values():
    assert knob_values("temperature", 0.5, 3) == [0.5, 0.5, 0.5]
    assert knob_values("temperature", {"rule": "constant", "value": 0.2}, 2) == [0.2, 0.2]
    assert knob_values("temperature", {"rule": "linear", "first": 1.0, "last": 0.4}, 4) == \
        pytest.approx([1.0, 0.8, 0.6, 0.4])
    assert knob_values("neg_fraction", {"rule": "geometric", "first": 0.125, "last": 1.0}, 4) == \
        pytest.approx([0.125, 0.25, 0.5, 1.0])
    assert knob_values("proj_hidden", {"rule": "geometric", "first": 2048, "last": 512}, 3) == \
        [2048, 1024, 512]
    assert knob_values("projector", ["mlp", "linear"], 2) == ["mlp", "linear"]
    # a single stage takes the last value (it is the deepest stage)
    assert knob_values("temperature", {"rule": "linear", "first": 1.0, "last": 0.4}, 1) == [0.4]


def test_stage_options_merge_every_knob_per_stage():
    opts = stage_options({"temperature": [1.0, 0.5], "proj_hidden": 64}, 2)
    assert opts == [{"temperature": 1.0, "proj_hidden": 64}, {"temperature": 0.5, "proj_hidden": 64}]


@pytest.mark.parametrize("spec, match", [
    ({"temprature": 0.5}, "unknown difficulty knob"),
    ({"temperature": [1.0, 0.5]}, "lists 2 values but split.k=4"),
    ({"temperature": {"rule": "cubic", "first": 1, "last": 2}}, "choose one of: constant"),
    ({"temperature": {"rule": "linear", "first": 1}}, "takes exactly the keys"),
    ({"temperature": {"rule": "geometric", "first": 0.0, "last": 1.0}}, "positive first"),
    ({"temperature": -1.0}, "must be positive"),
    ({"neg_fraction": 1.5}, r"in \(0, 1\]"),
    ({"projector": "conv"}, "choose one of: identity"),
    ({"proj_hidden": "wide"}, "expected a number"),
])
def test_bad_schedules_are_config_errors_naming_the_key(spec, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["split.k=4", "objective=simclr", f"objective.difficulty={spec}"])


def test_difficulty_refuses_groups():
    with pytest.raises(ConfigError, match="split.groups"):
        load_config(None, ["split.k=2", "split.groups=2", "objective=simclr",
                           "objective.difficulty={temperature: [1.0, 0.5]}"])


def test_apply_difficulty_rebuilds_each_stage_objective():
    net = LocalNet.from_backbone(build_model("mlp", (1, 4, 4), 2, hidden=[8, 8, 8]), 3,
                                 objective="simclr")
    applied = apply_difficulty(net, "simclr", {"proj_dim": 4}, {
        "temperature": {"rule": "geometric", "first": 1.0, "last": 0.25},
        "neg_fraction": [0.25, 0.5, 1.0], "proj_hidden": [32, 16, 8]})
    objs = [s.objective for s in net.stages]
    assert [o.temperature for o in objs] == pytest.approx([1.0, 0.5, 0.25])
    assert [o.neg_fraction for o in objs] == [0.25, 0.5, 1.0]
    assert [o.projector[1].out_features for o in objs] == [32, 16, 8]  # hidden widths
    assert all(o.projector[-1].out_features == 4 for o in objs)       # base options kept
    assert applied[0] == {"temperature": 1.0, "neg_fraction": 0.25, "proj_hidden": 32}


def test_build_net_applies_the_configured_schedule():
    data = ArrayData(torch.zeros(4, 1, 4, 4, dtype=torch.uint8), torch.arange(4) % 2, ["a", "b"])
    cfg = load_config(None, ["model=mlp", "model.options={hidden: [8, 8]}", "split.k=2",
                             "objective=simclr", "objective.difficulty={temperature: [0.9, 0.3]}"])
    net = build_net(cfg, DataSplits("toy", data, data))
    assert [s.objective.temperature for s in net.stages] == [0.9, 0.3]
