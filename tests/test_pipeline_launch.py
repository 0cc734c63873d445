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
    assert time.monotonic() - start < 60  # engine.timeout + the agent's stop, not forever


GROUPED = ["model=vgg6a", "model.options={width: 0.125}", "split.k=2", "split.groups=2",
           "objective.head=0c1f", "objective.detach_ratio=0.5", "objective.diversity_weight=0.5"]


def test_group_placement_trains_k_x_g_nodes_like_the_sequential_engine(tmp_path, capsys):
    """K=2 x G=2 nodes on 4 worker processes: the weights, losses and accuracies of
    engine=local after an epoch (8 steps); `eval` reads the merged checkpoint; resume cuts a
    lost node shard from it and goes on, to the bit, like the same run resumed with all its
    shards (against engine=local a second epoch would be a coin toss: see below).

    The paths agree to float rounding only while every ReLU pre-activation is farther from
    zero than that rounding (one flip moves the weights by 1e-4 and grows); batches have
    plain NCHW strides (`data.core.standard_strides`), so ranks that receive tensors over
    the wire run the very kernels of engine=local and the rounding stays at 1e-8 for this
    epoch; over 16 steps a flip happened (measured), so longer runs are compared to the bit
    with themselves.
    """
    nodes = ["engine=pipeline", "engine.placement=groups", "engine.workers=4", "train.epochs=1"]
    summary, pipe = run(config(tmp_path, "nodes", *GROUPED, *nodes))
    _, local = run(config(tmp_path, "local", *GROUPED, "engine=local", "train.epochs=1"))
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
    """K=2 x G=2 nodes as 4 torchrun processes: the weights of engine=local."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           "-m", "locallearn", "train", *TINY, *GROUPED, f"train.out_dir={tmp_path}", "train.name=trun", "engine=pipeline",
           "engine.placement=groups", "engine.workers=4", "train.epochs=1"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    _, local = run(config(tmp_path, "local", *GROUPED, "engine=local", "train.epochs=1"))
    assert_same_weights(tmp_path / "trun", local)


def test_group_nodes_take_micro_batches_and_layer_accumulation_like_the_stage_pipeline(tmp_path):
    """The group placement is a placement of the one pipeline executor: micro-batches (cut
    on rank 0, handed to its sibling, every part through every node) and a growing net
    (stage 2 joins after epoch 1) give the stage pipeline's and engine=local's weights."""
    step = [*GROUPED, "data.train_subset=32"]  # one step per epoch (see the test above)
    micro = ["engine=pipeline", "engine.micro_batches=2", "train.epochs=1"]
    _, nodes = run(config(tmp_path, "micro-nodes", *step, *micro, "engine.placement=groups",
                          "engine.workers=4"))
    _, stages = run(config(tmp_path, "micro-stages", *step, *micro, "engine.workers=2"))
    assert_same_weights(nodes, stages)
    grow = ["train.accumulate=grow", "train.triggers=[1]", "train.epochs=2"]
    _, nodes = run(config(tmp_path, "grow-nodes", *step, *grow, "engine=pipeline",
                          "engine.placement=groups", "engine.workers=4"))
    _, local = run(config(tmp_path, "grow-local", *step, *grow, "engine=local"))
    assert_same_weights(nodes, local)
    assert [r["stages_trained"] for r in runs.read_metrics(nodes)] == [[1], [1, 2]]


REPLICATED = ["split.k=2", "model.options={hidden: [32, 32, 32, 32], batch_norm: false}",
              "engine=pipeline", "engine.workers=2"]


def test_data_parallel_stages_equal_one_copy_with_the_same_global_batch(tmp_path, monkeypatch):
    """engine.replicas=2: every worker is 2 ranks, each on half of every batch, gradients
    averaged within the stage before each step: for a model without batch statistics the
    weights of the run with one copy (and of engine=local), also with micro-batches and
    after a killed replica's run is resumed; one checkpoint shard per stage."""
    two = config(tmp_path, "two", *REPLICATED, "engine.replicas=2", "engine.micro_batches=2",
                 "train.epochs=2")
    monkeypatch.setenv("LOCALLEARN_FAULT", "3:11:exit")  # rank 3: worker 2's copy, epoch 2
    with pytest.raises(PipelineError, match=r"rank 3 \(stage 2, replica 2\)"):
        run(two)
    monkeypatch.delenv("LOCALLEARN_FAULT")
    folder = tmp_path / "two"
    assert sorted(p.name for p in (folder / "ranks").iterdir()) == ["rank0.pt", "rank1.pt"]
    summary, _ = run(runs.resume_config(folder, [])[0], resume=folder)
    assert summary["workers"] == 4 and summary["epochs"] == 2
    _, one = run(config(tmp_path, "one", *REPLICATED, "train.epochs=2"))
    _, local = run(config(tmp_path, "local", *REPLICATED, "engine=local", "train.epochs=2"))
    assert_same_weights(folder, one)
    assert_same_weights(folder, local)
    got, want = runs.read_metrics(folder)[-1], runs.read_metrics(one)[-1]
    assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)  # shares add up
    assert got["final_acc"] == want["final_acc"]


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_finishes_by_itself(tmp_path, monkeypatch):
    """engine.max_restarts=1: torch's elastic agent restarts the workers after rank 1 dies,
    they continue from the last checkpoint, and the weights are those of a run that was
    never interrupted. (Slow: about 100 s here, most of it the agent stopping the group.)"""
    cfg = config(tmp_path, "restarted", "split.k=2", "engine=pipeline", "engine.workers=2",
                 "engine.max_restarts=1", "train.epochs=2")
    monkeypatch.setenv("LOCALLEARN_FAULT", "1:11:exit")  # rank 1, step 4 of epoch 2
    summary, folder = run(cfg)
    assert summary["epochs"] == 2 and [r["epoch"] for r in runs.read_metrics(folder)] == [1, 2]
    monkeypatch.delenv("LOCALLEARN_FAULT")
    _, whole = run(config(tmp_path, "whole", "split.k=2", "engine=pipeline", "engine.workers=2",
                          "train.epochs=2"))
    assert_same_weights(folder, whole)
