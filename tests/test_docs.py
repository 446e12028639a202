"""The documentation's code runs: each page's python blocks, in order.

Every ```python block of a page under docs/ runs in one namespace per page
(```py blocks are illustrations that need a cluster, a GPU or real
weights, and are not run).
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md")
               if re.search(r"```python\n", p.read_text()))


def _blocks(page: pathlib.Path) -> list[str]:
  return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


# What some pages must print: facts the prose states next to the code.
EXPECTED = {
    "guides/quickstart.md": ["(128, 8)"],
    "guides/other-libraries.md": [
        "{'o/kernel': 'iio', 'q/kernel': 'ioo', 'v/kernel': 'oio'}",
        "{'down/kernel': 'ioo', 'up/kernel': 'oi'}"],
    "guides/checkpoints.md": ["100 {'epoch': 1}"],
}


def test_there_are_pages_with_code():
  assert len(PAGES) >= 5


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_code_runs(page, capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # pages write their files here
  namespace: dict = {"__name__": "__docs__"}
  for block in _blocks(page):
    exec(compile(block, str(page), "exec"), namespace)
  # Pages print what they compute; nothing printed means nothing ran.
  out = capsys.readouterr().out
  assert out.strip()
  for expected in EXPECTED.get(str(page.relative_to(DOCS)), []):
    assert expected in out


def test_site_builds_strict(tmp_path):
  # Every page, API reference and cross-reference resolves: mkdocs fails the
  # build on the first warning.
  root = DOCS.parent
  env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
  run = subprocess.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d",
       str(tmp_path / "site")], cwd=root, env=env, capture_output=True,
      text=True, check=False)
  assert run.returncode == 0, run.stdout + run.stderr
  assert (tmp_path / "site" / "api" / "core" / "index.html").exists()
