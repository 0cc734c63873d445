"""Shared test set-up: every test starts from the same seeds, on one thread."""

import random

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


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
            f"train.out_dir={tmp_path}", "split.k=4"]
