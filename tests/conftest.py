"""Shared test set-up: every test starts from the same seeds, on one thread, in fp32.

``train.precision=auto`` (the users' default) picks bf16 and channels-last on CPUs
with AVX512-BF16; the equivalence tests compare engines and golden numbers in fp32,
so ``LOCALLEARN_AUTO=fp32`` pins ``auto`` to fp32 for every test (and for the worker
processes the pipeline tests start, which inherit the environment). Tests of the
reduced precisions ask for them explicitly (``tests/test_precision.py``).
"""

import os
import random

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
os.environ["LOCALLEARN_AUTO"] = "fp32"  # see the module docstring (locallearn.precision.AUTO_ENV)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_cfg(tmp_path):
    """Overrides for a tiny, fast run on the embedded digits data in a temporary folder."""
    return ["model=mlp", "model.options={hidden: [32, 32, 32, 32]}", "data.train_subset=512",
            "data.test_subset=128", "data.batch_size=32", "train.epochs=2", "optim.lr=0.1", "train.progress=false",
            "train.precision=fp32",
            f"train.out_dir={tmp_path}", "split.k=4"]
