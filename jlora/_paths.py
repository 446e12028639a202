"""'/'-joined key paths, the spelling users know from Flax param trees."""

from __future__ import annotations

from typing import Any, Callable

import jax

from jlora._quant_array import is_quantized
from jlora.node import is_lora


def is_leaf(x: Any) -> bool:
  """`LoRA` nodes and quantized kernels are visited whole, as leaves."""
  return is_lora(x) or is_quantized(x)


def key_str(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_str(path: tuple) -> str:
  """'layers/0/q_proj/kernel' from a jax key path.

  A trailing `.value` attribute (how an `nnx.Variable` holds its array) is
  dropped so nnx and linen trees share one spelling.
  """
  keys = list(path)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and (
      keys[-1].name in ("value", "raw_value")):
    keys = keys[:-1]
  return "/".join(key_str(k) for k in keys)


def map_with_path(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """tree_map with '/'-joined paths; `LoRA` nodes, quantized kernels whole."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: fn(path_str(p), x), tree, is_leaf=is_leaf)


def leaves_with_path(tree: Any) -> list[tuple[str, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [(path_str(p), x) for p, x in flat]
