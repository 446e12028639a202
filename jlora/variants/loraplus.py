"""LoRA+: a larger learning rate for ``b`` than for ``a``; LoRA-FA labels.

`labels` names the role of every leaf of a LoRA tree, for
``optax.multi_transform``; `optimizer` builds the LoRA+ transformation from
them. Both work on a whole tree or on the trainable half of
`jlora.partition` (labels follow whatever leaves are present).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import optax

from jlora import _paths
from jlora.node import LoRA, is_lora
from jlora.targets import Selector, matcher

# Roles of a LoRA node's array fields.
_FIELD_LABELS = {"w": "frozen", "a": "lora_a", "b": "lora_b", "e": "lora_e",
                 "m": "lora_m"}

LABELS = ("lora_a", "lora_b", "lora_e", "lora_m", "full", "frozen")


def _selected(selector: Selector, path: str, leaf: Any) -> bool:
  if selector is None:
    return False
  if isinstance(selector, (str, re.Pattern)) or callable(selector):
    return matcher(selector)(path, leaf)
  return any(_selected(s, path, leaf) for s in selector)


def _node_labels(node: LoRA, train_a: bool) -> LoRA:
  values = {}
  for f in dataclasses.fields(node):
    if f.metadata.get("static"):
      continue
    if getattr(node, f.name) is None:
      values[f.name] = None
    elif f.name == "a" and not (train_a and node.train_a):
      values[f.name] = "frozen"
    else:
      values[f.name] = _FIELD_LABELS.get(f.name, "frozen")
  return dataclasses.replace(node, **values)


def labels(tree: Any, *, full: Selector = None, train_a: bool = True) -> Any:
  """Per-leaf role labels of a LoRA tree, for ``optax.multi_transform``.

  Inside each `LoRA` node: ``a`` -> ``"lora_a"`` (``"frozen"`` when
  ``train_a=False`` here or on the node: LoRA-FA), ``b`` -> ``"lora_b"``, ``e`` -> ``"lora_e"``,
  ``m`` -> ``"lora_m"``, ``w`` -> ``"frozen"``. Every other leaf is
  ``"full"`` if `full` selects it (PEFT's ``modules_to_save``: a head or a
  norm trained in full) and ``"frozen"`` otherwise.

  Args:
    tree: a LoRA tree, or its trainable half, or gradients shaped like it.
    full: regex searched in the '/'-joined path, a list of them, or a
      callable ``(path, leaf) -> bool``.
    train_a: ``False`` freezes every ``a`` (LoRA-FA).

  Returns:
    A tree of the same structure with a string from `LABELS` per leaf.

  Examples:
    >>> tx = optax.multi_transform(
    ...     {"lora_a": optax.adam(1e-4), "lora_b": optax.adam(1.6e-3), ...},
    ...     jlora.variants.labels(lp, full="classifier"))
  """

  def leaf_label(path: str, x: Any):
    if is_lora(x):
      return _node_labels(x, train_a)
    return "full" if _selected(full, path, x) else "frozen"

  return _paths.map_with_path(leaf_label, tree)


def _times(lr, factor: float):
  if callable(lr):
    return lambda step: factor * lr(step)
  return factor * lr


def optimizer(make_tx: Callable[[Any], optax.GradientTransformation],
              lr: float | optax.Schedule, ratio: float = 16.0, *,
              full: Selector = None, full_lr: float | optax.Schedule = None,
              train_a: bool = True) -> optax.GradientTransformation:
  """LoRA+: ``b`` (and a DoRA ``m``) learn `ratio` times faster than ``a``.

  ``lr_b = ratio * lr_a``; ``a`` and AdaLoRA's ``e`` use `lr`. As PEFT's
  ``create_loraplus_optimizer``, a one-axis-per-kernel DoRA magnitude goes
  with ``b``. Leaves selected by `full` are trained with `full_lr` (default
  `lr`); every other leaf gets an exactly zero update
  (``optax.set_to_zero``). Labels are computed from the params given to
  ``init`` and the updates given to ``update``, so the transformation works
  on a whole LoRA tree or on a trainable half.

  Args:
    make_tx: ``lr -> GradientTransformation``, e.g. ``optax.adamw`` or
      ``lambda lr: optax.adamw(lr, weight_decay=0.0)``.
    lr: ``a``'s learning rate, a float or an optax schedule.
    ratio: ``lr_b / lr_a``; the paper recommends 2**4 = 16.
    full: selector of fully-trained non-adapter leaves (see `labels`).
    full_lr: their learning rate.
    train_a: ``False`` freezes ``a`` (LoRA-FA).

  Examples:
    >>> tx = jlora.variants.loraplus_optimizer(optax.adamw, 2e-4, ratio=16)
    >>> opt_state = tx.init(lp)

  References:
    Hayou, Ghosh & Yu, "LoRA+: Efficient Low Rank Adaptation of Large
    Models", 2024. Zhang et al., "LoRA-FA: Memory-efficient Low-rank
    Adaptation for Large Language Models Fine-tuning", 2023.
  """
  transforms = {
      "lora_a": make_tx(lr),
      "lora_b": make_tx(_times(lr, ratio)),
      "lora_e": make_tx(lr),
      "lora_m": make_tx(_times(lr, ratio)),
      "full": make_tx(lr if full_lr is None else full_lr),
      "frozen": optax.set_to_zero(),
  }
  return optax.multi_transform(
      transforms, lambda tree: labels(tree, full=full, train_a=train_a))
