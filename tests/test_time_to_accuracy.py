"""The time-to-accuracy benchmark's reading of run folders: the first epoch at a threshold, its
training seconds (evaluation excluded), and a threshold never reached within the cap."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "time_to_accuracy" / "run.py"
spec = importlib.util.spec_from_file_location("time_to_accuracy_run", PATH)
tta = importlib.util.module_from_spec(spec)
sys.modules["time_to_accuracy_run"] = tta
spec.loader.exec_module(tta)


def rows(accs, seconds=10.0):
    return [{"epoch": e + 1, "epoch_seconds": seconds, "samples_per_s": 100.0, "final_acc": a}
            for e, a in enumerate(accs)]


def finished_run(runs: Path, run, accs, seconds=10.0) -> Path:
    folder = run.folder(runs)
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in rows(accs, seconds)))
    (folder / "summary.json").write_text(json.dumps({"epochs": len(accs), "final_acc": accs[-1]}))
    return folder


def test_the_time_to_a_threshold_is_the_training_seconds_up_to_the_first_epoch_reaching_it():
    curve = rows([50.0, 79.9, 80.0, 70.0, 86.0])
    assert tta.time_to(curve, 80.0) == (30.0, 3)     # the first epoch at 80, not a later one
    assert tta.time_to(curve, 85.0) == (50.0, 5)
    assert tta.time_to(curve, 90.0) is None          # never reached within the cap
    assert tta.time_to([{"epoch": 1, "epoch_seconds": 5.0}], 0.0) is None  # not evaluated


def test_a_resumed_run_counts_each_epoch_once_the_last_row_written_winning(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        *rows([10.0, 20.0]), {"epoch": 2, "epoch_seconds": 12.0, "final_acc": 25.0}, "{half"]))
    got = tta.epoch_rows(tmp_path)
    assert [r["epoch"] for r in got] == [1, 2] and got[1]["epoch_seconds"] == 12.0


def test_the_report_gives_seconds_where_reached_and_not_reached_within_the_cap(tmp_path):
    protocol = tta.SMOKE  # thresholds 12 and 20 %, 2 epochs
    plan = tta.rp.matrix(protocol)
    finished_run(tmp_path, plan[0], [11.0, 15.0])   # bp seed 0: 12 % at epoch 2, never 20 %
    finished_run(tmp_path, plan[4], [13.0, 14.0])   # bp seed 1: 12 % at epoch 1
    text = tta.report(protocol, tmp_path, tmp_path)
    bp = next(line for line in text.splitlines() if line.startswith("| bp |"))
    assert "| 15 ± 7 | 1.5 ± 0.7 | not reached | - |" in bp   # (20 s, 10 s); epochs 2, 1
    assert "Not finished yet" in text and "resnet20-ddp-k1-s0 (left, 0/2 epochs)" in text
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["summary"][0]["to_20"]["reached"] == 0
    assert data["runs"][0]["curve"] == [[10.0, 11.0], [20.0, 15.0]]
    assert (tmp_path / "tta.png").is_file()


def test_bp_over_a_configuration_is_paired_seed_by_seed_so_a_slower_sitting_cancels_out(tmp_path):
    protocol = tta.SMOKE  # plan: bp, ddp, local, pipeline of seed 0, then of seed 1
    plan = tta.rp.matrix(protocol)
    for run, accs, seconds in [(plan[0], [15.0, 21.0], 10.0), (plan[1], [15.0, 21.0], 5.0),
                               (plan[4], [15.0, 21.0], 30.0), (plan[5], [15.0, 21.0], 10.0)]:
        finished_run(tmp_path, run, accs, seconds)
    # seed 1 sat on a 3x slower machine: ddp 2x and 3x faster than BP of its own seed, so
    # 2.50 ± 0.71 paired; the ratio of the means would say (20 + 60) / (10 + 20) = 2.67
    text = tta.report(protocol, tmp_path, tmp_path)
    ddp = next(line for line in text.splitlines() if line.startswith("| ddp |"))
    assert "| 2.50 ± 0.71 | 2.50 ± 0.71 |" in ddp
    bp = next(line for line in text.splitlines() if line.startswith("| bp |"))
    assert "| 1.00 ± 0.00 | 1.00 ± 0.00 |" in bp
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["summary"][1]["to_12"]["bp_over_this"] == [2.0, 3.0]
