"""Ctrl-C on a real run (the whole process group, as a terminal sends it): one line that
says it stopped, what was saved and the resume command, no traceback; and the resumed
run goes on to the configured epochs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from locallearn import runs

ARGS = ["model=mlp", "model.options={hidden: [16, 16]}", "split.k=2", "data.batch_size=32",
        "data.train_subset=256", "data.test_subset=64", "train.progress=false",
        "engine.threads=1"]


def start(tmp_path: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "locallearn", "train", *ARGS, f"train.out_dir={tmp_path}",
           "train.name=run", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=_interruptible)


def _interruptible() -> None:
    """A user's terminal delivers Ctrl-C; a CI job started in the background inherits SIGINT
    ignored, which Python would keep: restore the default so the child sees it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_after_first_epoch(proc: subprocess.Popen, run_dir: Path) -> str:
    deadline = time.monotonic() + 120
    while not runs.read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.1)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return err


@pytest.mark.parametrize("engine", [["engine=local"], ["engine=pipeline", "engine.workers=2"]])
def test_ctrl_c_says_what_was_saved_and_how_to_resume_without_a_traceback(tmp_path, engine):
    proc = start(tmp_path, "train.epochs=200", *engine)
    err = interrupt_after_first_epoch(proc, tmp_path / "run")
    assert proc.returncode != 0
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "stopped by the user" in err and f"--resume {tmp_path / 'run'}" in err, err
    done = len(runs.read_metrics(tmp_path / "run"))
    assert done >= 1 and runs.load_checkpoint(tmp_path / "run")["epoch"] == done
    assert not list((tmp_path / "run").glob(".checkpoint.pt.*"))  # no half-written file kept


def test_sigterm_to_the_pipeline_launcher_stops_its_workers_and_says_so(tmp_path):
    """A scheduler's SIGTERM goes to the launcher alone: the elastic agent stops the
    workers, and the launcher says in one line what happened and how to resume."""
    proc = start(tmp_path, "train.epochs=200", "engine=pipeline", "engine.workers=2")
    run_dir = tmp_path / "run"
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() or not runs.read_metrics(run_dir):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "got signal SIGTERM" in err and f"--resume {run_dir}" in err, err
    assert "Traceback" not in err, err
    deadline = time.monotonic() + 10
    while True:  # every worker of the launcher's session is gone
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "a worker outlived the launcher"
        time.sleep(0.1)
