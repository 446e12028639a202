"""DyLoRA truncation and rank masking against float64 NumPy references."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jlora
from jlora import variants

JIT = [False, True]


def _trained(shape, rank, alpha=8.0, rslora=False, gains=False, seed=0):
  """A LoRA tree with non-zero b (as after training)."""
  rng = np.random.default_rng(seed)
  params = {"proj": {"kernel": jnp.asarray(rng.standard_normal(shape),
                                           jnp.float32)}}
  lp = jlora.apply(params, rank, alpha=alpha, rslora=rslora,
                   key=jax.random.key(seed))
  node = lp["proj"]["kernel"]
  node = dataclasses.replace(
      node, b=jnp.asarray(rng.standard_normal(node.b.shape), jnp.float32),
      e=jnp.asarray(rng.uniform(0.5, 2.0, node.b.shape[:-1]), jnp.float32)
      if gains else None)
  return {"proj": {"kernel": node}}


def _reference(node, k):
  """W + s(k) * a[:, :k] diag(e[:k]) b[:k] in float64, s(k) = alpha/k."""
  a = np.asarray(node.a, np.float64)[..., :k]
  b = np.asarray(node.b, np.float64)[..., :k, :]
  if node.e is not None:
    b = np.asarray(node.e, np.float64)[..., :k, None] * b
  s = node.alpha / (math.sqrt(k) if node.rslora else k)
  return np.asarray(node.w, np.float64) + s * a @ b


@pytest.mark.parametrize("jit", JIT)
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("shape", [(10, 7), (3, 10, 7)])
def test_truncate_matches_reference(jit, rslora, shape):
  lp = _trained(shape, 6, rslora=rslora, gains=True)
  for k in (1, 3, 6, 9):
    fn = lambda t: jlora.merge(variants.truncate(t, k))
    fused = (jax.jit(fn) if jit else fn)(lp)
    np.testing.assert_allclose(fused["proj"]["kernel"],
                               _reference(lp["proj"]["kernel"], min(k, 6)),
                               atol=1e-5)
  small = variants.truncate(lp, 2)["proj"]["kernel"]
  assert small.rank == 2 and small.e.shape[-1] == 2
  assert small.scale == (8.0 / math.sqrt(2) if rslora else 4.0)


def test_truncate_a_trainable_half_and_errors():
  trainable, frozen = jlora.partition(_trained((10, 7), 4))
  small = variants.truncate(trainable, 2)
  assert small["proj"]["kernel"].a.shape == (10, 2)
  assert jlora.combine(small, frozen)["proj"]["kernel"].rank == 2
  with pytest.raises(ValueError, match="mask_rank"):
    variants.truncate(trainable, jnp.int32(2))


@settings(max_examples=8, deadline=None)
@given(stacked=st.sampled_from([(), (2,)]), fan_in=st.integers(2, 9),
       fan_out=st.integers(2, 9), rslora=st.booleans(), data=st.data())
def test_mask_rank_is_truncate_with_static_shapes(stacked, fan_in, fan_out,
                                                  rslora, data):
  r = data.draw(st.integers(1, min(fan_in, fan_out)))
  k = data.draw(st.integers(1, r + 1))
  lp = _trained((*stacked, fan_in, fan_out), r, rslora=rslora)
  masked = jax.jit(lambda t, k: jlora.merge(variants.mask_rank(t, k)))(
      lp, jnp.int32(k))
  np.testing.assert_allclose(masked["proj"]["kernel"],
                             _reference(lp["proj"]["kernel"], min(k, r)),
                             atol=1e-5)


@pytest.mark.parametrize("jit", JIT)
@pytest.mark.parametrize("only_last", [False, True])
def test_masked_ranks_get_no_gradient(jit, only_last):
  lp = _trained((12, 8), 6)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((5, 12)),
                  jnp.float32)
  forward = jlora.wrap(lambda p, x: x @ p["proj"]["kernel"])

  def loss(t, k):
    return jnp.sum(forward(variants.mask_rank(t, k, only_last=only_last),
                           x) ** 2)

  grad = jax.jit(jax.grad(loss)) if jit else jax.grad(loss)
  g = grad(lp, jnp.int32(3))["proj"]["kernel"]
  live = np.arange(6) == 2 if only_last else np.arange(6) < 3
  assert np.all(np.abs(np.asarray(g.a)[:, ~live]) == 0)
  assert np.all(np.abs(np.asarray(g.b)[~live]) == 0)
  assert np.all(np.abs(np.asarray(g.a)[:, live]).sum(0) > 0)
  assert np.all(np.abs(np.asarray(g.b)[live]).sum(1) > 0)
  # The factored forward pass equals the truncated adapter's.
  node = lp["proj"]["kernel"]
  want = np.asarray(x, np.float64) @ _reference(node, 3)
  np.testing.assert_allclose(forward(variants.mask_rank(lp, 3), x), want,
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("jit", JIT)
def test_sample_draws_in_range(jit):
  lp = _trained((10, 7), 6)
  fn = lambda t, key: variants.sample(t, key, r_min=2)
  fn = jax.jit(fn) if jit else fn
  seen = set()
  for i in range(40):
    masked, k = fn(lp, jax.random.key(i))
    k = int(k)
    seen.add(k)
    np.testing.assert_allclose(jlora.merge(masked)["proj"]["kernel"],
                               _reference(lp["proj"]["kernel"], k), atol=1e-5)
  assert seen == {2, 3, 4, 5, 6}
  with pytest.raises(ValueError, match="r_min"):
    variants.sample_rank(jax.random.key(0), 3, 2)
