"""The public Python API: the README example runs, schedules, optimizers and ensembles."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from locallearn.evaluate import evaluate
from locallearn.network import LocalNet, Stage
from locallearn.objectives.base import Objective
from locallearn.optim import build_optimizer, lr_factor

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs_as_a_script_on_real_workers(tmp_path):
    """The README's Python example, saved as a user's script and run: its pipeline starts
    real worker processes, which import the script's own modules."""
    code = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert 'train={"epochs": 5}' in code
    code = code.replace('train={"epochs": 5}', 'train={"epochs": 1, "progress": False}')
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    stages, final, efficiency = re.fullmatch(r"\[(.*)\] (\S+) (\S+)",
                                             done.stdout.strip().splitlines()[-1]).groups()
    assert len(stages.split(",")) == 2  # K=2 stage accuracies
    assert float(final) > 10 and 0 < float(efficiency) <= 1  # better than chance; 2 workers


def test_lr_schedules():
    assert lr_factor(0, 100, "cosine") == 1.0
    assert lr_factor(100, 100, "cosine", min_factor=0.01) == pytest.approx(0.01)
    assert lr_factor(50, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(50, 100, "linear") == pytest.approx(0.5)
    assert lr_factor(25, 100, "step", step_every=10, gamma=0.5) == 0.25
    assert lr_factor(4, 100, "constant", warmup=10) == 0.5
    assert lr_factor(10, 100, "cosine", warmup=10) == 1.0
    with pytest.raises(ValueError, match="choose one of"):
        lr_factor(0, 10, "exp")


def test_optimizers():
    p = [nn.Parameter(torch.ones(2))]
    sgd = build_optimizer(p, "sgd", 0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    assert sgd.defaults["nesterov"] and sgd.defaults["weight_decay"] == 1e-4
    assert isinstance(build_optimizer(p, "adamw", 1e-3), torch.optim.AdamW)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        build_optimizer(p, "rmsprop", 0.1)


class _Fixed(Objective):
    """A stage 'head' that returns fixed logits, to check the ensemble arithmetic."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def predict(self, h):
        return self.logits


def test_ensembles_weight_deeper_stages_by_powers_of_two():
    # Two samples, two classes. Stage 1 is sure of class 0; stage 2 prefers class 1.
    # Uniform: class 0 gets (0.95 + 0.1) / 2 = 0.525 > 0.475.
    # 2^k weights (1/3, 2/3): class 0 gets 0.95/3 + 0.2/3 = 0.383 < 0.617.
    s1 = torch.log(torch.tensor([[0.95, 0.05], [0.95, 0.05]]))
    s2 = torch.log(torch.tensor([[0.1, 0.9], [0.1, 0.9]]))
    stages = [Stage(nn.Identity(), _Fixed(s1)), Stage(nn.Identity(), _Fixed(s2))]
    net = LocalNet(stages, 2)
    y = torch.tensor([1, 1])
    r = evaluate(net, [(torch.zeros(2, 1), y)])
    assert r["stage_acc"] == [0.0, 100.0] and r["final_acc"] == 100.0
    assert r["ens_uniform"] == 0.0
    assert r["ens_weighted"] == 100.0


def test_the_public_run_is_the_function_also_after_its_module_is_imported():
    import locallearn as ll
    import locallearn.runner  # noqa: F401

    assert callable(ll.run) and callable(ll.Trainer)
