"""Run folders: one owner at a time, swept temp files, readable files, resume semantics,
torn metrics lines and the curves plot; the ownership cases with real processes."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from locallearn import runs
from locallearn.cli import main
from locallearn.config import load_config
from locallearn.errors import ConfigError, RunError, UserError

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "the child process did not get there in time"
        time.sleep(0.05)


HOLD = """
import sys, time
from pathlib import Path
from locallearn import runs
with runs.claim(sys.argv[1]):
    Path(sys.argv[1], "metrics.jsonl").write_text('{"epoch": 1}\\n')
    Path(sys.argv[2]).write_text("claimed")
    time.sleep(120)
"""


def test_a_second_process_cannot_claim_a_run_folder_and_is_told_the_holders_pid(tmp_path):
    run_dir, ready = tmp_path / "run", tmp_path / "ready"
    holder = _python(HOLD, str(run_dir), str(ready))
    try:
        _wait_for(ready, holder)
        with pytest.raises(RunError, match=f"in use by pid {holder.pid} on"):
            with runs.claim(run_dir):
                pass
        # the kernel drops the lock of a killed owner: no stale lock to clean by hand
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        with runs.claim(run_dir) as owned:
            assert (owned / runs.LOCK).read_text().startswith(f"pid {os.getpid()} on ")
    finally:
        holder.kill()
        holder.wait(30)
    assert not (run_dir / runs.LOCK).exists()
    assert (run_dir / "metrics.jsonl").is_file()  # a folder with a finished epoch is kept


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
import torch
from locallearn import runs

def half_write_then_die(obj, f):
    Path(f).write_bytes(b"x" * 100_000)
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = half_write_then_die
runs.save_checkpoint(Path(sys.argv[1]) / runs.CHECKPOINT, {"net": {}, "config": {}})
"""


def test_claim_sweeps_the_temp_files_of_a_writer_that_was_killed(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    writer = _python(KILLED_WRITER, str(run_dir))
    writer.wait(120)
    assert writer.returncode == -signal.SIGKILL
    (left,) = run_dir.glob(".checkpoint.pt.*")
    assert left.stat().st_size == 100_000
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with runs.claim(run_dir):
        assert list(run_dir.glob(".checkpoint.pt.*")) == []


FAIL_AT_START = """
import sys
from pathlib import Path
from locallearn import runs
with runs.claim(sys.argv[1]):
    Path(sys.argv[1], "config.yaml").write_text("model: {}\\n")
    raise RuntimeError("the data could not be read")
"""


def test_a_run_that_fails_before_its_first_epoch_leaves_no_folder(tmp_path):
    run_dir = tmp_path / "run"
    proc = _python(FAIL_AT_START, str(run_dir))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "the data could not be read" in err
    assert not run_dir.exists()


def test_a_run_that_fails_after_an_epoch_keeps_its_folder(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), runs.claim(run_dir):
        runs.append_metrics(run_dir, {"epoch": 1, "train_loss": [1.0]})
        raise KeyboardInterrupt
    assert runs.read_metrics(run_dir) == [{"epoch": 1, "train_loss": [1.0]}]


def test_run_folder_files_are_world_readable(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "_umask", lambda: 0o022)  # as on most machines
    runs.write_json(tmp_path / "summary.json", {"a": 1})
    runs.save_config(tmp_path, load_config(None, []))
    runs.save_checkpoint(tmp_path / runs.CHECKPOINT, {"net": {}, "config": {}})
    for name in ("summary.json", "config.yaml", runs.CHECKPOINT):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_the_umask_is_read_without_changing_it():
    mask = os.umask(0o027)
    try:
        assert runs._umask() == 0o027 and os.umask(0o027) == 0o027
    finally:
        os.umask(mask)


def test_the_saved_data_dir_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs.save_config(tmp_path, load_config(None, ["data.data_dir=some/data"]))
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["data_dir"]
    assert saved == str(tmp_path / "some" / "data")


def _saved_run(tmp_path: Path, *overrides: str) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    runs.save_config(run_dir, load_config(None, ["train.epochs=10", "split.k=2", *overrides]))
    return run_dir


def test_resume_config_keeps_the_saved_config_and_changes_only_what_is_named(tmp_path):
    run_dir = _saved_run(tmp_path)
    cfg, changes = runs.resume_config(run_dir, [])
    assert cfg.train.epochs == 10 and cfg.split.k == 2 and changes == []
    cfg, changes = runs.resume_config(run_dir, ["train.epochs=20"])
    assert cfg.train.epochs == 20 and cfg.split.k == 2
    assert changes == ["train.epochs: 10 -> 20"]
    with pytest.raises(ConfigError, match="train.epochz"):
        runs.resume_config(run_dir, ["train.epochz=20"])


def test_resume_config_names_a_folder_without_a_config(tmp_path):
    with pytest.raises(RunError, match=f"{tmp_path} is not a run folder"):
        runs.resume_config(tmp_path, [])


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_naming_the_file(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3, "tra')
    assert [r["epoch"] for r in runs.read_metrics(tmp_path)] == [1, 2]
    assert "metrics.jsonl" in caplog.text and "torn" in caplog.text
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
    with pytest.raises(RunError, match=r"metrics.jsonl line 2 is not valid JSON"):
        runs.read_metrics(tmp_path)


def _metrics(run_dir: Path, epochs: int) -> None:
    for e in range(1, epochs + 1):
        runs.append_metrics(run_dir, {"epoch": e, "train_loss": [2.0 / e, 1.0 / e],
                                      "stage_acc": [10.0 * e, 20.0 * e]})


def test_curves_are_drawn_at_most_every_few_seconds_and_always_at_the_last_epoch(tmp_path):
    run_dir = _saved_run(tmp_path)  # configured for 10 epochs
    _metrics(run_dir, 1)
    assert runs.plot_curves(run_dir, every=3600) is None  # epoch 1 of 10: not yet
    _metrics(run_dir, 1)
    assert runs.plot_curves(run_dir, every=3600, final=True) == run_dir / "curves.png"
    assert runs.plot_curves(run_dir, every=0.0) == run_dir / "curves.png"
    (run_dir / "metrics.jsonl").unlink()
    _metrics(run_dir, 10)
    (run_dir / "curves.png").unlink()
    assert runs.plot_curves(run_dir, every=3600) == run_dir / "curves.png"  # the last epoch


def test_curves_name_the_run_use_integer_epochs_and_log_losses(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    run_dir = _saved_run(tmp_path)
    _metrics(run_dir, 3)
    seen = {}
    monkeypatch.setattr(plt, "close", lambda fig: seen.setdefault("fig", fig))
    runs.plot_curves(run_dir, final=True)
    fig = seen["fig"]
    ax_acc, ax_loss = fig.axes
    assert fig._suptitle.get_text() == "run"
    assert ax_loss.get_yscale() == "log"
    ticks = [t for t in ax_loss.get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_compare_skips_folders_of_unfinished_runs_with_a_note(tmp_path, capsys):
    done = tmp_path / "done"
    done.mkdir()
    runs.write_json(done / "summary.json", {"name": "done", "engine": "local", "k": 2})
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(done), str(tmp_path / "empty")]) == 0
    captured = capsys.readouterr()
    assert "done" in captured.out and f"skipping {tmp_path / 'empty'}" in captured.err
    assert main(["compare", str(tmp_path / "empty")]) == 2


def test_every_user_error_type_is_a_user_error():
    from locallearn.config import ConfigError as C
    from locallearn.data import DataError

    assert all(issubclass(t, UserError) for t in (C, DataError, runs.RunError))
    assert issubclass(C, ValueError)  # existing `except ValueError` keeps working


CRASH_IN_EPOCH_2 = """
import os, sys
from locallearn.cli import main
from locallearn.train import Trainer

Trainer = Trainer.__mro__[-2]  # the class of the loop itself (below any launcher's subclass)
original = Trainer.train_epoch

def die_in_epoch_2(self):
    if self.epoch == 1:
        os._exit(9)  # killed: no handler runs
    return original(self)

Trainer.train_epoch = die_in_epoch_2
main(["train", *sys.argv[1:]])
"""


def test_resume_without_epochs_continues_to_the_configured_epochs(tiny_cfg, tmp_path):
    crashed = _python(CRASH_IN_EPOCH_2, *tiny_cfg, "train.epochs=4", "train.name=r")
    crashed.communicate(timeout=300)
    assert crashed.returncode == 9
    run_dir = tmp_path / "r"
    assert [r["epoch"] for r in runs.read_metrics(run_dir)] == [1]
    resumed = _python("from locallearn.cli import main; import sys; sys.exit(main(sys.argv[1:]))",
                      "train", "--resume", str(run_dir))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert [r["epoch"] for r in runs.read_metrics(run_dir)] == [1, 2, 3, 4]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"] == 4
    assert main(["train", "--resume", str(run_dir), "train.epochs=5"]) == 0
    assert [r["epoch"] for r in runs.read_metrics(run_dir)] == [1, 2, 3, 4, 5]
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 5


def test_a_train_command_that_fails_at_start_leaves_no_run_folder(tiny_cfg, tmp_path):
    proc = _python("from locallearn.cli import main; import sys; sys.exit(main(sys.argv[1:]))",
                   "train", *tiny_cfg, "data=cifar10", f"data.data_dir={tmp_path / 'none'}")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "cifar10 not found" in err, err
    assert [p.name for p in tmp_path.iterdir()] == []
