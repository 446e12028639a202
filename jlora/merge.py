"""`merge`: fuse adapters into plain kernels for inference."""

from __future__ import annotations

from typing import Any

import jax

from jlora.node import is_lora


def merge(tree: Any) -> Any:
  """Returns plain params: each `LoRA` node becomes ``w + scale * a @ b``.

  The result has the structure of the params `jlora.apply` was given, each
  fused kernel in its base's dtype (accumulated in at least float32), so the
  model runs with no extra latency. Works under `jit`.

  Examples:
    >>> fused = jlora.merge(jlora.combine(trainable, frozen))
    >>> model.apply({"params": fused}, x)
  """
  return jax.tree.map(lambda x: x.materialize() if is_lora(x) else x, tree,
                      is_leaf=is_lora)
