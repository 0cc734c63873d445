"""The torch-free catalog equals the registries, and ``--help``/``list`` start without torch."""

import subprocess
import sys
from pathlib import Path

import pytest

from locallearn import catalog

ROOT = Path(__file__).resolve().parents[1]


def _registries() -> dict[str, dict[str, str]]:
    from locallearn.data import DATASET_HELP
    from locallearn.engines import ENGINES
    from locallearn.models import MODELS
    from locallearn.objectives import HEAD_KINDS, OBJECTIVES

    return {"models": {k: v[1] for k, v in MODELS.items()},
            "objectives": {k: v[1] for k, v in OBJECTIVES.items()},
            "heads": {k: catalog.HEADS.get(k, "") for k in HEAD_KINDS},
            "engines": dict(ENGINES), "data sets": dict(DATASET_HELP)}


@pytest.mark.parametrize("title", ["models", "objectives", "heads", "engines", "data sets"])
def test_the_catalog_lists_every_registered_name_with_its_help(title):
    table = dict(catalog.sections())[title]
    registered = _registries()[title]
    missing = {k: v for k, v in registered.items() if table.get(k) != v}
    extra = sorted(set(table) - set(registered))
    assert not missing and not extra, (
        f"src/locallearn/catalog.py is out of date for {title}: add or correct "
        f"{missing}, remove {extra}")


def test_every_head_has_a_description():
    assert all(help_ for help_ in catalog.HEADS.values())


@pytest.mark.parametrize("args", [["--help"], ["list"], ["train", "--help"]])
def test_help_and_list_do_not_import_torch(args):
    code = ("import sys\nfrom locallearn.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'\n")
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code, *args], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "numpy" not in imported
