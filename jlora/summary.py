"""Parameter counts and a readable per-target summary of a LoRA tree."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax

from jlora import _paths
from jlora._quant_array import is_quantized
from jlora.node import is_lora, is_multi
from jlora.partition import _split


class Count(NamedTuple):
  trainable: int
  total: int

  @property
  def fraction(self) -> float:
    return self.trainable / self.total if self.total else 0.0


def _size(tree: Any) -> int:
  """Logical element count: a quantized kernel counts as its dense shape."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(
      tree, is_leaf=is_quantized) if hasattr(x, "shape"))


def count(tree: Any) -> Count:
  """``Count(trainable, total)``: adapter parameters and all parameters.

  >>> jlora.count(lp)
  Count(trainable=4096, total=1052672)
  """
  trainable, frozen = _split(tree, set())  # a plain tree counts 0 trainable
  n_train = _size(trainable)
  return Count(n_train, n_train + _size(frozen))


def summary(tree: Any) -> str:
  """A table of every adapted kernel: path, shape, layout, rank, scale, size.

  >>> print(jlora.summary(lp))
  """
  rows = [("path", "kernel", "layout", "rank", "scale", "adapter params")]
  for path, node in _paths.leaves_with_path(tree):
    if is_lora(node):
      size = _size((node.a, node.b))
      if is_multi(node):  # one rank and scale per stacked adapter
        rank = "/".join(str(r) for r in node.ranks)
        scale = "/".join(f"{s:g}" for s in node.scales)
      else:
        rank, scale = str(node.rank), f"{node.scale:g}"
      rows.append((path, str(tuple(node.shape)), node.layout, rank, scale,
                   f"{size:,}"))
  c = count(tree)
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  lines.append(f"{len(rows) - 1} adapted kernels; trainable {c.trainable:,}"
               f" of {c.total:,} parameters ({100 * c.fraction:.3f}%)")
  return "\n".join(lines)
