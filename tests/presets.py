"""Shared by the method tests: train a shipped preset for one epoch on tiny digits data."""

from pathlib import Path

import locallearn as ll

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["data=digits", "data.augment=none", "data.train_subset=96", "data.test_subset=32",
        "data.batch_size=32", "train.epochs=1", "train.progress=false", "train.checkpoint=false"]


def run_preset(name: str, tmp_path: Path, *overrides: str) -> dict:
    """Run ``configs/<name>.yaml`` for one tiny epoch (plus ``overrides``); its summary."""
    cfg = ll.load_config(CONFIGS / f"{name}.yaml",
                         [*TINY, f"train.out_dir={tmp_path}", *overrides])
    summary, _ = ll.run(cfg)
    return summary
