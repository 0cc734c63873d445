"""One pipeline worker's set-up: what rank 0 resolves and broadcasts before training.

Rank 0 resolves the run (config, run folder), loads the data with the run's seed,
measures the split once (so every rank builds the same stages) and broadcasts what
the others need: the config, the random state after loading the data (so every rank
initialises the network exactly as a single-process run does) and the shape of the
data. Other ranks never load data: they hold a placeholder of the right shape and
length that holds no memory.

Every rank then trains with the one training loop, :class:`locallearn.loop.Trainer`,
given this rank's engine, placement and the control group as its ``comm``: rank 0 reads
and augments the batches in the order of a single-process run and writes the one run
folder; every rank saves its own stages to ``ranks/rank<r>.pt`` and rank 0 writes the
merged, standard ``checkpoint.pt`` that ``locallearn eval`` and ``--resume`` read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from locallearn import runs
from locallearn.build import build_data, split_cuts
from locallearn.config import RunConfig
from locallearn.data import ArrayData, DataSplits
from locallearn.errors import ConfigError

MEASURED_SPLITS = ("time", "memory")  # splits that measure, so may differ between processes
DATA_META = ("vocab_size", "mean", "std")  # what building the net and the batches reads


@dataclass
class Setup:
    """What rank 0 broadcasts: the resolved run and the data's shape."""

    cfg: RunConfig
    run_dir: str
    rng: torch.Tensor
    data: dict[str, Any]


# -- set-up -----------------------------------------------------------------------------

def prepare(cfg: RunConfig, run_dir: Path) -> tuple[Setup, DataSplits]:
    """Rank 0: load the data, fix the split; what every rank needs to start."""
    if cfg.engine.name != "pipeline":
        raise ConfigError(f"workers started by torchrun run engine=pipeline, not {cfg.engine.name}")
    torch.manual_seed(cfg.train.seed)  # the same order of random draws as `train.run`
    data = build_data(cfg)
    if "vocab" in data.meta:  # text: the encoder fitted on the train split, as `train.run` saves
        runs.write_json(Path(run_dir) / "vocab.json", data.meta["vocab"])
    rng = torch.get_rng_state()
    if cfg.split.by in MEASURED_SPLITS and not cfg.split.cuts:
        cfg = dataclasses.replace(cfg, split=dataclasses.replace(
            cfg.split, cuts=tuple(split_cuts(cfg, data))))
    return Setup(cfg, str(run_dir), rng, data_spec(data)), data


def data_spec(data: DataSplits) -> dict[str, Any]:
    """Name, classes, sizes, shapes and dtypes of a data set, without its samples."""
    def split(a: ArrayData) -> tuple[int, tuple[int, ...], torch.dtype]:
        return len(a), tuple(a.x.shape[1:]), a.x.dtype

    return {"name": data.name, "classes": list(data.train.classes), "train": split(data.train),
            "test": split(data.test), "meta": {k: data.meta[k] for k in DATA_META if k in data.meta}}


def placeholder_data(spec: dict[str, Any]) -> DataSplits:
    """Data of the right name, classes, length and shape that holds no memory (zeros, expanded)."""
    def split(n: int, shape: tuple[int, ...], dtype: torch.dtype) -> ArrayData:
        x = torch.zeros((), dtype=dtype).expand(n, *shape)
        return ArrayData(x, torch.zeros((), dtype=torch.int64).expand(n), list(spec["classes"]))

    return DataSplits(spec["name"], split(*spec["train"]), split(*spec["test"]), dict(spec["meta"]))
