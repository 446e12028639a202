"""`merge`: fuse adapters into plain kernels for inference."""

from __future__ import annotations

from typing import Any

import jax

from jlora._quant_array import is_quantized
from jlora.node import is_lora


def merge(tree: Any) -> Any:
  """Returns plain params: each `LoRA` node becomes ``w + scale * a @ b``.

  The result has the structure of the params `jlora.apply` was given, each
  fused kernel in its base's dtype (accumulated in at least float32), so the
  model runs with no extra latency. A quantized kernel left without an
  adapter (an FP8 base's untargeted kernels) is dequantized to its compute
  dtype, so every leaf is a plain array; `jlora.quant.merge_and_quantize`
  keeps kernels stored instead. Works under `jit`.

  Examples:
    >>> fused = jlora.merge(jlora.combine(trainable, frozen))
    >>> model.apply({"params": fused}, x)
  """
  def plain(x):
    if is_lora(x):
      return x.materialize()
    return x.dequantize() if is_quantized(x) else x

  return jax.tree.map(plain, tree,
                      is_leaf=lambda x: is_lora(x) or is_quantized(x))
