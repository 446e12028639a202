"""ReLoRA restarts, moment pruning and the jagged schedule."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import variants

JIT = [False, True]


def _setup(dora=False):
  rng = np.random.default_rng(0)
  params = {
      "blocks": {"kernel": jnp.asarray(rng.standard_normal((2, 16, 16)) / 4,
                                       jnp.float32)},
      "head": {"kernel": jnp.asarray(rng.standard_normal((16, 4)) / 4,
                                     jnp.float32)},
  }
  lp = jlora.apply(params, 4, alpha=8.0, targets="blocks", key=jax.random.key(0))
  if dora:
    node = lp["blocks"]["kernel"]
    lp["blocks"]["kernel"] = dataclasses.replace(
        node, m=jnp.linalg.norm(node.w, axis=-2) * 1.5)
  return lp


def _forward(tree, x):
  def fn(p, x):
    for k in range(2):
      x = jnp.tanh(x @ p["blocks"]["kernel"][k])
    return x @ p["head"]["kernel"]
  return jlora.wrap(fn)(tree, x)


def _train(lp, tx, steps=3):
  x = jax.random.normal(jax.random.key(5), (8, 16))
  y = jax.random.normal(jax.random.key(6), (8, 4))
  trainable, frozen = jlora.partition(lp)
  state = tx.init(trainable)

  @jax.jit
  def step(trainable, state):
    loss = lambda t: jnp.mean((_forward(jlora.combine(t, frozen), x) - y) ** 2)
    g = jax.grad(loss)(trainable)
    u, state = tx.update(g, state, trainable)
    return optax.apply_updates(trainable, u), state

  for _ in range(steps):
    trainable, state = step(trainable, state)
  return jlora.combine(trainable, frozen), state


@pytest.mark.parametrize("jit", JIT)
@pytest.mark.parametrize("dora", [False, True])
def test_restart_keeps_the_function(jit, dora):
  lp, state = _train(_setup(dora), optax.adam(1e-2))
  x = jax.random.normal(jax.random.key(7), (5, 16))
  fn = lambda t, s, k: variants.restart(t, s, k, prune=0.9)
  new, _ = (jax.jit(fn) if jit else fn)(lp, state, jax.random.key(1))
  np.testing.assert_allclose(_forward(new, x), _forward(lp, x), atol=1e-5)
  np.testing.assert_allclose(jlora.merge(new)["blocks"]["kernel"],
                             jlora.merge(lp)["blocks"]["kernel"], atol=1e-5)
  node, old = new["blocks"]["kernel"], lp["blocks"]["kernel"]
  np.testing.assert_array_equal(node.b, np.zeros_like(node.b))
  assert float(jnp.abs(node.a).max()) <= 1 / math.sqrt(16)
  assert not np.allclose(node.a, old.a)
  np.testing.assert_allclose(node.w, old.materialize(), atol=1e-6)
  assert node.a.dtype == old.a.dtype and node.rank == old.rank


@pytest.mark.parametrize("jit", JIT)
@pytest.mark.parametrize("prune", [0.0, 0.5, 0.99, 1.0])
def test_prune_fraction_of_moments(jit, prune):
  lp, state = _train(_setup(), optax.adam(1e-2))
  fn = lambda s: variants.prune_moments(s, prune)
  pruned = (jax.jit(fn) if jit else fn)(state)
  (before,) = [s for s in state if isinstance(s, optax.ScaleByAdamState)]
  (after,) = [s for s in pruned if isinstance(s, optax.ScaleByAdamState)]
  for moments in ("mu", "nu"):
    for f in ("a", "b"):
      x = np.asarray(getattr(getattr(before, moments)["blocks"]["kernel"], f),
                     np.float64)
      got = np.asarray(getattr(getattr(after, moments)["blocks"]["kernel"], f))
      for layer in range(2):  # one threshold per stacked matrix
        mag = np.abs(x[layer])
        keep = (mag > np.quantile(mag, prune) if 0 < prune < 1 else
                np.full(mag.shape, prune == 0))
        np.testing.assert_array_equal(
            got[layer], np.where(keep, x[layer], 0).astype(got.dtype))
        zeroed = np.mean(got[layer] == 0)
        assert abs(zeroed - prune) <= 1.0 / mag.size + 1e-9, (moments, f)
  np.testing.assert_array_equal(after.count, before.count)


def test_restart_prunes_through_a_multi_transform():
  lp = _setup()
  tx = variants.loraplus_optimizer(optax.adam, 1e-2, ratio=4.0)
  x = jax.random.normal(jax.random.key(5), (8, 16))
  g = jax.grad(lambda t: jnp.sum(_forward(t, x) ** 2))(lp)
  state = tx.init(lp)
  _, state = tx.update(g, state, lp)
  _, pruned = variants.restart(lp, state, jax.random.key(2), prune=0.75)
  mu = pruned.inner_states["lora_b"].inner_state[0].mu["blocks"]["kernel"].b
  assert abs(float(jnp.mean(mu == 0)) - 0.75) <= 2 / mu.size


def _jagged_reference(s, peak, total, every, warm, rewarm, floor):
  def envelope(t):
    p = min(max((t - warm) / (total - warm), 0.0), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
  if s < warm:
    return peak * s / warm
  last = (s // every) * every
  if last > 0 and s - last < rewarm:
    return peak * envelope(last + rewarm) * (s - last) / rewarm
  return peak * envelope(s)


@pytest.mark.parametrize("jit", JIT)
def test_jagged_schedule(jit):
  schedule = variants.jagged_schedule(1e-3, 200, 50, warmup_steps=10,
                                      restart_warmup_steps=5, min_ratio=0.1)
  fn = jax.jit(schedule) if jit else schedule
  steps = np.arange(0, 230)
  got = np.asarray(jax.vmap(fn)(steps)) if jit else np.array(
      [fn(s) for s in steps[::7]])
  steps = steps if jit else steps[::7]
  want = [_jagged_reference(int(s), 1e-3, 200, 50, 10, 5, 0.1) for s in steps]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-10)
  if jit:
    assert got[50] == 0 and got[100] == 0 and got[49] > got[51] > 0
  with pytest.raises(ValueError, match="restart_warmup_steps"):
    variants.jagged_schedule(1e-3, 100, 10, restart_warmup_steps=10)
