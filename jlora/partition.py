"""Trainable/frozen halves of a LoRA tree, and optax masks over it."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from jlora import _paths
from jlora.node import LoRA, is_lora
from jlora.targets import Selector, matcher

# The fields of a LoRA node that are trained (when present); `w` is frozen.
TRAINABLE_FIELDS = ("a", "b", "e", "m")


def _fields(node: LoRA) -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(node)
               if not f.metadata.get("static"))


def trainable_fields(node: LoRA) -> tuple[str, ...]:
  """The node's fields that train: a (unless LoRA-FA), b, e, m."""
  return tuple(f for f in TRAINABLE_FIELDS if f != "a" or node.train_a)


def _node_split(node: LoRA, keep_trainable: bool) -> LoRA:
  train = trainable_fields(node)
  return dataclasses.replace(node, **{
      f: (getattr(node, f) if (f in train) == keep_trainable else None)
      for f in _fields(node)})


def _full_paths(tree: Any, full: Selector) -> set[str]:
  if full is None:
    return set()
  sels = [full] if isinstance(full, str) or callable(full) else list(full)
  leaves = [(p, x) for p, x in _paths.leaves_with_path(tree) if not is_lora(x)]
  chosen = set()
  for sel in sels:
    match = matcher(sel)
    hits = {p for p, x in leaves if match(p, x)}
    if not hits:
      raise ValueError(
          f"full={sel!r} matched no parameter outside the adapters; paths"
          f" look like {[p for p, _ in leaves[:5]]}")
    chosen |= hits
  return chosen


def partition(tree: Any, *, full: Selector = None) -> tuple[Any, Any]:
  """Splits a LoRA tree into ``(trainable, frozen)`` halves.

  ``trainable`` keeps only the adapter arrays (``a``, ``b``, and ``e``/``m``
  when present; not ``a`` for LoRA-FA nodes) with every other leaf ``None``:
  it is what goes to the optimizer and to a checkpoint. ``frozen`` holds the
  rest. `combine` is the exact inverse.

  Args:
    tree: a tree made by `jlora.apply`.
    full: params trained fully besides the adapters (PEFT's
      ``modules_to_save``, e.g. a classifier head or norms): a regex searched
      in the '/'-joined path, a list of them, or a callable (path, leaf).

  Example:
    >>> trainable, frozen = jlora.partition(lp)
    >>> opt_state = optax.adam(1e-3).init(trainable)
    >>> lp2 = jlora.combine(trainable, frozen)
  """
  full_paths = _full_paths(tree, full)

  def split(path, x, keep_trainable):
    if is_lora(x):
      return _node_split(x, keep_trainable)
    return x if (path in full_paths) == keep_trainable else None

  trainable = _paths.map_with_path(lambda p, x: split(p, x, True), tree)
  frozen = _paths.map_with_path(lambda p, x: split(p, x, False), tree)
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


def mask(tree: Any, *, full: Selector = None) -> Any:
  """Bool pytree shaped like `tree`: True on trained arrays, False elsewhere.

  True on adapter arrays (as `partition` splits them) and on params
  selected by `full`. Usable as optax labels, e.g.
  ``optax.multi_transform({True: tx, False: optax.set_to_zero()}, mask(lp))``.
  """
  full_paths = _full_paths(tree, full)

  def leaf_mask(path, x):
    if not is_lora(x):
      return path in full_paths
    train = trainable_fields(x)
    return dataclasses.replace(x, **{
        f: (f in train) if getattr(x, f) is not None else None
        for f in _fields(x)})
  return _paths.map_with_path(leaf_mask, tree)


def optimizer(tx: optax.GradientTransformation, tree: Any = None, *,
              full: Selector = None) -> optax.GradientTransformation:
  """Wraps `tx` so that over a whole LoRA tree only adapters are updated.

  Every non-adapter leaf gets an exactly-zero update (unlike
  ``optax.masked``, which passes raw gradients through on masked-out
  leaves). The mask is computed from the params given to ``init``; `tree` is
  accepted for symmetry and ignored.

  Example:
    >>> tx = jlora.optimizer(optax.adamw(1e-4))
    >>> opt_state = tx.init(lp)
  """
  labels = (lambda p: mask(p, full=full)) if tree is None else mask(
      tree, full=full)
  return optax.multi_transform({True: tx, False: optax.set_to_zero()}, labels)
