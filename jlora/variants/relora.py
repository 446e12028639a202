"""ReLoRA: high-rank training from a sequence of merged low-rank restarts.

Every ``restart_every`` steps `restart` merges each adapter into its frozen
base (``w <- w + scale * a @ b``), draws a fresh adapter (``a`` random, ``b``
zero, so the model's function is unchanged) and magnitude-prunes the
optimizer's moments of ``a`` and ``b``; `jagged_schedule` is the learning
rate with a short re-warmup after each restart.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jlora.inject import init_adapter
from jlora.node import LoRA, is_lora

# Optimizer-state fields of a node that a restart prunes: the re-initialised
# factors. ``e`` and ``m`` keep their values across a restart, so their
# moments stay valid.
PRUNED_FIELDS = ("a", "b")


def prune_by_magnitude(x: jax.Array, fraction: float,
                       axes: tuple[int, ...] | None = None) -> jax.Array:
  """Zeroes all but the largest ``1 - fraction`` of `x`'s entries by |x|.

  The threshold is the `fraction` quantile of ``|x|`` over `axes` (default:
  the whole array); entries at or below it become 0 (ReLoRA's
  ``magnitude_pruning_``).
  """
  if fraction <= 0.0:
    return x
  if fraction >= 1.0:
    return jnp.zeros_like(x)
  mag = jnp.abs(x.astype(jnp.float32))
  threshold = jnp.quantile(mag, fraction, axis=axes, keepdims=True)
  return jnp.where(mag > threshold, x, jnp.zeros_like(x))


def prune_moments(opt_state: Any, fraction: float = 0.99,
                  fields: tuple[str, ...] = PRUNED_FIELDS) -> Any:
  """Magnitude-prunes every adapter moment held in an optax state.

  Optax states keep per-parameter moments (Adam's ``mu`` and ``nu``, a
  momentum trace) in trees shaped like the params, so each one holds `LoRA`
  nodes; their `fields` arrays are pruned with `prune_by_magnitude`, each
  matrix on its own (one threshold per stacked index, as for PyTorch's
  per-layer tensors). Everything else (step counts, moments of non-adapter
  leaves, masked placeholders) is kept.

  Examples:
    >>> opt_state = jlora.variants.prune_moments(opt_state, 0.99)
  """

  def prune(x: Any) -> Any:
    if not is_lora(x):
      return x
    new = {}
    for f in fields:
      v = getattr(x, f)
      if isinstance(v, jax.Array) and jnp.issubdtype(v.dtype, jnp.floating):
        new[f] = prune_by_magnitude(v, fraction, axes=(-2, -1))
    return dataclasses.replace(x, **new)

  return jax.tree.map(prune, opt_state, is_leaf=is_lora)


def restart(tree: Any, opt_state: Any, key: jax.Array,
            prune: float = 0.99) -> tuple[Any, Any]:
  """One ReLoRA restart: merge, re-initialise, prune the optimizer state.

  For each `LoRA` node: ``w <- materialize()`` (the fused kernel, DoRA gain
  included, in ``w``'s dtype), then ``a ~ U(-1/sqrt(in), 1/sqrt(in))`` as
  `jlora.apply` does and ``b = 0``. ``e`` and ``m`` are kept (with ``b = 0``
  the fused kernel is unchanged; a DoRA ``m`` equals the new base's column
  norms). The model's function is unchanged across the call.

  A quantized base comes back as a plain array in its dequantized dtype.

  Args:
    tree: a whole LoRA tree (`jlora.combine` a partition first).
    opt_state: the optimizer state over `tree` or over its trainable half.
    key: PRNG key for the new ``a``.
    prune: fraction of each adapter moment zeroed, by magnitude (the paper
      uses 0.99; 1.0 is a full reset, 0.0 keeps the moments).

  Returns:
    ``(tree, opt_state)``.

  Examples:
    >>> if step % restart_every == 0 and step > 0:
    ...   lp, opt_state = jlora.variants.restart(lp, opt_state, key)

  References:
    Lialin et al., "ReLoRA: High-Rank Training Through Low-Rank Updates",
    ICLR 2024.
  """
  leaves, treedef = jax.tree.flatten(tree, is_leaf=is_lora)
  keys = iter(jax.random.split(key, max(len(leaves), 1)))

  def renew(node: LoRA) -> LoRA:
    if node.a is None or node.b is None or node.w is None:
      raise ValueError(
          f"restart needs whole LoRA nodes but '{node.path}' is one half of a"
          " partition; pass jlora.combine(trainable, frozen)")
    fused = node.materialize()
    a, b = init_adapter(next(keys), fused, node.rank, node.layout,
                        node.a.dtype)
    return dataclasses.replace(node, w=fused, a=a, b=b.astype(node.b.dtype))

  tree = jax.tree.unflatten(
      treedef, [renew(x) if is_lora(x) else x for x in leaves])
  return tree, prune_moments(opt_state, prune)


def jagged_schedule(peak_value: float, total_steps: int, restart_every: int,
                    warmup_steps: int = 0, restart_warmup_steps: int = 0,
                    min_ratio: float = 0.1) -> optax.Schedule:
  """Cosine decay with a linear re-warmup after every restart (ReLoRA's).

  With ``c(s) = min_ratio + (1 - min_ratio) * (1 + cos(pi * p(s))) / 2`` and
  ``p(s) = clip((s - warmup_steps) / (total_steps - warmup_steps), 0, 1)``::

      lr(s) = peak * s / warmup_steps                      s < warmup_steps
      lr(s) = peak * c(t + W) * (s - t) / W                t <= s < t + W
      lr(s) = peak * c(s)                                  otherwise

  where ``t = restart_every * floor(s / restart_every) > 0`` is the last
  restart and ``W = restart_warmup_steps``: after each restart the rate
  climbs linearly from 0 back to the cosine envelope in ``W`` steps. Call
  `restart` at the same steps (``s % restart_every == 0``, ``s > 0``).

  Examples:
    >>> lr = jlora.variants.jagged_schedule(1e-3, 10_000, 1_000, 100, 50)
    >>> tx = optax.adamw(lr)

  References:
    Lialin et al., "ReLoRA: High-Rank Training Through Low-Rank Updates",
    ICLR 2024.
  """
  if restart_every <= 0 or total_steps <= warmup_steps:
    raise ValueError(
        f"need restart_every > 0 and total_steps > warmup_steps, got"
        f" restart_every={restart_every}, total_steps={total_steps},"
        f" warmup_steps={warmup_steps}")
  if restart_warmup_steps >= restart_every:
    raise ValueError(
        f"restart_warmup_steps={restart_warmup_steps} must be below"
        f" restart_every={restart_every}")
  span = float(total_steps - warmup_steps)

  def envelope(s):
    p = jnp.clip((s - warmup_steps) / span, 0.0, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + jnp.cos(math.pi * p))

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    last = jnp.floor(s / restart_every) * restart_every
    since = s - last
    lr = envelope(s)
    if restart_warmup_steps:
      rewarm = envelope(last + restart_warmup_steps) * (
          since / restart_warmup_steps)
      lr = jnp.where((last > 0) & (since < restart_warmup_steps), rewarm, lr)
    if warmup_steps:
      lr = jnp.where(s < warmup_steps, s / warmup_steps, lr)
    return peak_value * lr

  return schedule
