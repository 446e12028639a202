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
  """Paths `full` selects; raises when the tree would train nothing."""
  leaves = _paths.leaves_with_path(tree)
  chosen = set()
  if full is not None:
    sels = [full] if isinstance(full, str) or callable(full) else list(full)
    plain = [(p, x) for p, x in leaves if not is_lora(x)]
    for sel in sels:
      match = matcher(sel)
      hits = {p for p, x in plain if match(p, x)}
      nodes = [p for p, x in leaves if is_lora(x) and match(p, x)]
      if nodes:
        # A LoRA kernel's base stays frozen: training it fully as well
        # would be a different method, not silently half-done.
        raise ValueError(
            f"full={sel!r} selects {nodes[:4]}, which hold LoRA adapters;"
            " their base kernels stay frozen. Narrow full= to the plain"
            " params to train fully, or leave those kernels out of the"
            " targets of jlora.apply")
      if not hits:
        raise ValueError(
            f"full={sel!r} matched no parameter outside the adapters; paths"
            f" look like {[p for p, _ in plain[:5]]}")
      chosen |= hits
  return chosen


def _require_trained(tree: Any, full_paths: set[str], what: str) -> None:
  if not full_paths and not any(
      is_lora(x) for _, x in _paths.leaves_with_path(tree)):
    raise ValueError(
        f"{what}: the tree holds no LoRA nodes, so nothing would be trained;"
        " call jlora.apply(params, rank, key=...) first (or pass full= to"
        " train selected params fully)")


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
  _require_trained(tree, full_paths, "partition")
  return _split(tree, full_paths)


def _split(tree: Any, full_paths: set[str]) -> tuple[Any, Any]:
  def split(path, x, keep_trainable):
    if is_lora(x):
      return _node_split(x, keep_trainable)
    return x if (path in full_paths) == keep_trainable else None

  trainable = _paths.map_with_path(lambda p, x: split(p, x, True), tree)
  frozen = _paths.map_with_path(lambda p, x: split(p, x, False), tree)
  return trainable, frozen


def _statics(node: LoRA) -> dict:
  return {f.name: getattr(node, f.name) for f in dataclasses.fields(node)
          if f.metadata.get("static")}


def _combine_leaf(path: str, t: Any, f: Any) -> Any:
  halves = (" Pass the two halves that one jlora.partition call returned (the"
            " same tree, the same targets).")
  if is_lora(t) != is_lora(f) and t is not None and f is not None:
    which = "trainable" if is_lora(t) else "frozen"
    raise ValueError(
        f"combine: '{path}' is an adapter in the {which} half but a plain"
        " array in the other; the halves come from different target sets."
        + halves)
  if is_lora(t) and f is None or is_lora(f) and t is None:
    which, other = ("trainable", "frozen") if t is not None else (
        "frozen", "trainable")
    raise ValueError(
        f"combine: '{path}' is an adapter in the {which} half but missing"
        f" (None) in the {other} half; the halves come from different target"
        " sets." + halves)
  if t is None:
    return f
  if f is None:
    return t
  if not is_lora(t):
    raise ValueError(
        f"combine found a value in both halves at '{path}' ({type(t).__name__}"
        f" and {type(f).__name__})." + halves)
  if type(t) is not type(f) or _statics(t) != _statics(f):
    diff = [k for k in _statics(t) if _statics(t)[k] != _statics(f).get(k)]
    raise ValueError(
        f"combine: the halves' LoRA nodes at '{path}' differ"
        f" ({type(t).__name__} and {type(f).__name__}, fields {diff}); the"
        " halves come from different adapters." + halves)
  both = [n for n in _fields(t)
          if getattr(t, n) is not None and getattr(f, n) is not None]
  if both:
    raise ValueError(
        f"combine: both halves hold {both} of '{path}'." + halves)
  node = dataclasses.replace(t, **{
      name: getattr(f, name) if getattr(t, name) is None else getattr(t, name)
      for name in _fields(t)})
  return node.check_arrays()  # shapes of one kernel, not of two trees


def _first_difference(t_paths: list[str], f_paths: list[str]) -> str:
  t_set, f_set = set(t_paths), set(f_paths)
  only_t = [p for p in t_paths if p not in f_set]
  only_f = [p for p in f_paths if p not in t_set]
  if only_t:
    return f"'{only_t[0]}' only in the trainable half"
  if only_f:
    return f"'{only_f[0]}' only in the frozen half"
  return "the same paths in other container types"


def combine(trainable: Any, frozen: Any) -> Any:
  """Inverse of `partition`: fills each ``None`` of one half from the other.

  Raises ValueError naming the first mismatching path when the halves are
  not the two halves of one `partition` (different trees or target sets).

  Example:
    >>> lp = jlora.combine(*jlora.partition(lp))
  """
  # Quantized kernels are one leaf, as partition sees them.
  is_leaf = lambda x: x is None or _paths.is_leaf(x)
  t_flat, t_def = jax.tree_util.tree_flatten_with_path(trainable,
                                                       is_leaf=is_leaf)
  f_flat, f_def = jax.tree_util.tree_flatten_with_path(frozen, is_leaf=is_leaf)
  if t_def != f_def:
    where = _first_difference([_paths.path_str(p) for p, _ in t_flat],
                              [_paths.path_str(p) for p, _ in f_flat])
    raise ValueError(
        f"combine: the halves are different trees, first at {where}. Pass the"
        " two halves that one jlora.partition call returned")
  leaves = [_combine_leaf(_paths.path_str(p), t, f)
            for (p, t), (_, f) in zip(t_flat, f_flat)]
  return jax.tree.unflatten(t_def, leaves)


def mask(tree: Any, *, full: Selector = None) -> Any:
  """Bool pytree shaped like `tree`: True on trained arrays, False elsewhere.

  True on adapter arrays (as `partition` splits them) and on params
  selected by `full`. Usable as optax labels, e.g.
  ``optax.multi_transform({True: tx, False: optax.set_to_zero()}, mask(lp))``.
  """
  full_paths = _full_paths(tree, full)
  _require_trained(tree, full_paths, "mask")

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
