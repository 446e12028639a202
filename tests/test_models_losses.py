"""chunked_cross_entropy against a float64 NumPy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.models.losses import chunked_cross_entropy
from helpers import dot_outputs


def np_loss_and_grads(h, w, labels, where=None, embedding=False, mean=True,
                      softcap=None):
  """float64 loss and its gradients (d hidden, d head) by hand."""
  h = np.asarray(h, np.float64)
  w = np.asarray(w, np.float64)
  kernel = w.T if embedding else w
  z = h @ kernel
  if softcap is not None:
    u = np.tanh(z / softcap)
    z = softcap * u
  z = z - z.max(-1, keepdims=True)
  p = np.exp(z)
  p /= p.sum(-1, keepdims=True)
  lse_minus = -np.log(np.take_along_axis(p, labels[..., None], -1))[..., 0]
  wt = np.ones(labels.shape) if where is None else np.asarray(where, np.float64)
  denom = wt.sum() if mean else 1.0
  loss = (lse_minus * wt).sum() / denom
  dz = p.copy()
  np.put_along_axis(dz, labels[..., None],
                    np.take_along_axis(dz, labels[..., None], -1) - 1, -1)
  dz *= (wt / denom)[..., None]
  if softcap is not None:
    dz *= 1 - u**2
  dh = dz @ kernel.T
  dk = h.reshape(-1, h.shape[-1]).T @ dz.reshape(-1, dz.shape[-1])
  return loss, dh, (dk.T if embedding else dk)


def data(key, lead=(3, 37), hidden=16, vocab=50, dtype=jnp.float32):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  h = jax.random.normal(k1, (*lead, hidden), dtype)
  w = (jax.random.normal(k2, (hidden, vocab)) / hidden**0.5).astype(dtype)
  labels = jax.random.randint(k3, lead, 0, vocab)
  where = jax.random.bernoulli(k4, 0.7, lead)
  return h, w, labels, where


def rel(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 8, 37, 1000])
def test_matches_float64_reference(chunk_size, jit):
  h, w, labels, where = data(jax.random.key(chunk_size))

  def f(h, w):
    return chunked_cross_entropy(h, w, labels, where=where,
                                 chunk_size=chunk_size)

  vg = jax.value_and_grad(f, argnums=(0, 1))
  loss, (dh, dw) = (jax.jit(vg) if jit else vg)(h, w)
  ref_loss, ref_dh, ref_dw = np_loss_and_grads(h, w, np.asarray(labels),
                                               where)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  assert rel(dh, ref_dh) < 1e-5
  assert rel(dw, ref_dw) < 1e-5
  assert loss.dtype == jnp.float32


@pytest.mark.parametrize("jit", [False, True])
def test_softcap_matches_float64_reference(jit):
  """Logits c * tanh(z / c), Gemma 2's final soft-cap; c small enough to
  bind (|z| reaches several c)."""
  h, w, labels, where = data(jax.random.key(7))
  w = w * 4
  f = lambda h, w: chunked_cross_entropy(h, w, labels, where=where,
                                         chunk_size=16, softcap=2.0)
  vg = jax.value_and_grad(f, argnums=(0, 1))
  loss, (dh, dw) = (jax.jit(vg) if jit else vg)(h, w)
  ref = np_loss_and_grads(h, w, np.asarray(labels), where, softcap=2.0)
  np.testing.assert_allclose(loss, ref[0], rtol=1e-6)
  assert rel(dh, ref[1]) < 1e-5 and rel(dw, ref[2]) < 1e-5
  uncapped = np_loss_and_grads(h, w, np.asarray(labels), where)[0]
  assert abs(uncapped - ref[0]) > 0.1


def test_tied_embedding_and_sum_reduction():
  h, w, labels, _ = data(jax.random.key(1), lead=(20,))
  emb = w.T  # (vocab, hidden)
  f = lambda h, e: chunked_cross_entropy(h, e, labels, chunk_size=6,
                                         reduction="sum")
  loss, (dh, de) = jax.value_and_grad(f, argnums=(0, 1))(h, emb)
  ref_loss, ref_dh, ref_de = np_loss_and_grads(
    h, emb, np.asarray(labels), embedding=True, mean=False)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  assert rel(dh, ref_dh) < 1e-5 and rel(de, ref_de) < 1e-5


def test_equals_plain_log_softmax_and_grad_wrt_hidden_only():
  h, w, labels, _ = data(jax.random.key(2))

  def plain(h):
    logp = jax.nn.log_softmax(h @ w)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], -1))

  chunked = lambda h: chunked_cross_entropy(h, w, labels, chunk_size=16)
  np.testing.assert_allclose(chunked(h), plain(h), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(chunked)(h), jax.grad(plain)(h),
                             atol=1e-7)


def test_head_gradient_not_formed_when_head_is_frozen():
  """Only hidden is differentiated: no (hidden, vocab) accumulator at all."""
  h, w, labels, _ = data(jax.random.key(3), vocab=1234)
  f = lambda h: chunked_cross_entropy(h, w, labels, chunk_size=8)
  shapes = dot_outputs(jax.make_jaxpr(jax.grad(f))(h).jaxpr)
  assert (8, 1234) in shapes and (16, 1234) not in shapes
  both = jax.make_jaxpr(jax.grad(
    lambda h, w: chunked_cross_entropy(h, w, labels, chunk_size=8),
    argnums=(0, 1)))(h, w)
  assert (16, 1234) in dot_outputs(both.jaxpr)


def test_bf16_close_to_float32():
  h, w, labels, where = data(jax.random.key(4), dtype=jnp.bfloat16)
  f = lambda h, w: chunked_cross_entropy(h, w, labels, where=where,
                                         chunk_size=8)
  loss, (dh, dw) = jax.value_and_grad(f, argnums=(0, 1))(h, w)
  assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
  ref_loss, ref_dh, ref_dw = np_loss_and_grads(
    h.astype(jnp.float32), w.astype(jnp.float32), np.asarray(labels), where)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert rel(dh, ref_dh) < 1e-2 and rel(dw, ref_dw) < 1e-2


def test_all_masked_gives_zero_not_nan():
  h, w, labels, _ = data(jax.random.key(5), lead=(4,))
  where = jnp.zeros((4,), bool)
  loss, g = jax.value_and_grad(
    lambda h: chunked_cross_entropy(h, w, labels, where=where))(h)
  assert float(loss) == 0.0 and not np.isnan(np.asarray(g)).any()


def test_errors_name_the_fix():
  h, w, labels, _ = data(jax.random.key(6), hidden=8, vocab=8)
  with pytest.raises(ValueError, match="head_layout='kernel'"):
    chunked_cross_entropy(h, w, labels)
  loss = chunked_cross_entropy(h, w, labels, head_layout="kernel")
  assert np.isfinite(loss)
  with pytest.raises(ValueError, match="labels need hidden's shape"):
    chunked_cross_entropy(h, w, labels[:, :3], head_layout="kernel")
  with pytest.raises(ValueError, match="hidden size is 8"):
    chunked_cross_entropy(h, jnp.zeros((5, 7)), labels)
  with pytest.raises(ValueError, match="reduction='max'"):
    chunked_cross_entropy(h, w, labels, head_layout="kernel",
                          reduction="max")
  with pytest.raises(TypeError, match="labels must be integers"):
    chunked_cross_entropy(h, w, labels.astype(jnp.float32),
                          head_layout="kernel")


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (CPU) devices")
def test_data_parallel_loss_stays_on_each_devices_tokens():
  # Sharded over the batch, each device takes its own tokens' share of every
  # chunk: the compiled loss and gradient reduce a scalar and gather nothing
  # (contiguous chunks would each sit on one device and be gathered to all).
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jlora.models import sharding
  mesh = sharding.make_mesh("data:8", jax.devices()[:8])
  h, w, labels, where = data(jax.random.key(3), lead=(16, 32))
  rows = NamedSharding(mesh, P("data"))
  h, labels, where = (jax.device_put(a, rows) for a in (h, labels, where))
  w = jax.device_put(w, NamedSharding(mesh, P()))

  def f(h, w):
    return chunked_cross_entropy(h, w, labels, where=where, chunk_size=128)

  grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
  hlo = grad.lower(h, w).compile().as_text()
  assert "all-gather" not in hlo and "all-to-all" not in hlo
  (loss, (dh, dw)) = grad(h, w)
  ref_loss, ref_dh, ref_dw = np_loss_and_grads(
      h, w, np.asarray(labels), np.asarray(where))
  assert abs(float(loss) - ref_loss) < 1e-5 * abs(ref_loss)
  assert rel(dh, ref_dh) < 1e-5 and rel(dw, ref_dw) < 1e-5
  assert dh.sharding.is_equivalent_to(rows, dh.ndim)
