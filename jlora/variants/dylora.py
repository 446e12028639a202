"""DyLoRA: train one adapter for every rank in [r_min, r_max] at once.

Each step samples a rank ``k`` and trains the adapter truncated to its first
``k`` ranks; after training, `truncate` cuts it to any rank in range. The
update at rank ``k`` is (DyLoRA's eq. with ``alpha / k``, rsLoRA's
``alpha / sqrt(k)`` for an ``rslora`` node)::

    delta_k = (alpha / k) * a[..., :k] @ b[..., :k, :]

so a truncated node keeps its ``alpha`` and its `scale` property recomputes
for the new rank. In a jitted training step the rank is a traced value and
shapes must stay static: `mask_rank` keeps the full-rank arrays and zeroes
ranks ``>= k`` (their gradients are zero too), which is the same function.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jlora.node import LoRA, is_lora


def _check_node(node: LoRA, what: str) -> None:
  if node.a is None or node.b is None:
    raise ValueError(
        f"{what} needs the adapter arrays a and b but '{node.path}' has none;"
        " call it on the trainable half or on jlora.combine(trainable,"
        " frozen)")


def truncate(tree: Any, rank: int) -> Any:
  """Every LoRA node cut to its first ``min(rank, node.rank)`` ranks.

  ``a[..., :k]``, ``b[..., :k, :]`` and ``e[..., :k]`` (when present);
  ``alpha`` is kept, so ``scale`` becomes ``alpha / k`` (``alpha / sqrt(k)``
  with rsLoRA), as DyLoRA evaluates a lower rank. Works on a whole tree or
  on the trainable half.

  Args:
    tree: a LoRA tree trained with `sample` / `mask_rank`.
    rank: the new rank, a positive Python int.

  Examples:
    >>> small = jlora.variants.truncate(lp, 2)
    >>> jax.tree.leaves(small)[1].shape   # a: (in, 2)

  References:
    Valipour et al., "DyLoRA: Parameter-Efficient Tuning of Pre-trained
    Models using Dynamic Search-Free Low-Rank Adaptation", EACL 2023.
  """
  if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
    raise ValueError(
        f"truncate needs a positive Python int rank, got {rank!r}; inside"
        " jit use jlora.variants.mask_rank, which keeps static shapes")

  def cut(node: Any) -> Any:
    if not is_lora(node):
      return node
    _check_node(node, "truncate")
    k = min(rank, node.rank)
    return dataclasses.replace(
        node, a=node.a[..., :k], b=node.b[..., :k, :],
        e=None if node.e is None else node.e[..., :k])

  return jax.tree.map(cut, tree, is_leaf=is_lora)


def _rank_gains(node: LoRA, rank, only_last: bool):
  r = node.rank
  k = jnp.clip(jnp.asarray(rank), 1, r)
  idx = jnp.arange(r)
  # scale(k) / scale(r), so that the full-rank node's own scale times the
  # gain gives the scale of the truncated node.
  kf = k.astype(jnp.float32)
  ratio = jnp.sqrt(r / kf) if node.rslora else r / kf
  gains = jnp.where(idx < k, ratio, 0.0)
  live = (idx == k - 1) if only_last else None
  return gains, live


def mask_rank(tree: Any, rank: Any, *, only_last: bool = False) -> Any:
  """The function of ``truncate(tree, rank)`` with static shapes.

  Column ``j`` of ``a`` is multiplied by ``scale(k) / scale(r)`` for
  ``j < k = min(rank, r)`` and by 0 otherwise, so the wrapped forward pass
  and the merged kernel equal those of the truncated node, and the masked
  ranks get zero gradients. `rank` may be a traced int (one rank for every
  node, clipped to each node's rank).

  Args:
    tree: a whole LoRA tree (use it inside the loss, on the combined tree).
    rank: int or int array, the sampled rank ``k``.
    only_last: train only the ``k``-th rank (the paper's "frozen" mode):
      ranks below ``k`` are used but get no gradient.

  Examples:
    >>> def loss(t, k):
    ...   return mse(forward({"params": jlora.variants.mask_rank(t, k)}, x), y)
  """

  def mask(node: Any) -> Any:
    if not is_lora(node):
      return node
    _check_node(node, "mask_rank")
    gains, live = _rank_gains(node, rank, only_last)
    a, b = node.a, node.b
    if live is not None:
      a = jnp.where(live, a, jax.lax.stop_gradient(a))
      b = jnp.where(live[:, None], b, jax.lax.stop_gradient(b))
    return dataclasses.replace(node, a=a * gains.astype(a.dtype), b=b)

  return jax.tree.map(mask, tree, is_leaf=is_lora)


def max_rank(tree: Any) -> int:
  """The largest adapter rank in `tree`."""
  ranks = [x.rank for x in jax.tree.leaves(tree, is_leaf=is_lora)
           if is_lora(x)]
  if not ranks:
    raise ValueError("the tree holds no LoRA nodes; call jlora.apply first")
  return max(ranks)


def sample_rank(key: jax.Array, r_min: int, r_max: int) -> jax.Array:
  """A rank drawn uniformly from {r_min, ..., r_max} (an int32 scalar)."""
  if not 1 <= r_min <= r_max:
    raise ValueError(f"need 1 <= r_min <= r_max, got r_min={r_min},"
                     f" r_max={r_max}")
  return jax.random.randint(key, (), r_min, r_max + 1)


def sample(tree: Any, key: jax.Array, r_min: int = 1, r_max: int | None = None,
           *, only_last: bool = False) -> tuple[Any, jax.Array]:
  """One DyLoRA step's adapter: samples ``k`` and masks the tree to it.

  Args:
    tree: a whole LoRA tree.
    key: PRNG key for this step.
    r_min, r_max: the rank range; `r_max` defaults to the largest rank.
    only_last: see `mask_rank`.

  Returns:
    ``(masked_tree, k)``.

  Examples:
    >>> def loss(t, key):
    ...   t, _ = jlora.variants.sample(t, key, r_min=1)
    ...   return mse(forward({"params": t}, x), y)
  """
  r_max = max_rank(tree) if r_max is None else r_max
  k = sample_rank(key, r_min, r_max)
  return mask_rank(tree, k, only_last=only_last), k

