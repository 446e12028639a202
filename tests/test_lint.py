"""The tree is clean under the project's ruff configuration (pyproject.toml)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
  run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                        "."], cwd=ROOT, capture_output=True, text=True,
                       check=False)
  assert run.returncode == 0, run.stdout + run.stderr


def test_ruff_would_catch_an_unused_import(tmp_path):
  # The configuration is live: a file with an undefined name and an unused
  # import fails under it.
  bad = tmp_path / "bad.py"
  bad.write_text("import os\nprint(undefined_name)\n")
  run = subprocess.run(
      [sys.executable, "-m", "ruff", "check", "--no-cache", "--config",
       str(ROOT / "pyproject.toml"), str(bad)],
      capture_output=True, text=True, check=False)
  assert run.returncode == 1
  assert "F401" in run.stdout and "F821" in run.stdout
