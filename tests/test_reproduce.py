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


def test_advance_skips_a_run_that_another_driver_started_after_it_planned(tmp_path, monkeypatch):
    p = rp.PROTOCOLS["smoke"]
    plan = rp.matrix(p)
    started: list[str] = []
    other = sleeper(plan[1].name)  # the second driver's process for plan[1]

    def command(run, runs, threads, device):
        started.append(run.name)  # plan[0] trains; meanwhile another driver takes plan[1]
        folder = plan[1].folder(runs)
        folder.mkdir(parents=True, exist_ok=True)
        folder.with_name(folder.name + ".pid").write_text(f"{other.pid}\n")
        return [sys.executable, "-c", FAKE_TRAIN, str(run.folder(runs)), str(p.epochs), "0"]

    monkeypatch.setattr(rp, "command", command)
    try:
        assert rp.advance(plan, tmp_path, jobs=1, threads=1, device="") == 0
        assert rp.state(plan[1], tmp_path) == "running"
    finally:
        other.kill()
        other.wait()
    assert started == [plan[0].name]
    assert (tmp_path / p.name / f"{plan[1].name}.pid").read_text() == f"{other.pid}\n"


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


# -- the seeds' claims (issue 17) --------------------------------------------------------------
def seeds(name: str):
    return rp.PROTOCOLS[f"seeds-{name}"]


def fake_claim_run(runs: Path, run, acc: float = 50.0, **summary) -> Path:
    """A finished run of a claim protocol with extra summary fields (stage_acc, probes, ...)."""
    folder = fake_run(runs, run, run.protocol.epochs, finished=True, acc=acc)
    data = json.loads((folder / "summary.json").read_text())
    (folder / "summary.json").write_text(json.dumps({**data, **summary}))
    return folder


def test_seeds_runs_every_claim_each_with_its_baseline_beside_it_at_two_seeds():
    group = rp.GROUPS["seeds"]
    assert {rp.PROTOCOLS[n].claim for n in group} == {
        "scpl-vision", "scpl-text", "dascpl", "groups", "contsup", "selfsup"}
    for name in group:
        p = rp.PROTOCOLS[name]
        assert p.seeds == (0, 1) and p.baseline in {m for m, _ in p.cells}, name
        assert set(p.methods) >= {m for m, _ in p.cells}
    assert rp.GROUPS["seeds-cpu"] == tuple(n for n in group if n != "seeds-scpl-imdb")


def test_the_seeds_matrices_expand_to_the_issues_cells():
    cells = lambda p: {(r.model, r.method, r.k) for r in rp.matrix(p)}  # noqa: E731
    assert cells(seeds("scpl-vision")) == {(m, meth, k) for m in ("vgg8", "resnet18")
                                           for meth, k in (("bp", 1), ("scpl", 4))}
    assert len(rp.matrix(seeds("scpl-vision"))) == 8
    for data in ("imdb", "sst2"):
        assert cells(seeds(f"scpl-{data}")) == {(m, meth, k) for m in ("lstm", "transformer")
                                               for meth, k in (("bp", 1), ("scpl", 4))}
    assert {m for _, m, _ in cells(seeds("dascpl"))} == {"bp", "dascpl", "dascpl_grow"}
    groups = {m for _, m, _ in cells(seeds("groups"))}
    assert groups == {"bp", "dgl"} | {f"gn{g}{v}" for g in (2, 4, 8)
                                      for v in ("", "_div", "_sgdiv", "_wide")}
    assert len(rp.matrix(seeds("groups"))) == 2 * 14
    assert {(m, k) for _, m, k in cells(seeds("contsup"))} == {("bp", 1)} | {
        (m, k) for m in ("dgl", "contsup_e", "contsup_r1e") for k in (8, 16)}
    assert {(m, k) for _, m, k in cells(seeds("selfsup"))} == {
        ("simclr_e2e", 4), ("simclr_const", 4), ("simclr_sched", 4)}


def test_seeds_overrides_follow_the_thesis_recipes():
    vision = {r.key: r.overrides() for r in rp.matrix(seeds("scpl-vision"), ["vgg8/*/*/0"])}
    scpl = vision["scpl/4/0"]
    assert {"optim=adam", "optim.min_lr=1e-5", "optim.lr=0.001", "data.augment=strong",
            "split.by=cuts", "split.cuts=[2, 4, 5]", "objective=supcon"} <= set(scpl)
    assert any("temperature: 0.1" in o and "projector: mlp" in o for o in scpl)
    assert not any(o.startswith("split.cuts") for o in vision["bp/1/0"])
    resnet = rp.matrix(seeds("scpl-vision"), ["resnet18/scpl/4/0"])[0].overrides()
    assert "split.cuts=[3, 5, 7]" in resnet
    imdb = rp.matrix(seeds("scpl-imdb"), ["lstm/scpl/4/0"])[0].overrides()
    assert "data.options={max_len: 350, vocab_size: 30000}" in imdb
    assert any(o.startswith("model.options={embed_dim: 300") for o in imdb)
    assert "data.options={max_len: 15}" in rp.matrix(seeds("scpl-sst2"))[0].overrides()
    grow = rp.matrix(seeds("dascpl"), ["dascpl_grow/4/0"])[0].overrides()
    assert f"train.triggers={rp._grow_triggers(seeds('dascpl').epochs)}" in grow
    assert rp._grow_triggers(200) == "[50, 100, 150]"  # the thesis' triggers
    sgdiv = rp.matrix(seeds("groups"), ["gn4_sgdiv/4/0"])[0].overrides()
    assert {"split.groups=4", "objective.detach_ratio=1.0", "objective.diversity_weight=0.5"} <= set(sgdiv)
    assert "objective.options={hidden: [1024]}" in rp.matrix(seeds("groups"), ["gn4_wide/4/0"])[0].overrides()
    r1e = rp.matrix(seeds("contsup"), ["contsup_r1e/16/0"])[0].overrides()
    assert {"context=R1E", "context.recompute=true", "split.k=16", "split.by=memory"} <= set(r1e)


def _without_names(overrides):
    return [o for o in overrides if not o.startswith(("train.name=", "train.out_dir="))]


@pytest.mark.parametrize("borrower,lender,key", [
    ("seeds-dascpl", "seeds-scpl-vision", "vgg8/bp/1/0"),
    ("seeds-contsup", "cpu", "resnet32/bp/1/1"),
    ("seeds-contsup", "cpu", "resnet32/dgl/8/0")])
def test_a_borrowed_cell_is_the_lenders_run_with_the_same_overrides(borrower, lender, key, tmp_path):
    mine = rp.matrix(rp.PROTOCOLS[borrower], [key])[0]
    theirs = rp.matrix(rp.PROTOCOLS[lender], [key])[0]
    assert mine.folder(tmp_path) == theirs.folder(tmp_path)
    assert mine.overrides(tmp_path) == theirs.overrides(tmp_path)
    assert mine.folder(tmp_path).parent.name == lender


def test_the_seeds_group_plans_a_shared_folder_once():
    plan = rp.group_plan(rp.GROUPS["seeds"])
    folders = [r.folder() for r in plan]
    assert len(folders) == len(set(folders))
    every = sum(len(rp.matrix(rp.PROTOCOLS[n])) for n in rp.GROUPS["seeds"])
    assert len(plan) == every - 2  # dascpl's BP is the vision protocol's (contsup lends nothing
    # inside the group: its BP and plain K=8 live in the cpu protocol's folder)


@pytest.mark.parametrize("name", [*rp.GROUPS["seeds"], "seeds-scpl-ablation"])
def test_every_seeds_method_passes_the_registry_checks(name):
    p = rp.PROTOCOLS[name]
    rp.check_plan(p, rp.matrix(p))


@pytest.mark.parametrize("method,overrides,says", [
    ("typo_option", ("engine=local", "objective=ce", "objective.options={hiden: [512]}"),
     "objective option ce.hiden"),
    ("typo_supcon", ("engine=local", "objective=supcon", "objective.options={temprature: 0.1}"),
     "objective option supcon.temprature"),
    ("no_predictor", ("engine=local", "objective=supcon", "objective.predictor=3c9f"),
     "predictor head '3c9f'"),
    ("no_model", ("engine=local", "objective=ce", "model=vgg99"), "model 'vgg99'"),
    ("no_data", ("engine=local", "objective=ce", "data=nosuchdata"), "data set 'nosuchdata'"),
    ("model_typo", ("engine=local", "objective=ce", "model.options={widht: 0.5}"),
     "model option vgg6a.widht"),
])
def test_an_option_or_name_the_library_does_not_take_is_refused_naming_it(method, overrides, says,
                                                                       monkeypatch):
    p = seeds("groups")
    monkeypatch.setitem(p.methods, method, overrides)
    with pytest.raises(SystemExit, match=f"'{method}'.*{says}"):
        rp.check_method(method, p, 4)


def test_an_unknown_seeds_method_is_refused_with_the_choices():
    with pytest.raises(SystemExit, match="unknown method 'nosuch'.*gn4_sgdiv"):
        seeds("groups").method_overrides("nosuch", 4)


def test_an_exit_method_is_evaluated_after_training_and_done_with_its_exit_curve(tmp_path):
    p = seeds("dascpl")
    run = rp.matrix(p, ["dascpl/4/0"])[0]
    folder = fake_run(tmp_path, run, p.epochs, finished=True)
    assert rp.state(run, tmp_path) == "evaluate"
    cmd = rp.command(run, tmp_path)
    assert cmd[2:5] == ["locallearn", "eval", str(folder)] and "--exit" in cmd
    (folder / "exit_curve.json").write_text("{}")
    assert rp.state(run, tmp_path) == "done"
    bp = rp.matrix(p, ["bp/1/0"])[0]
    fake_run(tmp_path, bp, p.epochs, finished=True)
    assert rp.state(bp, tmp_path) == "done"  # no exit curve asked of BP


FAKE_TRAIN_OR_EXIT = """
import json, sys, pathlib
folder, epochs, kind = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if kind == "eval":
    (folder / "exit_curve.json").write_text(json.dumps({"full_acc": 50.0}))
    sys.exit(0)
folder.mkdir(parents=True, exist_ok=True)
(folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "epoch_seconds": 1.0}) + "\\n")
(folder / "summary.json").write_text(json.dumps({"epochs": epochs, "final_acc": 50.0}))
"""


def test_advance_draws_the_exit_curve_right_after_training(tmp_path, monkeypatch):
    p = seeds("dascpl")
    plan = rp.matrix(p, ["dascpl/4/0", "bp/1/0"])
    real_command = rp.command

    def command(run, runs, threads, device):
        kind = "eval" if "eval" in real_command(run, runs) else "train"
        return [sys.executable, "-c", FAKE_TRAIN_OR_EXIT, str(run.folder(runs)), str(p.epochs), kind]

    monkeypatch.setattr(rp, "command", command)
    assert rp.advance(plan, tmp_path, jobs=1, threads=1, device="") == 0
    assert [rp.state(r, tmp_path) for r in plan] == ["done", "done"]
    dascpl = next(r for r in plan if r.method == "dascpl")
    assert (dascpl.folder(tmp_path) / "exit_curve.json").is_file()
    assert "exit curve" in (dascpl.folder(tmp_path).with_name(dascpl.name + ".log")).read_text() or True


def _claim_rows(tmp_path):
    """Fake finished runs of every claim at two seeds; returns collect()'s rows."""
    exit_curve = {"full_acc": 80.0, "best_within_1pt": {"acc": 79.5, "macs_fraction": 0.6},
                  "fixed": [{"stage": 1, "acc": 60.0, "macs_fraction": 0.3}],
                  "curve": [{"macs_fraction": 0.6, "acc": 79.5}, {"macs_fraction": 1.0, "acc": 80.0}]}
    accs = {("groups", "bp"): 80.0, ("groups", "dgl"): 76.0, ("groups", "gn4"): 72.0,
            ("groups", "gn4_sgdiv"): 75.0, ("contsup", "bp"): 90.0, ("contsup", "dgl"): 80.0,
            ("contsup", "contsup_e"): 86.0, ("dascpl", "dascpl"): 80.0,
            ("dascpl", "dascpl_grow"): 79.5, ("dascpl", "bp"): 81.0,
            ("scpl-imdb", "bp"): 85.0, ("scpl-imdb", "scpl"): 84.0}
    probes = {"simclr_e2e": [40.0, 50.0, 60.0, 70.0], "simclr_const": [45.0, 50.0, 55.0, 60.0],
              "simclr_sched": [44.0, 50.0, 58.0, 66.0]}
    for (claim, method), acc in accs.items():
        for run in rp.matrix(seeds(claim), [f"{method}/*/*"]):
            if run.k in (4, 8, 1) and run.model in ("vgg6a", "resnet32", "vgg8", "lstm"):
                extra = {"saved_bytes_peak": (2**20 if method != "contsup_e" else 1.05 * 2**20),
                         "largest_node_macs": 1e6, "stage_acc": [acc - 3, acc]}
                folder = fake_claim_run(tmp_path, run, acc + run.seed, **extra)
                if run.needs_exit:
                    (folder / "exit_curve.json").write_text(json.dumps(exit_curve))
    for method, probe in probes.items():
        for run in rp.matrix(seeds("selfsup"), [f"{method}/4/*"]):
            fake_claim_run(tmp_path, run, 10.0, final_acc=None, probe_acc=probe,
                           effective_rank=[10.0, 20.0, 30.0, 40.0])
    return rp.collect(tmp_path, [n for n in rp.GROUPS["seeds"]])


def test_claim_rows_carry_stage_exit_probe_and_node_fields(tmp_path):
    rows = _claim_rows(tmp_path)
    row = next(r for r in rows if r["method"] == "dascpl")
    assert row["claim"] == "dascpl" and row["exit"]["best"]["macs_fraction"] == 0.6
    assert row["run"] == "seeds-dascpl/vgg8-dascpl-k4-s0"
    bp = next(r for r in rows if r["protocol"] == "seeds-dascpl" and r["method"] == "bp")
    assert bp["run"].startswith("seeds-scpl-vision/")  # borrowed
    probe = next(r for r in rows if r["method"] == "simclr_sched")
    assert rp.score(probe) == 66.0 and probe["effective_rank"][0] == 10.0


def test_each_claim_gets_a_section_with_its_table_or_not_run_yet(tmp_path):
    text = rp.seeds_markdown([])
    assert text.count("Not run yet.") == len(rp.CLAIMS)
    rows = _claim_rows(tmp_path)
    text = rp.markdown(rows)
    assert "No run of the cpu or full protocol has finished yet." in text
    sections = text.split("\n## ")
    by_title = {s.split("\n")[0]: s for s in sections}
    groups = by_title[rp.CLAIMS["groups"][0]]
    # gn4: 72.5 mean, DGL 76.5: -4.00 to DGL; sgdiv +-1.00; published 90.55 beside plain gn4
    gn4 = next(line for line in groups.splitlines() if line.startswith("| gn4 |"))
    assert "| 4 | none |" in gn4 and "72.50 ± 0.71" in gn4 and "-4.00" in gn4 and "90.55" in gn4
    contsup = by_title[rp.CLAIMS["contsup"][0]]
    e = next(line for line in contsup.splitlines() if line.startswith("| contsup_e | 8 |"))
    assert "60 %" in e and "+5.0 %" in e  # (86.5-80.5)/(90.5-80.5) of the gap; 5 % more bytes
    dascpl = by_title[rp.CLAIMS["dascpl"][0]]
    line = next(x for x in dascpl.splitlines() if x.startswith("| dascpl |"))
    assert "79.50 ± 0.00 @ 60.0 ± 0.0" in line and "| 40.0 ± 0.0 |" in line
    assert "grow vs the full network (dascpl): -0.50" in dascpl
    selfsup = by_title[rp.CLAIMS["selfsup"][0]]
    sched = next(x for x in selfsup.splitlines() if x.startswith("| simclr_sched |"))
    assert "60 %" in sched and "44.0 / 50.0 / 58.0 / 66.0" in sched  # (66-60)/(70-60)
    text_claim = by_title[rp.CLAIMS["scpl-text"][0]]
    scpl = next(x for x in text_claim.splitlines() if "| scpl |" in x)
    assert "-1.00" in scpl and "89.84" in scpl
    assert "Not run yet." in by_title[rp.CLAIMS["scpl-ablation"][0]]


def test_report_renders_a_plot_per_claim_that_asks_for_one(tmp_path):
    _claim_rows(tmp_path / "runs")
    rp.report(tmp_path / "runs", tmp_path, rp.GROUPS["seeds"])
    for claim in rp.CLAIM_PLOTS:
        assert (tmp_path / rp.claim_plot_name(claim)).is_file(), claim
    rows = json.loads((tmp_path / "results.json").read_text())
    # the vision claim has the row of the BP run it lends to dascpl
    assert {r["claim"] for r in rows} == {"groups", "contsup", "dascpl", "scpl-text", "selfsup",
                                          "scpl-vision"}


VISION_SEEDS = [(name, model, method, k) for name in ("seeds-scpl-vision", "seeds-dascpl",
                                                     "seeds-groups", "seeds-contsup", "seeds-selfsup")
                for model, method, k in dict.fromkeys(
                    (r.model, r.method, r.k) for r in rp.matrix(rp.PROTOCOLS[name]))]


@pytest.mark.slow
@pytest.mark.parametrize("name,model,method,k", VISION_SEEDS)
def test_every_vision_seeds_cell_trains_a_tiny_epoch(name, model, method, k, tmp_path):
    import locallearn as ll

    p = rp.PROTOCOLS[name]
    tiny = ["data=synthetic", "data.options={shape: [3, 32, 32], n_train: 64, n_test: 32}",
            "data.batch_size=32", "train.epochs=4", "train.checkpoint=false",
            f"train.out_dir={tmp_path}", "train.precision=fp32"]
    grow = ["train.triggers=[1, 2, 3]"] if method == "dascpl_grow" else []
    cfg = ll.load_config(None, [*p.overrides(model), *p.method_overrides(method, k, model),
                                *tiny, *grow])
    run = ll.run if callable(ll.run) else ll.run.run
    summary, _ = run(cfg)
    assert summary["k"] == k and summary["epochs"] == 4
