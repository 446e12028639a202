"""Chunked (flash-style) attention against dense float64 NumPy attention.

`causal_attention` never builds the (T, T) score matrix; its values and its
custom backward pass must still be softmax attention's: checked here with
windows shorter than the sequence, soft-capping, grouped-query heads, packed
documents with padding, and T not a multiple of the block, in float32 and
within bf16 rounding in bf16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jlora.models._attention import NO_WINDOW
from jlora.models._chunked_attention import causal_attention


def np_attention(q, k, v, dout, *, scale, window, softcap, seg):
  """float64 dense attention and its gradients (q, k, v) for cotangent dout.

  q (B,T,N,D), k/v (B,T,K,D); a query with no visible key outputs 0.
  """
  q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
  b, t, n, d = q.shape
  g = n // k.shape[2]
  kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # (B,T,N,D)
  s = np.einsum("btnd,bsnd->bnts", q, kr) * scale
  z = s if softcap is None else softcap * np.tanh(s / softcap)
  dist = np.arange(t)[:, None] - np.arange(t)[None, :]
  vis = np.broadcast_to((dist >= 0) & (dist < window), (b, t, t))
  if seg is not None:
    seg = np.asarray(seg)
    vis = vis & (seg[:, :, None] == seg[:, None, :]) & (seg != 0)[:, :, None]
  vis = vis[:, None]
  zf = np.where(vis, z, 0)  # finite, for the cap's derivative
  z = np.where(vis, z, -np.inf)
  m = np.max(z, axis=-1, keepdims=True)
  e = np.where(vis, np.exp(z - np.where(np.isinf(m), 0, m)), 0)
  den = e.sum(-1, keepdims=True)
  p = e / np.where(den == 0, 1, den)
  out = np.einsum("bnts,bsnd->btnd", p, vr)
  dv = np.einsum("bnts,btnd->bsnd", p, dout)
  dp = np.einsum("btnd,bsnd->bnts", dout, vr)
  dz = p * (dp - (dp * p).sum(-1, keepdims=True))
  ds = dz if softcap is None else dz * (1 - (zf / softcap) ** 2)
  ds = np.where(vis, ds, 0) * scale
  dq = np.einsum("bnts,bsnd->btnd", ds, kr)
  dk = np.einsum("bnts,btnd->bsnd", ds, q)
  fold = lambda x: x.reshape(b, t, k.shape[2], g, d).sum(3)  # noqa: E731
  return out, (dq, fold(dk), fold(dv))


def run(q, k, v, dout, **kw):
  """Chunked attention's output and (dq, dk, dv) for cotangent dout, jitted."""
  def f(q, k, v):
    return causal_attention(q, k, v, **kw)
  out, vjp = jax.jit(lambda *a: jax.vjp(f, *a))(q, k, v)
  return out, vjp(dout)


def inputs(b, t, n, kv, d, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, n, d), dtype)
  k = jax.random.normal(keys[1], (b, t, kv, d), dtype)
  v = jax.random.normal(keys[2], (b, t, kv, d), dtype)
  dout = jax.random.normal(keys[3], (b, t, n, d), dtype)
  return q, k, v, dout


def max_rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.max(np.abs(got - want)) / np.max(np.abs(want))


CASES = {
  # name: (t, n, kv, block, window, softcap, packed)
  "causal": (16, 2, 2, 4, None, None, False),
  "tail_block": (13, 4, 2, 4, None, None, False),
  "window": (19, 4, 1, 4, 6, None, False),
  "window_one_block": (12, 2, 1, 4, 4, None, False),
  "softcap": (11, 4, 2, 3, None, 2.0, False),
  "window_softcap_gqa": (17, 6, 2, 5, 7, 3.0, False),
  "packed_padded": (15, 4, 2, 4, None, None, True),
  "packed_window": (15, 4, 2, 4, 5, 2.5, True),
}


def segments(b, t):
  """Rows of documents with trailing padding (0), one row unpacked."""
  rows = [[1] * t]
  cut = [1] * (t // 3) + [2] * (t // 3) + [3] * 2
  rows.append(cut + [0] * (t - len(cut)))
  return np.asarray((rows * b)[:b], np.int32)


# One case in the fast tier keeps the module covered there.
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.fast_tier) if n == "causal" else n
    for n in CASES])
def test_values_and_grads_equal_dense_float64(name):
  t, n, kv, block, window, softcap, packed = CASES[name]
  b, d = 2, 8
  q, k, v, dout = inputs(b, t, n, kv, d, jnp.float32)
  seg = segments(b, t) if packed else None
  scale = d ** -0.5
  out, grads = run(q, k, v, dout, scale=scale, softcap=softcap, block=block,
                   window=NO_WINDOW if window is None else window,
                   segment_ids=None if seg is None else jnp.asarray(seg))
  want, want_grads = np_attention(q, k, v, dout, scale=scale,
                                  window=window or t, softcap=softcap, seg=seg)
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
  for got, ref in zip(grads, want_grads):
    np.testing.assert_allclose(got, ref, atol=5e-5, rtol=5e-5)
  assert np.all(np.isfinite(np.asarray(grads[0])))


def test_traced_window_equals_static_window():
  q, k, v, dout = inputs(1, 14, 2, 1, 8, jnp.float32, seed=3)
  kw = dict(scale=0.3, block=4)
  static = run(q, k, v, dout, window=5, **kw)
  traced = jax.jit(lambda w: run(q, k, v, dout, window=w, **kw))(
    jnp.int32(5))
  for a, b in zip(jax.tree.leaves(static), jax.tree.leaves(traced)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bf16_within_bf16_rounding():
  t, n, kv, d = 37, 4, 2, 16
  q, k, v, dout = inputs(1, t, n, kv, d, jnp.bfloat16, seed=5)
  out, grads = run(q, k, v, dout, scale=d ** -0.5, window=NO_WINDOW, block=8)
  assert out.dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
  want, want_grads = np_attention(q, k, v, dout, scale=d ** -0.5, window=t,
                                  softcap=None, seg=None)
  assert max_rel(out, want) < 2e-2
  for got, ref in zip(grads, want_grads):
    assert max_rel(got, ref) < 3e-2


@settings(max_examples=4, deadline=None)
@given(t=st.integers(1, 23), block=st.integers(1, 9),
       window=st.one_of(st.none(), st.integers(1, 12)),
       group=st.sampled_from([1, 2, 3]))
def test_any_shape_equals_dense(t, block, window, group):
  q, k, v, dout = inputs(1, t, 2 * group, 2, 4, jnp.float32, seed=t)
  out, grads = run(q, k, v, dout, scale=0.5, block=block,
                   window=NO_WINDOW if window is None else window)
  want, want_grads = np_attention(q, k, v, dout, scale=0.5,
                                  window=window or t, softcap=None, seg=None)
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
  for got, ref in zip(grads, want_grads):
    np.testing.assert_allclose(got, ref, atol=5e-5, rtol=5e-5)


def test_mismatched_shapes_raise():
  q, k, v, _ = inputs(1, 8, 3, 2, 4, jnp.float32)
  with pytest.raises(ValueError, match="K dividing N"):
    causal_attention(q, k, v, scale=1.0, window=NO_WINDOW)
