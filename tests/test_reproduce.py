"""The reproduce driver's pure logic on fake run folders: matrix, states, times, results, tables."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce" / "run.py"
spec = importlib.util.spec_from_file_location("reproduce_run", PATH)
rp = importlib.util.module_from_spec(spec)
sys.modules["reproduce_run"] = rp
spec.loader.exec_module(rp)


def fake_run(runs: Path, run, epochs: int, finished: bool, acc: float = 50.0,
             seconds: float = 10.0, checkpoint: bool = True) -> Path:
    folder = run.folder(runs)
    folder.mkdir(parents=True)
    rows = [{"epoch": e + 1, "epoch_seconds": seconds, "final_acc": acc - (epochs - 1 - e)}
            for e in range(epochs)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if checkpoint:
        (folder / "checkpoint.pt").write_bytes(b"")
    if finished:
        (folder / "summary.json").write_text(json.dumps(
            {"epochs": epochs, "final_acc": acc, "train_seconds": seconds * epochs,
             "saved_bytes_peak": 2**20}))
    return folder


def sleeper(name: str) -> subprocess.Popen:
    """A process whose command line names ``name``, as a training run's does (once exec'd)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", name])
    for _ in range(500):
        if rp._alive(proc.pid, name):
            break
        time.sleep(0.01)
    return proc


def test_the_cpu_matrix_is_bp_and_five_methods_at_k4_and_k8_over_two_seeds():
    runs = rp.matrix(rp.PROTOCOLS["cpu"])
    assert len(runs) == 22
    assert {(r.method, r.k) for r in runs if r.method != "bp"} == {
        (m, k) for m in ("dgl", "infopro", "contsup", "auglocal", "man") for k in (4, 8)}
    assert [r.key for r in runs[:2]] == ["bp/1/0", "dgl/4/0"]  # seed-major


def test_the_full_matrix_has_nine_methods_four_ks_two_models_five_seeds():
    assert len(rp.matrix(rp.PROTOCOLS["full"])) == 2 * (1 + 8 * 4) * 5


def test_only_selects_by_method_k_seed_with_wildcards_and_models():
    cpu = rp.PROTOCOLS["cpu"]
    assert [r.key for r in rp.matrix(cpu, ["dgl/*/0"])] == ["dgl/4/0", "dgl/8/0"]
    assert len(rp.matrix(cpu, ["resnet32/man/8/*"])) == 2
    with pytest.raises(SystemExit, match="METHOD/K/SEED"):
        rp._filter(["dgl"])


def test_bp_is_one_stage_and_local_methods_use_memory_balanced_cuts():
    assert "split.k=1" in rp.method_overrides("bp", 8)
    assert rp.method_overrides("dgl", 8)[-2:] == ["split.k=8", "split.by=memory"]


def test_states_tell_done_running_interrupted_stale_and_left(tmp_path):
    p = rp.PROTOCOLS["cpu"]
    done, inter, stale, running, left = rp.matrix(p)[:5]
    fake_run(tmp_path, done, p.epochs, finished=True)
    fake_run(tmp_path, inter, 3, finished=False)
    fake_run(tmp_path, stale, 0, finished=False, checkpoint=False)
    folder = fake_run(tmp_path, running, 2, finished=False)
    proc = sleeper(running.name)
    try:
        folder.with_name(folder.name + ".pid").write_text(f"{proc.pid}\n")
        states = [rp.state(r, tmp_path) for r in (done, inter, stale, running, left)]
    finally:
        proc.kill()
        proc.wait()
    assert states == ["done", "interrupted", "stale", "running", "left"]
    assert rp.state(running, tmp_path) == "interrupted"  # its process is gone


def test_a_finished_run_with_fewer_than_the_planned_epochs_is_resumed_to_them(tmp_path):
    p = rp.PROTOCOLS["cpu"]
    run = rp.matrix(p)[0]
    fake_run(tmp_path, run, p.epochs - 2, finished=True)
    assert rp.state(run, tmp_path) == "interrupted"
    cmd = rp.command(run, tmp_path)
    assert cmd[cmd.index("--resume") + 1] == str(run.folder(tmp_path))
    assert f"train.epochs={p.epochs}" in cmd


def test_the_library_lock_marks_a_run_running(tmp_path):
    run = rp.matrix(rp.PROTOCOLS["cpu"])[0]
    folder = fake_run(tmp_path, run, 1, finished=False)
    proc = sleeper(run.name)
    try:
        (folder / ".lock").write_text(f"pid {proc.pid} on host\n")
        assert rp.pid_alive(folder) == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_status_sums_spent_time_and_estimates_what_is_left_from_finished_runs(tmp_path):
    p = rp.PROTOCOLS["cpu"]
    plan = rp.matrix(p, ["dgl/4/*"])
    fake_run(tmp_path, plan[0], p.epochs, finished=True, seconds=30.0)
    s = rp.status(p, ["dgl/4/*"], tmp_path, jobs=2)
    assert s["counts"]["done"] == 1 and s["counts"]["left"] == 1
    assert s["spent_seconds"] == pytest.approx(30.0 * p.epochs)
    assert s["needed_seconds"] == pytest.approx(30.0 * p.epochs)  # the same cell, seed 1
    assert s["needed_wall_seconds"] == pytest.approx(15.0 * p.epochs)


def test_results_rows_and_the_table_give_mean_std_gaps_and_published_accuracy(tmp_path):
    p = rp.PROTOCOLS["cpu"]
    by_key = {r.key: r for r in rp.matrix(p)}
    for key, acc in {"bp/1/0": 90.0, "bp/1/1": 92.0, "dgl/4/0": 86.0, "dgl/4/1": 88.0}.items():
        fake_run(tmp_path, by_key[key], p.epochs, finished=True, acc=acc)
    fake_run(tmp_path, by_key["dgl/8/0"], 3, finished=False)  # unfinished: no row
    rows = rp.collect(tmp_path, ["cpu"])
    assert [(r["method"], r["k"], r["seed"]) for r in rows] == [
        ("bp", 1, 0), ("dgl", 4, 0), ("bp", 1, 1), ("dgl", 4, 1)]
    assert set(rows[0]) == {"protocol", "model", "width", "epochs", "method", "k", "seed",
                            "final_acc", "best_acc", "train_seconds", "saved_bytes_peak"}
    assert rows[0]["best_acc"] == 90.0 and rows[0]["width"] == p.width
    text = rp.markdown(rows)
    dgl = next(line for line in text.splitlines() if line.startswith("| dgl | 4 |"))
    # mean 87 ± 1.41, gap -4.00 to BP's 91; InfoPro T2: 100 - 11.48, gap -4.11 to 92.63
    assert "87.00 ± 1.41" in dgl and "-4.00" in dgl and "88.52" in dgl and "-4.11" in dgl


def test_report_writes_json_markdown_and_a_plot(tmp_path):
    p = rp.PROTOCOLS["cpu"]
    for r in rp.matrix(p, ["bp/1/0", "dgl/*/0"]):
        fake_run(tmp_path / "runs", r, p.epochs, finished=True)
    rp.report(tmp_path / "runs", tmp_path, ["cpu"])
    assert len(json.loads((tmp_path / "results.json").read_text())) == 3
    assert (tmp_path / rp.plot_name("cpu", "resnet32")).is_file()
    assert "| dgl | 8 | 1 |" in (tmp_path / "results.md").read_text()


def test_a_method_the_library_does_not_register_is_refused_naming_it(monkeypatch):
    monkeypatch.setitem(rp.METHODS, "nosuch", ("engine=local", "objective=nosuch"))
    with pytest.raises(SystemExit, match="'nosuch'.*objective 'nosuch'"):
        rp.check_method("nosuch")
    monkeypatch.setitem(rp.METHODS, "badkey", ("engine=local", "objective.no_such_key=1"))
    with pytest.raises(SystemExit, match="'badkey' is not available"):
        rp.check_method("badkey")
    rp.check_method("dgl")


@pytest.mark.parametrize("method", sorted(rp.PRESETS))
def test_a_method_has_the_objective_section_of_the_preset_it_follows(method):
    from locallearn.config import load_config

    preset = Path(rp.ROOT) / "configs" / f"{rp.PRESETS[method]}.yaml"
    if not preset.is_file():
        pytest.skip(f"{preset.name} is not in this checkout")
    ours = load_config(None, ["model=resnet32", *rp.method_overrides(method, 4)])
    assert ours.objective == load_config(preset).objective
    assert ours.engine.name == load_config(preset).engine.name


@pytest.mark.slow
@pytest.mark.parametrize("model,k", [("resnet32", 2), ("resnet110", 16)])
@pytest.mark.parametrize("method", list(rp.METHODS))
def test_every_method_of_the_matrix_trains_a_tiny_epoch(method, model, k, tmp_path):
    import locallearn as ll

    cfg = ll.load_config(None, [
        f"model={model}", "model.options={width: 0.25}", *rp.method_overrides(method, k),
        "data=synthetic", "data.options={shape: [3, 32, 32], n_train: 64, n_test: 32}",
        "data.batch_size=32", "data.augment=basic", "train.epochs=1", "train.progress=false",
        "train.checkpoint=false", f"train.out_dir={tmp_path}"])
    run = ll.run if callable(ll.run) else ll.run.run  # the function, while locallearn.run moves
    summary, _ = run(cfg)
    assert summary["final_acc"] is not None and summary["k"] == (1 if method == "bp" else k)


FAKE_TRAIN = """
import json, sys, pathlib
folder, epochs, fail = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
if fail:
    sys.exit(3)
folder.mkdir(parents=True, exist_ok=True)
(folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "epoch_seconds": 1.0}) + "\\n")
(folder / "summary.json").write_text(json.dumps({"epochs": epochs, "final_acc": 50.0}))
"""


def test_advance_runs_what_is_left_jobs_at_a_time_and_counts_failures(tmp_path, monkeypatch):
    p = rp.PROTOCOLS["smoke"]
    plan = rp.matrix(p)
    monkeypatch.setattr(rp, "command", lambda run, runs, threads, device: [
        sys.executable, "-c", FAKE_TRAIN, str(run.folder(runs)), str(p.epochs),
        "1" if run.method == "dgl" else "0"])
    assert rp.advance(plan, tmp_path, jobs=2, threads=1, device="") == 1
    assert [rp.state(r, tmp_path) for r in plan] == ["done", "left"]
    assert not list((tmp_path / p.name).glob("*.pid"))
    assert (tmp_path / p.name / f"{plan[1].name}.log").is_file()


def test_a_protocol_without_width_or_with_its_own_optimizer_and_methods():
    p = rp.Protocol("t", "test", ("lstm",), width=None, epochs=3, batch=64, lr=1e-3,
                    cells=(("bp", 1), ("scpl", 4)), seeds=(0,), data=("data=sst2",),
                    optim=("optim=adam",), methods={**rp.METHODS, "scpl": ("objective=supcon",)},
                    split_by="count")
    run = rp.matrix(p)[1]
    overrides = run.overrides()
    assert not any(o.startswith("model.options") for o in overrides)
    assert "optim=adam" in overrides and "optim.lr=0.001" in overrides
    assert "optim=sgd" not in overrides
    assert overrides[overrides.index("objective=supcon") + 1:][:2] == ["split.k=4", "split.by=count"]
