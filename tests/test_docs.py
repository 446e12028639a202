"""The documentation's code runs: each page's python blocks, in order.

Every ```python block of a page under docs/ runs in one namespace per page
(```py blocks are illustrations that need a cluster, a GPU or real
weights, and are not run).
"""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md")
               if re.search(r"```python\n", p.read_text()))


def _blocks(page: pathlib.Path) -> list[str]:
  return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


def test_there_are_pages_with_code():
  assert len(PAGES) >= 5


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_code_runs(page, capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # pages write their files here
  namespace: dict = {"__name__": "__docs__"}
  for block in _blocks(page):
    exec(compile(block, str(page), "exec"), namespace)
  # Pages print what they compute; nothing printed means nothing ran.
  assert capsys.readouterr().out.strip()
