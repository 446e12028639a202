"""The masked next-token loss of packed batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def masked_cross_entropy(logits: jax.Array, targets: jax.Array,
                         loss_mask: jax.Array) -> jax.Array:
  """Mean cross-entropy over the tokens the mask counts.

    loss = sum_t m_t (logsumexp(z_t) - z_t[y_t]) / max(sum_t m_t, 1)

  Args:
    logits: (B, T, V) logits of the row's inputs.
    targets: (B, T) int next tokens.
    loss_mask: (B, T) 1 for a counted target, 0 for prompts and padding.

  Returns:
    float32 scalar; 0 when no token counts.

  Example:
    >>> logits = model.apply({"params": p}, b["input_ids"],
    ...                      segment_ids=b["segment_ids"], positions=b["positions"])
    >>> loss = masked_cross_entropy(logits, b["targets"], b["loss_mask"])
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)
  m = loss_mask.astype(jnp.float32)
  return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)
