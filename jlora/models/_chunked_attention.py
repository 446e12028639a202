"""Causal attention in blocks, memory linear in sequence length, in plain XLA.

The flash-attention algorithm written with `lax` loops, for backends without
a fused kernel (CPU, TPU) and as the reference of what a fused kernel keeps:
queries and keys are cut into blocks of `block` tokens; each query block
visits only the key blocks that its causal window reaches, keeping a running
maximum m, normaliser l and weighted sum acc (online softmax),

  m' = max(m, max_s z_s),  l' = l e^(m - m') + sum_s e^(z_s - m'),
  acc' = acc e^(m - m') + sum_s e^(z_s - m') v_s,   out = acc / l,

so no (T, T) score matrix exists. The backward pass (`jax.custom_vjp`) keeps
only q, k, v, the output and the log-sum-exp lse = m + log l per query, and
recomputes each block's probabilities p = e^(z - lse):

  D = rowsum(dO * O),  dv = p^T dO,  ds = p (dO v^T - D),
  dq = scale ds k,  dk = scale ds^T q

(with a soft-cap c, z = c tanh(raw / c) and ds is multiplied by
1 - (z / c)^2). Products take the inputs' dtype with float32 accumulation, as
cuDNN's kernel does.

References:
  Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention with
  IO-Awareness" (2022); Rabe and Staats, "Self-attention Does Not Need O(n^2)
  Memory" (2021).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

DEFAULT_BLOCK = 512


def causal_attention(q, k, v, *, scale: float, window, softcap=None,
                     segment_ids=None, block: int | None = None):
  """Causal softmax attention of q (B,T,N,D) over k/v (B,T,K,D) -> (B,T,N,D).

  A query at slot t sees key slots s with 0 <= t - s < window (`window` a
  Python int or a traced int32 scalar; a huge value for no window) and, given
  `segment_ids` (B, T) int, only keys of its own document: equal non-zero
  ids (0 marks padding, which sees nothing and outputs zeros). Grouped
  queries: the N // K query heads of a group share one k/v head. T need not
  divide by `block` (default `DEFAULT_BLOCK`; the tail is padded, and padded
  keys lie after every real query, so causality hides them).

  Example:
    >>> q = k = v = jnp.ones((1, 1000, 4, 64), jnp.bfloat16)
    >>> out = causal_attention(q, k, v, scale=64 ** -0.5, window=2 ** 31 - 1)
    >>> out.shape  # (1, 1000, 4, 64), no (1000, 1000) scores on the way
  """
  b, t, n, d = q.shape
  kv = k.shape[2]
  if k.shape[:2] != (b, t) or v.shape != k.shape or n % kv:
    raise ValueError(
      f"chunked attention needs q (B,T,N,D) and k, v (B,T,K,D) with K "
      f"dividing N; got q {q.shape}, k {k.shape}, v {v.shape}"
    )
  blk = min(block or DEFAULT_BLOCK, t)
  pad = -t % blk
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
  nb = (t + pad) // blk
  q6 = q.reshape(b, nb, blk, kv, n // kv, d)
  k5 = k.reshape(b, nb, blk, kv, d)
  v5 = v.reshape(b, nb, blk, kv, d)
  window = jnp.asarray(window, jnp.int32)
  if segment_ids is None:
    seg = None
  else:
    seg = jnp.pad(jnp.asarray(segment_ids, jnp.int32), ((0, 0), (0, pad)))
    seg = seg.reshape(b, nb, blk)
  cap = None if softcap is None else float(softcap)
  out = _attention(q6, k5, v5, window, seg, float(scale), cap)
  return out.reshape(b, nb * blk, n, d)[:, :t]


def _visible(i, j, blk, window):
  """(blk, blk) bool: query block i's slots that see key block j's slots."""
  qpos = i * blk + jnp.arange(blk)
  kpos = j * blk + jnp.arange(blk)
  dist = qpos[:, None] - kpos[None, :]
  return (dist >= 0) & (dist < window)


def _first_key_block(i, blk, window):
  """The first key block that any query of block i sees."""
  first_slot = jnp.maximum(i * blk - (window - 1), 0)
  return first_slot // blk


def _last_query_block(j, blk, window, nb):
  """One past the last query block that sees any key of block j."""
  last_slot = (j + 1) * blk - 1 + jnp.minimum(window - 1, nb * blk)
  return jnp.minimum(last_slot // blk + 1, nb)


def _scores(qi, kj, i, j, window, seg, scale, cap):
  """Capped scores (B, K, G, bq, bk) f32, masked to -inf, and the raw cap
  ratio z / c (for the cap's derivative) or None."""
  z = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj,
                 preferred_element_type=jnp.float32) * scale
  ratio = None
  if cap is not None:
    ratio = jnp.tanh(z / cap)
    z = cap * ratio
  blk = qi.shape[1]
  visible = _visible(i, j, blk, window)[None]
  if seg is not None:
    si, sj = seg[:, i], seg[:, j]
    visible = visible & ((si[:, :, None] == sj[:, None, :])
                         & (si != 0)[:, :, None])
  z = jnp.where(visible[:, None, None], z, -jnp.inf)
  return z, ratio


def _forward(q6, k5, v5, window, seg, scale, cap):
  nb, blk = q6.shape[1], q6.shape[2]

  def query_block(i):
    qi = q6[:, i]
    b, _, kv, g, d = qi.shape
    m0 = jnp.full((b, kv, g, blk), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((b, kv, g, blk), jnp.float32)
    acc0 = jnp.zeros((b, blk, kv, g, d), jnp.float32)

    def step(j, carry):
      m, l, acc = carry
      z, _ = _scores(qi, k5[:, j], i, j, window, seg, scale, cap)
      m_new = jnp.maximum(m, jnp.max(z, axis=-1))
      # Rows that have seen no key yet keep m = -inf; shift them by 0.
      shift = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
      p = jnp.exp(z - shift[..., None])
      corr = jnp.exp(m - shift)
      l = l * corr + jnp.sum(p, axis=-1)
      pv = jnp.einsum("bkgqs,bskd->bqkgd", p.astype(v5.dtype), v5[:, j],
                      preferred_element_type=jnp.float32)
      acc = acc * jnp.moveaxis(corr, -1, 1)[..., None] + pv
      return m_new, l, acc

    lo = _first_key_block(i, blk, window)
    m, l, acc = lax.fori_loop(lo, i + 1, step, (m0, l0, acc0))
    # A query that sees no key (padding) has l = 0: output 0, and lse 0 so
    # that the backward pass's e^(z - lse) is e^-inf = 0, not NaN.
    empty = l == 0
    out = acc / jnp.moveaxis(jnp.where(empty, 1.0, l), -1, 1)[..., None]
    lse = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))
    return out.astype(q6.dtype), lse

  out, lse = lax.map(query_block, jnp.arange(nb))
  # (nb, B, blk, K, G, D) -> (B, nb, blk, K, G, D); lse (nb, B, K, G, blk).
  return jnp.moveaxis(out, 0, 1), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q6, k5, v5, window, seg, scale, cap):
  return _forward(q6, k5, v5, window, seg, scale, cap)[0]


def _attention_fwd(q6, k5, v5, window, seg, scale, cap):
  out, lse = _forward(q6, k5, v5, window, seg, scale, cap)
  return out, (q6, k5, v5, window, seg, out, lse)


def _attention_bwd(scale, cap, res, dout):
  q6, k5, v5, window, seg, out, lse = res
  nb, blk = q6.shape[1], q6.shape[2]
  # D_t = sum_d dO * O, per query and head: (nb, B, K, G, blk) like lse.
  big_d = jnp.einsum("bnqkgd,bnqkgd->nbkgq", dout.astype(jnp.float32),
                     out.astype(jnp.float32))
  dq0 = jnp.zeros(q6.shape, jnp.float32)

  def key_block(dq, j):
    kj, vj = k5[:, j], v5[:, j]

    def step(i, carry):
      dq, dk, dv = carry
      qi, doi = q6[:, i], dout[:, i]
      z, ratio = _scores(qi, kj, i, j, window, seg, scale, cap)
      p = jnp.exp(z - lse[i][..., None])
      dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(doi.dtype), doi,
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj,
                      preferred_element_type=jnp.float32)
      ds = p * (dp - big_d[i][..., None])
      if ratio is not None:
        ds = ds * (1.0 - ratio * ratio)
      ds = (ds * scale).astype(qi.dtype)
      dq_i = jnp.einsum("bkgqs,bskd->bqkgd", ds, kj,
                        preferred_element_type=jnp.float32)
      dq = lax.dynamic_update_index_in_dim(dq, dq[:, i] + dq_i, i, 1)
      dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qi,
                           preferred_element_type=jnp.float32)
      return dq, dk, dv

    zeros = jnp.zeros(kj.shape, jnp.float32)
    hi = _last_query_block(j, blk, window, nb)
    dq, dk, dv = lax.fori_loop(j, hi, step, (dq, zeros, zeros))
    return dq, (dk.astype(k5.dtype), dv.astype(v5.dtype))

  dq, (dk, dv) = lax.scan(key_block, dq0, jnp.arange(nb))
  dk, dv = jnp.moveaxis(dk, 0, 1), jnp.moveaxis(dv, 0, 1)
  return dq.astype(q6.dtype), dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
