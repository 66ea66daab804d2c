"""The code follows the project's lint rules (pyproject.toml ``[tool.ruff]``: pycodestyle, pyflakes,
import order, 120 columns). Skipped with a reason where ruff is not installed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_reports_nothing():
    pytest.importorskip("ruff", reason="ruff is not installed (it comes with `pip install -e '.[test]'`)")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "src", "tests", "benchmarks", "tools"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
