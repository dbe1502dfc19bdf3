"""`ruff check .` and `mypy` find nothing (their settings are in pyproject.toml).

Only `ruff check`: the code is not ruff-formatted, and `ruff format` is not imposed.
"""

import subprocess
import sys

import pytest

from processes import ROOT


def assert_finds_nothing(*command: str) -> None:
    """Runs the venv's ``python -m COMMAND`` in the repository root; fails with its findings."""
    result = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} found:\n{result.stdout}{result.stderr}", pytrace=False)


def test_ruff_check_finds_nothing():
    assert_finds_nothing("ruff", "check", "--no-fix", "--output-format", "concise", ".")


def test_mypy_finds_nothing():
    assert_finds_nothing("mypy")
