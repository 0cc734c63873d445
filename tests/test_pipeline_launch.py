"""The pipeline in real worker processes (gloo on CPU): launch, equivalence, torchrun, faults.

Each test starts two worker processes (importing torch takes a few seconds each), so
this file is slower than the in-process tests of ``test_pipeline.py``.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from locallearn import runs
from locallearn.cli import main
from locallearn.config import ConfigError, load_config
from locallearn.distributed.faults import PipelineError
from locallearn.train import run

torch.set_num_threads(1)

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = ["model=mlp", "model.options={hidden: [32, 32, 32, 32]}", "data.train_subset=256",
        "data.test_subset=64", "data.batch_size=32", "optim.lr=0.1", "train.progress=false",
        "engine.threads=1", "engine.timeout=30"]


def config(tmp_path: Path, name: str, *extra: str):
    return load_config(None, [*TINY, f"train.out_dir={tmp_path}", f"train.name={name}", *extra])


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = runs.load_checkpoint(a)["net"], runs.load_checkpoint(b)["net"]
    assert list(wa) == list(wb)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)


def test_spawned_pipeline_trains_like_the_sequential_engine(tmp_path, capsys):
    """K=3 stages on 2 workers with 2 micro-batches: the same weights as engine=local."""
    summary, pipe = run(config(tmp_path, "pipe", "split.k=3", "engine=pipeline",
                               "engine.workers=2", "engine.micro_batches=2", "train.epochs=1"))
    _, local = run(config(tmp_path, "local", "split.k=3", "engine=local", "train.epochs=1"))
    assert_same_weights(pipe, local)
    for f in ("config.yaml", "env.json", "metrics.jsonl", "summary.json", "curves.png",
              "ranks/rank0.pt", "ranks/rank1.pt"):
        assert (pipe / f).is_file(), f
    env = runs.read_metrics(pipe)[0]
    assert len(env["stage_seconds"]) == 3 and all(0 <= i <= 1 for i in env["stage_idle"])
    assert summary["threads_per_worker"] == [1, 1] and summary["epochs"] == 1
    capsys.readouterr()
    assert main(["eval", str(pipe)]) == 0  # the merged checkpoint needs no distributed set-up
    assert f"final {summary['final_acc']:.2f} %" in capsys.readouterr().out


def test_torchrun_launch_with_two_local_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "locallearn", "train", *TINY, f"train.out_dir={tmp_path}", "train.name=trun",
           "split.k=2", "engine=pipeline", "engine.workers=2", "train.epochs=1"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "run folder" in done.stdout
    _, local = run(config(tmp_path, "local", "split.k=2", "engine=local", "train.epochs=1"))
    assert_same_weights(tmp_path / "trun", local)


def test_a_killed_worker_stops_the_run_and_resume_finishes_it(tmp_path, monkeypatch):
    cfg = config(tmp_path, "fault", "split.k=2", "engine=pipeline", "engine.workers=2",
                 "train.epochs=2")
    monkeypatch.setenv("LOCALLEARN_FAULT", "1:11:exit")  # rank 1, step 4 of epoch 2
    start = time.monotonic()
    with pytest.raises(PipelineError, match="rank 1 .*exited with code 13") as err:
        run(cfg)
    assert time.monotonic() - start < 90
    folder = tmp_path / "fault"
    assert "checkpoint (epoch 1)" in str(err.value) and f"--resume {folder}" in str(err.value)
    assert runs.load_checkpoint(folder)["epoch"] == 1
    monkeypatch.delenv("LOCALLEARN_FAULT")
    summary, _ = run(cfg, resume=folder)
    assert summary["epochs"] == 2 and [r["epoch"] for r in runs.read_metrics(folder)] == [1, 2]
    _, local = run(config(tmp_path, "local", "split.k=2", "engine=local", "train.epochs=2"))
    assert_same_weights(folder, local)  # the resumed run continued exactly where it stopped


@pytest.mark.slow
def test_a_frozen_worker_is_named_after_the_timeout(tmp_path, monkeypatch):
    cfg = config(tmp_path, "frozen", "split.k=2", "engine=pipeline", "engine.workers=2",
                 "train.epochs=1", "engine.timeout=4")
    monkeypatch.setenv("LOCALLEARN_FAULT", "1:3:hang")  # rank 1 sleeps at step 3
    start = time.monotonic()
    with pytest.raises(PipelineError, match="rank 1 .*stopped answering"):
        run(cfg)
    assert time.monotonic() - start < 60  # timeout + the launcher's grace, not forever


GROUPED = ["model=vgg6a", "model.options={width: 0.125}", "split.k=2", "split.groups=2",
           "objective.head=0c1f", "objective.detach_ratio=0.5", "objective.diversity_weight=0.5"]


def test_group_placement_trains_k_x_g_nodes_like_the_sequential_engine(tmp_path, capsys):
    """K=2 x G=2 nodes on 4 worker processes: after one step the weights, losses and accuracies
    of engine=local; `eval` reads the merged checkpoint; resume cuts a lost node shard from it
    and goes on to the bit like the same run resumed with all its shards.

    Why one step (one batch of 32) against engine=local, and the resumed run against the nodes:
    a node computes its slice of the stage with other float kernels (a plain conv on its slice
    where the stage has a grouped conv), so after an update the two paths differ by rounding,
    1e-8 to 1e-6 of the weights, well within the tolerance. But a ReLU pre-activation closer to
    zero than that rounding has opposite signs in the two paths, and the gradient jumps:
    measured on 256 samples (8 steps, the subset drawn since 840d02a), one such flip at step 1
    moved stage-2 weights by 1.1e-4, and by 4e-2 at step 8 (over a thousand flips by then),
    while stage 1, without a flip, stayed within 7e-7. Whether a flip comes within N steps is
    chance (the subset drawn, the initialisation; the first 256 samples had none in 16 steps),
    so only the first step is compared: both paths start from the same weights, and only the
    rounding of one forward pass separates them. That is zero for plain NCHW batches; but a
    1-channel batch from `data.core.batches` has strides that convolutions take for
    channels-last (so engine=local runs channels-last kernels), while tensors sent between
    ranks arrive plain: up to 5e-6 of difference here, the pre-activation nearest to a flip
    7.8 times further away from zero. Node and stage updates over several steps are compared
    in-process, with a tolerance for the rounding (tests/test_group_pipeline.py).
    """
    one_step = [*GROUPED, "data.train_subset=32"]
    nodes = ["engine=pipeline", "engine.placement=groups", "engine.workers=4", "train.epochs=1"]
    summary, pipe = run(config(tmp_path, "nodes", *one_step, *nodes))
    _, local = run(config(tmp_path, "local", *one_step, "engine=local", "train.epochs=1"))
    assert_same_weights(pipe, local)
    got, want = runs.read_metrics(pipe)[-1], runs.read_metrics(local)[-1]
    assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)  # node shares add up
    for key in ("stage_acc", "group_acc", "ens_uniform", "ens_weighted"):
        assert got[key] == want[key], key
    assert summary["placement"] == "groups" and summary["workers"] == 4
    env = json.loads((pipe / "env.json").read_text())
    assert [(r["stages"], r["group"]) for r in env["ranks"]] == [([1], 1), ([1], 2), ([2], 1), ([2], 2)]
    capsys.readouterr()
    assert main(["eval", str(pipe)]) == 0
    assert f"final {summary['final_acc']:.2f} %" in capsys.readouterr().out
    kept = shutil.copytree(pipe, tmp_path / "kept")
    (pipe / "ranks" / "rank1.pt").unlink()  # a lost node shard: rank 0 cuts it from checkpoint.pt
    for folder in (pipe, kept):
        run(runs.resume_config(folder, ["train.epochs=2"])[0], resume=folder)
    cut, whole = runs.load_checkpoint(pipe), runs.load_checkpoint(kept)
    assert cut["epoch"] == whole["epoch"] == 2
    for name, t in whole["net"].items():  # the same kernels on the same data: equal to the bit
        assert torch.equal(cut["net"][name], t), name


@pytest.mark.parametrize("extra,message", [
    (["engine.workers=3"], "set engine.workers=4"),
    (["engine.workers=4", "context.name=E"], "does not support context.name"),
    (["engine.workers=4", "engine=local"], "set engine=pipeline"),
    (["engine.workers=2", "split.groups=1"], "split.groups=G with G >= 2"),
])
def test_group_placement_config_errors_name_the_fix(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, "bad", *GROUPED, "engine=pipeline", "engine.placement=groups", *extra)


def test_a_killed_node_worker_is_named_by_stage_and_group(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALLEARN_FAULT", "3:5:exit")  # rank 3 = stage 2, group 2
    cfg = config(tmp_path, "killed", *GROUPED, "engine=pipeline", "engine.placement=groups",
                 "engine.workers=4", "train.epochs=1")
    with pytest.raises(PipelineError, match=r"rank 3 \(stage 2, group 2\) failed: exited with code 13"):
        run(cfg)


def test_a_model_that_cannot_be_grouped_is_one_error_line_not_a_traceback_per_worker(tmp_path, capfd):
    cfg = config(tmp_path, "mlp", "split.k=2", "split.groups=2", "engine=pipeline",
                 "engine.placement=groups", "engine.workers=4", "train.epochs=1")
    # every rank fails alike; the launcher names the one that ended first
    with pytest.raises(PipelineError, match=r"rank \d \(stage \d, group \d\) failed: GroupError: "
                                            r".*cannot be split into width groups"):
        run(cfg)
    assert "Traceback" not in capfd.readouterr().err


def test_torchrun_launch_of_group_nodes(tmp_path):
    """K=2 x G=2 nodes as 4 torchrun processes: after one step the weights of engine=local
    (why one step: see test_group_placement_trains_k_x_g_nodes_like_the_sequential_engine)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           "-m", "locallearn", "train", *TINY, *GROUPED, "data.train_subset=32",
           f"train.out_dir={tmp_path}", "train.name=trun", "engine=pipeline",
           "engine.placement=groups", "engine.workers=4", "train.epochs=1"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    _, local = run(config(tmp_path, "local", *GROUPED, "data.train_subset=32", "engine=local",
                          "train.epochs=1"))
    assert_same_weights(tmp_path / "trun", local)
