"""Next-token cross-entropy that never holds the (tokens, vocab) logits whole.

A causal LM's last matmul, hidden (N, H) @ head (H, V), makes the largest
activation of a training step: at the Llama-3-8B shape (V = 128256) and 4096
tokens its float32 logits are 2 GiB, and log-softmax and its gradient add as
much again. `chunked_cross_entropy` computes the loss over `chunk_size` tokens
at a time, and in the same pass computes the loss's gradient with respect to
the hidden states (and to the head, when the head is being trained), so the
backward pass only scales stored gradients: the logits are computed once, never
stored whole, and never recomputed.

Examples:
  >>> h = model.apply({"params": p}, inputs, return_hidden=True)
  >>> loss = chunked_cross_entropy(h, p["lm_head"]["kernel"], labels,
  ...                              chunk_size=1024)
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from jlora import _fp8

__all__ = ["causal_lm_loss", "chunked_cross_entropy"]


def chunked_cross_entropy(
  hidden: jax.Array,
  head: jax.Array,
  labels: jax.Array,
  *,
  chunk_size: int = 1024,
  where: jax.Array | None = None,
  head_layout: str | None = None,
  reduction: str = "mean",
  softcap: float | None = None,
) -> jax.Array:
  """Softmax cross-entropy of `hidden @ head` against integer `labels`.

  With logits z = h @ W (float32 accumulation) for each token, soft-capped to
  z = c * tanh(z / c) when `softcap` = c is given (Gemma 2's
  final_logit_softcapping),

    loss_t = logsumexp(z_t) - z_t[label_t],

  and the result is sum_t w_t loss_t / sum_t w_t for `reduction="mean"`
  (w = `where`, default all ones; 0 when no token counts) or sum_t w_t loss_t
  for "sum". Tokens are taken `chunk_size` at a time (`lax.scan`); per chunk the
  forward pass also forms dz = softmax(z) - onehot(label) and the gradients
  dz @ W^T (and h^T @ dz when W is differentiated), so peak memory holds one
  chunk's (chunk_size, V) float32 logits instead of all of them, and the
  backward pass does no matmul.

  Args:
    hidden: (..., H) final hidden states (after the final norm), any float
      dtype; the matmuls take `hidden.dtype` operands (bf16 on GPU) with
      float32 accumulation.
    head: the output projection, either a kernel (H, V) (`lm_head/kernel`) or a
      tied embedding (V, H) (`embed_tokens/embedding`); which one is read from
      the shapes, or from `head_layout` ("kernel" or "embedding") when
      H == V. A frozen FP8 kernel (``jlora.quant.quantize_fp8(params,
      targets=...lm_head...)``) runs both its products (the logits and the
      hidden states' gradient) in FP8 where `jlora.wrap` would.
    labels: (...) integer targets in [0, V).
    chunk_size: tokens per chunk; the token count is padded up to a multiple
      (padding is masked out).
    where: optional (...) mask; False (0) drops a token (padding, prompt
      tokens). A float mask weights tokens.
    head_layout: "kernel" or "embedding"; needed only when H == V.
    reduction: "mean" over counted tokens, or "sum".
    softcap: the final logit soft-cap c, or None; `causal_lm_loss` passes the
      model's own.

  Returns:
    float32 scalar loss.

  Examples:
    >>> loss = chunked_cross_entropy(h, params["lm_head"]["kernel"], labels)
    >>> grads = jax.grad(loss_fn)(trainable)  # no (tokens, vocab) residual

  References:
    The loss is the usual one; computing it blockwise with its gradient in the
    forward pass follows Hsu et al., "Liger Kernel: Efficient Triton Kernels
    for LLM Training" (2024), and Wijmans et al., "Cut Your Losses in
    Large-Vocabulary Language Models" (2024).
  """
  if reduction not in ("mean", "sum"):
    raise ValueError(f"reduction={reduction!r}; use 'mean' or 'sum'")
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size}; use a positive token count")
  h_dim = hidden.shape[-1]
  if labels.shape != hidden.shape[:-1]:
    raise ValueError(
      f"labels have shape {labels.shape} but hidden has {hidden.shape}; "
      "labels need hidden's shape without its last (feature) axis"
    )
  if where is not None and where.shape != labels.shape:
    raise ValueError(
      f"where has shape {where.shape}, expected the labels' {labels.shape}"
    )
  transpose = _head_is_embedding(head, h_dim, head_layout)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integers, got dtype {labels.dtype}")

  n = labels.size
  h = hidden.reshape(n, h_dim)
  y = labels.reshape(n).astype(jnp.int32)
  w = (
    jnp.ones((n,), jnp.float32)
    if where is None
    else where.reshape(n).astype(jnp.float32)
  )
  chunk = min(chunk_size, n)
  pad = -n % chunk
  if pad:
    h = jnp.pad(h, ((0, pad), (0, 0)))
    y = jnp.pad(y, (0, pad))
    w = jnp.pad(w, (0, pad))
  denom = jnp.sum(w) if reduction == "mean" else jnp.float32(1.0)
  # Scale before the loop so that per-chunk gradients come out final.
  w = w / jnp.maximum(denom, jnp.finfo(jnp.float32).tiny)
  if softcap is not None:
    softcap = float(softcap)
  return _ce(h, head, y, w, chunk, transpose, softcap)


def causal_lm_loss(
  config,
  params,
  hidden: jax.Array,
  labels: jax.Array,
  *,
  where: jax.Array | None = None,
  chunk_size: int = 1024,
  reduction: str = "mean",
) -> jax.Array:
  """`chunked_cross_entropy` with the model's own head and final soft-cap.

  Reads the head from `params` (`lm_head/kernel`, or the tied
  `model/embed_tokens/embedding`) and the soft-cap from
  `config.final_softcap`, so hidden states from `return_hidden=True` give the
  loss of the model's own logits for every family.

  Args:
    config: the model's `ModelConfig` (`model.config`).
    params: the model's parameters (combined, not factored: the head must be
      an array).
    hidden, labels, where, chunk_size, reduction: as `chunked_cross_entropy`.

  Examples:
    >>> h = model.apply({"params": p}, x, return_hidden=True)
    >>> loss = causal_lm_loss(model.config, p, h, y, where=loss_mask)
  """
  if config.tie_word_embeddings:
    head, layout = params["model"]["embed_tokens"]["embedding"], "embedding"
  else:
    head, layout = params["lm_head"]["kernel"], "kernel"
  return chunked_cross_entropy(
    hidden, head, labels, chunk_size=chunk_size, where=where,
    head_layout=layout, reduction=reduction, softcap=config.final_softcap,
  )


def _head_is_embedding(head, h_dim: int, layout: str | None) -> bool:
  if head.ndim != 2:
    raise ValueError(
      f"head has shape {head.shape}; pass a 2-D kernel (hidden, vocab) or "
      "embedding (vocab, hidden)"
    )
  if layout is not None:
    if layout not in ("kernel", "embedding"):
      raise ValueError(
        f"head_layout={layout!r}; use 'kernel' (hidden, vocab) or "
        "'embedding' (vocab, hidden)"
      )
    expected = 1 if layout == "embedding" else 0
    if head.shape[expected] != h_dim:
      raise ValueError(
        f"head_layout={layout!r} but head has shape {head.shape} and hidden "
        f"size {h_dim}"
      )
    return layout == "embedding"
  rows, cols = head.shape
  if rows == h_dim and cols == h_dim:
    raise ValueError(
      f"head has shape {head.shape}, square with hidden size {h_dim}: pass "
      "head_layout='kernel' (lm_head/kernel) or 'embedding' (tied "
      "embed_tokens/embedding)"
    )
  if rows == h_dim:
    return False
  if cols == h_dim:
    return True
  raise ValueError(
    f"head has shape {head.shape} but hidden size is {h_dim}; pass "
    "lm_head/kernel (hidden, vocab) or embed_tokens/embedding (vocab, hidden)"
  )


def _head_product(h, head, transpose: bool):
  """(c, H) @ head -> (c, V) float32. An FP8 head (`jlora.quant`) runs the
  FP8 product, whose gradient for `h` runs in FP8 too."""
  dims = (((1,), (1,)) if transpose else ((1,), (0,)), ((), ()))

  def dense(x, w):
    return lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)

  if _fp8.is_fp8(head):
    return _fp8.dot_general(
      h, head, True,
      {"dimension_numbers": dims, "preferred_element_type": jnp.float32},
      dense)
  return dense(h, head.astype(h.dtype))


def _logits(h, head, transpose: bool, softcap=None):
  """(c, H) @ head -> (c, V) float32 logits, and d capped / d raw (or None)."""
  return _capped(_head_product(h, head, transpose), softcap)


def _capped(z, softcap):
  if softcap is None:
    return z, None
  u = jnp.tanh(z / softcap)
  return softcap * u, 1 - u * u


def _chunks(x, chunk):
  """(n, ...) -> (n // chunk, chunk, ...), chunk i holding tokens i, i + m,
  i + 2m, ... (m = n // chunk).

  Strided, not contiguous: under data parallelism the token axis is sharded in
  contiguous blocks, and so stays each chunk's own token axis, so every device
  computes the loss of its own tokens. A contiguous chunk would live on one
  device, and the scan would gather every chunk to every device.
  """
  m = x.shape[0] // chunk
  return jnp.moveaxis(x.reshape(chunk, m, *x.shape[1:]), 1, 0)


def _unchunk(x):
  """Inverse of `_chunks`: (m, chunk, ...) -> (m * chunk, ...)."""
  return jnp.moveaxis(x, 0, 1).reshape(-1, *x.shape[2:])


def _loss_only(h, head, y, w, chunk, transpose, softcap):
  def body(total, xs):
    h_c, y_c, w_c = xs
    z, _ = _logits(h_c, head, transpose, softcap)
    lse = jax.nn.logsumexp(z, axis=-1)
    picked = jnp.take_along_axis(z, y_c[:, None], axis=-1)[:, 0]
    return total + jnp.sum((lse - picked) * w_c), None

  total, _ = lax.scan(
    body, jnp.float32(0), (_chunks(h, chunk), _chunks(y, chunk),
                           _chunks(w, chunk))
  )
  return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ce(h, head, y, w, chunk, transpose, softcap):
  return _loss_only(h, head, y, w, chunk, transpose, softcap)


def _ce_fwd(h, head, y, w, chunk, transpose, softcap):
  # symbolic_zeros: each argument arrives as CustomVJPPrimal(value, perturbed),
  # so the head gradient (an (H, V) float32 accumulator and one more matmul per
  # chunk) is formed only when the head is being trained.
  want_dh, want_dw = h.perturbed, _perturbed(head)
  h, y, w = h.value, y.value, w.value
  head = jax.tree.map(lambda p: p.value, head, is_leaf=_is_primal)
  fp8 = _fp8.is_fp8(head)
  if fp8 and want_dw:
    raise TypeError(
      "the loss is being differentiated with respect to an FP8 head, which "
      "is frozen (its e4m3 values get no gradient); differentiate with "
      "respect to the adapters only (jlora.partition)")
  head_c = head if fp8 else head.astype(h.dtype)

  def body(carry, xs):
    total, dw = carry
    h_c, y_c, w_c = xs
    if fp8 and want_dh:  # the FP8 product's own input gradient
      z, head_vjp = jax.vjp(lambda h_c: _head_product(h_c, head_c, transpose),
                            h_c)
      z, dcap = _capped(z, softcap)
    else:
      z, dcap = _logits(h_c, head_c, transpose, softcap)
    lse = jax.nn.logsumexp(z, axis=-1)
    picked = jnp.take_along_axis(z, y_c[:, None], axis=-1)[:, 0]
    total = total + jnp.sum((lse - picked) * w_c)
    # d loss / d z = w_t (softmax(z_t) - onehot(label_t)) (times the cap's
    # derivative 1 - tanh^2), in the operands' dtype for the gradient matmuls
    # (float32 accumulation).
    onehot = y_c[:, None] == lax.broadcasted_iota(jnp.int32, z.shape, 1)
    dz = (jnp.exp(z - lse[:, None]) - onehot) * w_c[:, None]
    if dcap is not None:
      dz = dz * dcap
    dh = None
    if fp8 and want_dh:
      return (total, dw), head_vjp(dz)[0].astype(h.dtype)
    dz = dz.astype(h.dtype)
    if want_dh:
      dims = ((1,), (0,)) if transpose else ((1,), (1,))
      dh = lax.dot_general(
        dz, head_c, (dims, ((), ())), preferred_element_type=jnp.float32
      ).astype(h.dtype)
    if want_dw:
      # kernel (H, V): h^T dz; embedding (V, H): dz^T h.
      a, b = (dz, h_c) if transpose else (h_c, dz)
      dw = dw + lax.dot_general(
        a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
      )
    return (total, dw), dh

  dw0 = jnp.zeros(head.shape, jnp.float32) if want_dw else None
  (total, dw), dh = lax.scan(
    body, (jnp.float32(0), dw0),
    (_chunks(h, chunk), _chunks(y, chunk), _chunks(w, chunk)),
  )
  if want_dh:
    dh = _unchunk(dh)
  if want_dw:
    dw = dw.astype(head.dtype)
  return total, (dh, dw)


def _is_primal(x) -> bool:
  return isinstance(x, CustomVJPPrimal)


def _perturbed(arg) -> bool:
  """Whether any leaf of a custom_vjp argument (symbolic zeros) is."""
  return any(p.perturbed for p in jax.tree.leaves(arg, is_leaf=_is_primal))


def _ce_bwd(chunk, transpose, softcap, res, g):
  del chunk, transpose, softcap
  dh, dw = res
  if isinstance(g, SymbolicZero):
    return None, None, None, None
  g = jnp.asarray(g, jnp.float32)
  dh = None if dh is None else (dh * g).astype(dh.dtype)
  dw = None if dw is None else (dw * g).astype(dw.dtype)
  # Integer labels take no cotangent; the weights (where) are data.
  return dh, dw, None, None


_ce.defvjp(_ce_fwd, _ce_bwd, symbolic_zeros=True)
