"""Linear probes and effective rank: pooling, closed-form ranks, separable data, a probe of
every stage, and a self-supervised run that probes itself and `locallearn probe RUN`."""

import json

import pytest
import torch

from locallearn.cli import main
from locallearn.data import ArrayData, DataSplits
from locallearn.models import build_model
from locallearn.network import LocalNet
from locallearn.probe import effective_rank, pool_features, probe_accuracy, probe_net
from locallearn.types import Masked

torch.set_num_threads(1)


def test_pool_features_shapes():
    assert pool_features(torch.randn(2, 3, 8, 8), grid=2).shape == (2, 12)
    assert pool_features(torch.randn(2, 3, 8, 8), grid=1).shape == (2, 3)
    assert pool_features(torch.randn(2, 3, 1, 1), grid=2).shape == (2, 3)  # grid capped by the map
    assert pool_features(torch.randn(2, 5), grid=2).shape == (2, 5)
    seq = torch.tensor([[[1.0], [3.0], [100.0]]])
    mask = torch.tensor([[True, True, False]])
    assert pool_features(Masked(seq, mask)).tolist() == [[2.0]]  # mean over real tokens only
    assert pool_features(seq.flatten(1)).tolist() == [[1.0, 3.0, 100.0]]  # plain: no padding
    with pytest.raises(ValueError, match="grid"):
        pool_features(torch.randn(2, 3, 4, 4), grid=0)


def test_effective_rank_closed_forms():
    d = 6
    iso = torch.cat([torch.eye(d), -torch.eye(d)])  # centred, all singular values equal
    assert effective_rank(iso) == pytest.approx(d)
    line = torch.randn(50, 1, dtype=torch.float64) * torch.randn(1, d, dtype=torch.float64)
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-6)
    two = torch.cat([torch.eye(2) * 3, -torch.eye(2) * 3, torch.zeros(2, 2)])
    assert effective_rank(torch.cat([two, torch.zeros(6, d - 2)], 1)) == pytest.approx(2.0)
    assert effective_rank(torch.ones(5, d)) == 0.0  # no variance at all


def test_probe_separates_separable_classes_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    centres = torch.randn(3, 10, generator=g) * 3
    x = centres[y] + torch.randn(300, 10, generator=g)
    assert probe_accuracy((x[:200], y[:200]), (x[200:], y[200:]), 3) > 95
    noise = torch.randn(300, 10, generator=g)
    assert probe_accuracy((noise[:200], y[:200]), (noise[200:], y[200:]), 3) < 60


def test_probe_net_reports_every_stage():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 8, 8), generator=g, dtype=torch.uint8)
    data = DataSplits("toy", ArrayData(x[:30], torch.arange(30) % 2, ["a", "b"]),
                      ArrayData(x[30:], torch.arange(10) % 2, ["a", "b"]),
                      {"mean": [0.5] * 3, "std": [0.25] * 3})
    net = LocalNet.from_backbone(build_model("vgg6a", (3, 8, 8), 2, width=0.0625), 2,
                                 objective="simclr")
    r = probe_net(net, data, grid=2, batch_size=16)
    assert len(r["probe_acc"]) == len(r["effective_rank"]) == 2
    assert r["feature_dim"] == [16 * 4, 32 * 1]  # (16, 2, 2) pooled to 2x2; (32, 1, 1) stays
    assert r["n_train"] == 30 and r["n_test"] == 10
    assert all(0 <= a <= 100 for a in r["probe_acc"])


def test_self_supervised_run_probes_itself_and_the_cli_probes_again(tiny_cfg, tmp_path, capsys):
    cfg = [c for c in tiny_cfg if not c.startswith(("data.train_subset", "data.test_subset",
                                                     "train.epochs", "split.k"))]
    assert main(["train", *cfg, "objective=simclr", "data.augment=basic", "data.train_subset=128",
                 "data.test_subset=64", "train.epochs=1", "split.k=2", "train.name=ssl"]) == 0
    run_dir = tmp_path / "ssl"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["probe_acc"]) == 2 and len(summary["effective_rank"]) == 2
    assert summary["stage_acc"] == [None, None]  # no classifier in a self-supervised net
    assert (run_dir / "probe.png").is_file()
    assert json.loads((run_dir / "probe.json").read_text())["n_train"] == 128
    capsys.readouterr()
    assert main(["probe", str(run_dir), "--test-subset", "32", "--grid", "1"]) == 0
    out = capsys.readouterr().out
    assert "probe acc %" in out and "32 test" in out
    assert json.loads((run_dir / "probe.json").read_text())["n_test"] == 32
    assert main(["probe", str(tmp_path / "missing")]) == 2  # a user error, not a traceback
