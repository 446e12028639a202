"""Trainable/frozen halves of a LoRA tree, and optax masks over it."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from jlora.node import LoRA, is_lora

# The fields of a LoRA node that are trained; every other field is frozen.
TRAINABLE_FIELDS = ("a", "b")


def _fields(node: LoRA) -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(node)
               if not f.metadata.get("static"))


def _node_split(node: LoRA, keep_trainable: bool) -> LoRA:
  return dataclasses.replace(node, **{
      f: (getattr(node, f) if (f in TRAINABLE_FIELDS) == keep_trainable
          else None) for f in _fields(node)})


def partition(tree: Any) -> tuple[Any, Any]:
  """Splits a LoRA tree into ``(trainable, frozen)`` halves.

  ``trainable`` keeps only the adapter arrays (``a``, ``b``) with every other
  leaf ``None``: it is what goes to the optimizer and to a checkpoint.
  ``frozen`` holds the rest. `combine` is the exact inverse.

  Example:
    >>> trainable, frozen = jlora.partition(lp)
    >>> opt_state = optax.adam(1e-3).init(trainable)
    >>> lp2 = jlora.combine(trainable, frozen)
  """
  trainable = jax.tree.map(
      lambda x: _node_split(x, True) if is_lora(x) else None, tree,
      is_leaf=is_lora)
  frozen = jax.tree.map(
      lambda x: _node_split(x, False) if is_lora(x) else x, tree,
      is_leaf=is_lora)
  return trainable, frozen


def _combine_leaf(t: Any, f: Any) -> Any:
  if t is None:
    return f
  if is_lora(t) and is_lora(f):
    return dataclasses.replace(t, **{
        name: getattr(f, name) if getattr(t, name) is None else getattr(t, name)
        for name in _fields(t)})
  if f is None:
    return t
  raise ValueError(
      f"combine found a value in both halves ({type(t).__name__} and"
      f" {type(f).__name__}); pass the two halves returned by jlora.partition")


def combine(trainable: Any, frozen: Any) -> Any:
  """Inverse of `partition`: fills each ``None`` of one half from the other.

  Example:
    >>> lp = jlora.combine(*jlora.partition(lp))
  """
  return jax.tree.map(_combine_leaf, trainable, frozen,
                      is_leaf=lambda x: x is None or is_lora(x))


def mask(tree: Any) -> Any:
  """Bool pytree shaped like `tree`: True on adapter arrays, False elsewhere.

  Usable as optax labels, e.g.
  ``optax.multi_transform({True: tx, False: optax.set_to_zero()}, mask(lp))``.
  """
  def node_mask(x):
    if not is_lora(x):
      return False
    return dataclasses.replace(x, **{
        f: (f in TRAINABLE_FIELDS) if getattr(x, f) is not None else None
        for f in _fields(x)})
  return jax.tree.map(node_mask, tree, is_leaf=is_lora)


def optimizer(tx: optax.GradientTransformation,
              tree: Any = None) -> optax.GradientTransformation:
  """Wraps `tx` so that over a whole LoRA tree only adapters are updated.

  Every non-adapter leaf gets an exactly-zero update (unlike
  ``optax.masked``, which passes raw gradients through on masked-out
  leaves). The mask is computed from the params given to ``init``; `tree` is
  accepted for symmetry and ignored.

  Example:
    >>> tx = jlora.optimizer(optax.adamw(1e-4))
    >>> opt_state = tx.init(lp)
  """
  labels = mask if tree is None else mask(tree)
  return optax.multi_transform({True: tx, False: optax.set_to_zero()}, labels)
