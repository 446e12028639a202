"""The README's code runs: every python block, in order, in one namespace.

The README keeps the quick start; the guides' code runs in test_docs.py.

Blocks that need a real checkpoint (they name "path/or/hub-id") are skipped.
"""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
  text = README.read_text()
  return [b for b in re.findall(r"```python\n(.*?)```", text, re.S)
          if "path/or/hub-id" not in b]


def test_readme_blocks_run(capsys):
  blocks = _blocks()
  assert len(blocks) >= 1  # the quick start
  namespace: dict = {}
  for block in blocks:
    exec(compile(block, str(README), "exec"), namespace)
  out = capsys.readouterr().out
  # The quick start trains: its final loss is below the untrained loss of
  # predicting with the base model.
  final = float(re.search(r"final loss ([0-9.e+-]+)", out).group(1))
  import jax.numpy as jnp
  base_loss = float(jnp.mean((namespace["model"].apply(
      {"params": namespace["params"]}, namespace["x"]) - namespace["y"]) ** 2))
  assert final < 0.9 * base_loss
  # The merged params run in the unmodified model.
  assert "(128, 8)" in out
