"""The CLI end to end on the embedded digits data, resume equivalence, and user errors."""

import json
from pathlib import Path

import pytest
import torch

from locallearn import runs
from locallearn.cli import main
from locallearn.config import load_config
from locallearn.train import Trainer, TrainingError, run

Loop = Trainer.__mro__[-2]  # the training loop's own class, below the run's Trainer


def _only_run(out: Path) -> Path:
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    return d


def test_train_writes_a_complete_run_folder(tiny_cfg, tmp_path, capsys):
    assert main(["train", *tiny_cfg, "train.name=r1", "train.epochs=3"]) == 0
    d = tmp_path / "r1"
    for f in ("config.yaml", "env.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "curves.png"):
        assert (d / f).is_file(), f
    rows = runs.read_metrics(d)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    summary = json.loads((d / "summary.json").read_text())
    assert summary["k"] == 4 and len(summary["stage_acc"]) == 4
    assert summary["final_acc"] > 40  # digits is easy: chance is 10%, 3 epochs give ~65%
    assert len(summary["stages"]) == 4 and all(s["macs"] > 0 for s in summary["stages"])
    out = capsys.readouterr().out
    assert "final acc" in out and "r1" in out
    # eval and compare read the folder back
    assert main(["eval", str(d)]) == 0
    assert f"final {summary['final_acc']:.2f}" in capsys.readouterr().out
    assert main(["compare", str(d), str(d)]) == 0


def test_resume_reaches_the_same_parameters(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg + ["train.epochs=3", "data.augment=basic"]
    full, full_dir = run(load_config(None, cfg + ["train.name=full"]))
    original = Loop.train_epoch

    def crash_in_epoch_2(self):
        if self.epoch == 1:
            raise KeyboardInterrupt("simulated crash")
        return original(self)

    monkeypatch.setattr(Loop, "train_epoch", crash_in_epoch_2)
    with pytest.raises((KeyboardInterrupt, runs.RunError)):  # RunError: "stopped by the user"
        run(load_config(None, cfg + ["train.name=part"]))
    monkeypatch.setattr(Loop, "train_epoch", original)
    saved, changes = runs.resume_config(tmp_path / "part", [])  # as `train --resume` does
    assert changes == [] and saved.data.augment == "basic"
    resumed, part_dir = run(saved, resume=tmp_path / "part")
    a = runs.load_checkpoint(full_dir)["net"]
    b = runs.load_checkpoint(part_dir)["net"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert resumed["final_acc"] == full["final_acc"]
    assert [r["epoch"] for r in runs.read_metrics(part_dir)] == [1, 2, 3]


def test_nan_loss_stops_with_stage_and_epoch_and_keeps_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    original = Loop.train_batches
    saved = {}

    def nan_in_epoch_2(self):
        if self.epoch == 1:  # epoch 1 is done and checkpointed: remember it, then corrupt data
            saved["good"] = (tmp_path / "nan" / "checkpoint.pt").read_bytes()
            return ((x * float("nan"), y) for x, y in original(self))
        return original(self)

    monkeypatch.setattr(Loop, "train_batches", nan_in_epoch_2)
    with pytest.raises(TrainingError, match=r"stage 1 became nan in epoch 2"):
        run(load_config(None, tiny_cfg + ["train.epochs=3", "train.name=nan"]))
    assert (tmp_path / "nan" / "checkpoint.pt").read_bytes() == saved["good"]
    assert runs.load_checkpoint(tmp_path / "nan")["epoch"] == 1


def test_checkpoint_cannot_run_code_and_corrupt_file_is_named(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"net": {}, "config": {}, "x": Evil()}, path)
    with pytest.raises(runs.RunError, match="evil.pt is not a locallearn checkpoint"):
        runs.load_checkpoint(path)
    (tmp_path / "trunc.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(runs.RunError, match="trunc.pt is not a locallearn checkpoint"):
        runs.load_checkpoint(tmp_path / "trunc.pt")


def test_a_junk_checkpoint_is_one_line_naming_the_file(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"this is no checkpoint at all\n" * 10)
    assert main(["eval", str(tmp_path / "junk.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "junk.pt is not a locallearn checkpoint" in err, err


def test_atomic_save_keeps_the_old_file_when_saving_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    runs.save_checkpoint(path, {"net": {"w": torch.ones(2)}, "config": {}})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        runs.save_checkpoint(path, {"net": {"w": torch.zeros(2)}, "config": {}})
    assert runs.load_checkpoint(path)["net"]["w"].tolist() == [1.0, 1.0]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.parametrize("args, words", [
    (["train", "split.k=99"], ["split.k=99", "4 blocks"]),
    (["train", "split.kk=2"], ["unknown config key 'split.kk'"]),
    (["train", "data=nosuch"], ["nosuch", "digits"]),
    (["eval", "/nonexistent/run"], ["/nonexistent/run"]),
])
def test_user_errors_are_one_line_without_traceback(args, words, tiny_cfg, capsys):
    base = [a for a in tiny_cfg if not a.startswith("split.k")] if args[0] == "train" else []
    code = main([args[0], *base, *args[1:]])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    for w in words:
        assert w in err


def test_model_that_does_not_fit_the_data_is_named(tiny_cfg, capsys):
    # digits are 8x8 images; a text model needs token ids (L,) and a vocabulary
    code = main(["train", *tiny_cfg, "model=lstm", "split.k=2"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "(1, 8, 8)" in err, err


def test_list_and_split(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("resnet32", "ce", "local", "digits", "cifar10", "1c2f"):
        assert name in out
    assert main(["split", "--model", "resnet32", "--k", "4", "--by", "memory", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n| ") >= 5 and "saved act MiB" in out and "MMACs" in out


def test_overrides_may_follow_the_data_dir_option(tiny_cfg, tmp_path, capsys):
    assert main(["train", *tiny_cfg[:3], "--data-dir", str(tmp_path), *tiny_cfg[3:],
                 "train.epochs=1", "train.name=mixed"]) == 0
    assert [r["epoch"] for r in runs.read_metrics(tmp_path / "mixed")] == [1]


def test_an_image_model_on_text_data_says_so(tiny_cfg, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOCALLEARN_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "tab").mkdir()
    for split in ("train", "test"):
        (tmp_path / "tab" / f"{split}.csv").write_text(
            "".join(f"{'ab'[i % 2]},some words {i}\n" for i in range(20)))
    code = main(["train", *tiny_cfg, "model=resnet20", "data=csv", f"data.data_dir={tmp_path}",
                 "data.options={path: tab}", "split.k=2"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "model 'resnet20' takes images" in err and "text or tabular" in err, err


def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: mlp\n  options: {hidden: [3, 4}\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad} is not valid YAML: line 3, column" in err, err


def test_an_internal_error_keeps_its_traceback(monkeypatch):
    import locallearn.cli as cli

    def bug(args):
        raise ValueError("an internal bug, not the user's mistake")

    monkeypatch.setattr(cli, "_cmd_list", bug)
    with pytest.raises(ValueError, match="internal bug"):
        main(["list"])


def test_split_shows_the_same_stage_macs_in_both_tables_and_mlp_head_macs(capsys):
    assert main(["split", "--model", "mlp", "--input-shape", "1,8,8", "--k", "2",
                 "--head", "mlp"]) == 0
    tables = [t for t in capsys.readouterr().out.split("\n\n")]
    stage_rows = [r.split("|") for r in tables[0].splitlines() if r.startswith("| ") and
                  r[2].isdigit()]
    node_rows = [r.split("|") for r in tables[1].splitlines() if r.startswith("| ") and
                 r[2].isdigit()]
    assert [r[5].strip() for r in stage_rows] == [r[3].strip() for r in node_rows]
    assert float(node_rows[0][4]) > 0  # the auxiliary mlp head of stage 1 (not 0.00)


def test_eval_reads_test_batches_without_building_a_trainer(tiny_cfg, tmp_path, monkeypatch,
                                                            capsys):
    assert main(["train", *tiny_cfg, "train.epochs=1", "train.name=e"]) == 0

    def no_trainer(*args, **kwargs):
        raise AssertionError("eval built a Trainer")

    monkeypatch.setattr(Trainer, "__init__", no_trainer)
    assert main(["eval", str(tmp_path / "e")]) == 0
    assert "final " in capsys.readouterr().out


def test_eval_of_a_run_whose_data_moved_points_at_the_data_dir_option(tmp_path, capsys):
    from locallearn.config import to_dict

    cfg = load_config(None, ["data=cifar10", f"data.data_dir={tmp_path / 'gone'}"])
    runs.save_checkpoint(tmp_path / "run" / runs.CHECKPOINT, {"net": {}, "config": to_dict(cfg)})
    assert main(["eval", str(tmp_path / "run")]) == 2
    assert "pass --data-dir" in capsys.readouterr().err


def test_an_unknown_model_says_workers_rebuild_models_by_name(tiny_cfg, capsys):
    assert main(["train", *tiny_cfg, "model=mymodel"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'mymodel'" in err and "rebuild models by name" in err


def test_a_relative_data_dir_is_saved_absolute_in_config_and_checkpoint(tiny_cfg, tmp_path,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *tiny_cfg, "train.epochs=1", "train.name=a", "--data-dir", "rel"]) == 0
    want = str(tmp_path / "rel")
    assert runs.load_run_config(tmp_path / "a").data.data_dir == want
    assert runs.load_checkpoint(tmp_path / "a")["config"]["data"]["data_dir"] == want


def test_a_bad_objective_option_is_a_one_line_user_error(tiny_cfg, capsys):
    code = main(["train", *tiny_cfg, "objective=supcon", "objective.options={classifier: bad}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "objective 'supcon': supcon classifier='bad'" in err


def test_a_probe_grid_below_one_is_a_user_error(tmp_path, capsys):
    assert main(["probe", str(tmp_path), "--grid", "0"]) == 2
    assert "--grid 0 is not allowed" in capsys.readouterr().err
