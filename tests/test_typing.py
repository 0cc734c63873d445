"""The package type-checks: ``mypy src`` (settings in pyproject.toml's ``[tool.mypy]``) is clean.

mypy runs from the repository root with its default cache (``.mypy_cache/``, git-ignored),
so a repeated run takes about a second; a cold one (torch's stubs) takes ten or more.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_reports_no_errors_in_the_package():
    cmd = [sys.executable, "-m", "mypy", "src"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, f"mypy src failed (exit {done.returncode}):\n{output}"
