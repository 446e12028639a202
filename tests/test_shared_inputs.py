"""`jlora.wrap` computes the A products of kernels sharing an input at once.

q/k/v (and gate/up) read the same activations; their adapters' ``x @ a``
run as one matmul against the concatenated factors. References: the same
function with ``share_inputs=False`` (one product per kernel), float64 NumPy
on the merged kernels, and the count of matrix products in the jaxpr.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.models import LlamaForCausalLM, ModelConfig
from helpers import dot_outputs, np_merge, randomize_b


class QKV(nn.Module):
  """Three projections of one input, then a product of their outputs."""

  @nn.compact
  def __call__(self, x):
    q = nn.Dense(6, name="q")(x)
    k = nn.Dense(6, name="k")(x)
    v = nn.Dense(4, name="v", use_bias=False)(x)
    return jnp.concatenate([q * k, v], axis=-1)


X = np.asarray(jax.random.normal(jax.random.key(0), (3, 5, 8)), np.float32)
PARAMS = QKV().init(jax.random.key(1), X)["params"]


def np_qkv(p, x):
  x = np.asarray(x, np.float64)
  q = x @ p["q"]["kernel"] + p["q"]["bias"]
  k = x @ p["k"]["kernel"] + p["k"]["bias"]
  return np.concatenate([q * k, x @ p["v"]["kernel"]], axis=-1)


def _lora(targets, **kw):
  lp = jlora.apply(PARAMS, rank=2, key=jax.random.key(2), targets=targets,
                   **kw)
  return randomize_b(lp, jax.random.key(3))


def _grads(lp, share):
  trainable, frozen = jlora.partition(lp)
  fn = jlora.wrap(QKV().apply, share_inputs=share)
  loss = lambda t: jnp.sum(fn({"params": jlora.combine(t, frozen)}, X) ** 2)
  return jax.value_and_grad(loss)(trainable), jax.make_jaxpr(
      jax.grad(loss))(trainable)


@pytest.mark.parametrize("targets, n", [("^(q|k|v)/", 3), ("^(q|v)/", 2),
                                        ("^(k|v)/", 2), ("^q/", 1)])
def test_shared_products_match_separate_ones_and_float64(targets, n):
  lp = _lora(targets)
  assert jlora.count(lp).trainable == sum(
      2 * (8 + w) for name, w in (("q", 6), ("k", 6), ("v", 4))
      if name in targets)
  (value, grads), jaxpr = _grads(lp, True)
  (value0, grads0), jaxpr0 = _grads(lp, False)
  np.testing.assert_allclose(float(value), float(value0), rtol=1e-6)
  for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=1e-5,
                               atol=1e-5)
  out = jlora.wrap(QKV().apply)({"params": lp}, X)
  np.testing.assert_allclose(np.asarray(out), np_qkv(np_merge(lp), X),
                             rtol=1e-5, atol=1e-5)
  # n adapted kernels sharing X: one forward A product instead of n, and one
  # x^T @ dt instead of n in the backward pass (X is a constant here, so no
  # dt @ a^T is formed).
  saved = 2 * (n - 1)
  assert len(dot_outputs(jaxpr0.jaxpr)) - len(dot_outputs(jaxpr.jaxpr)) == (
      saved)


def test_adapters_with_dropout_keep_their_own_product():
  lp = _lora("^(q|k)/", dropout=0.5)
  fn = jlora.wrap(QKV().apply)
  key = jax.random.key(7)
  a = fn({"params": lp}, X, lora_rng=key)
  b = jlora.wrap(QKV().apply, share_inputs=False)({"params": lp}, X,
                                                  lora_rng=key)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  jaxpr = jax.make_jaxpr(lambda p: fn({"params": p}, X, lora_rng=key))(lp)
  jaxpr0 = jax.make_jaxpr(lambda p: jlora.wrap(QKV().apply, share_inputs=False)(
      {"params": p}, X, lora_rng=key))(lp)
  assert len(dot_outputs(jaxpr.jaxpr)) == len(dot_outputs(jaxpr0.jaxpr))


def test_llama_layers_share_qkv_and_gate_up_products():
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                    num_layers=2, num_heads=4, num_kv_heads=2)
  model = LlamaForCausalLM(cfg, scan_layers=True, remat="matmuls")
  tokens = jax.random.randint(jax.random.key(4), (2, 7), 0, cfg.vocab_size)
  params = model.init(jax.random.key(5), tokens)["params"]
  lp = randomize_b(jlora.apply(params, rank=4, key=jax.random.key(6)),
                   jax.random.key(8), std=0.3)
  trainable, frozen = jlora.partition(lp)

  def run(share):
    fn = jlora.wrap(model.apply, share_inputs=share)
    loss = lambda t: jnp.mean(fn({"params": jlora.combine(t, frozen)},
                                 tokens) ** 2)
    return jax.value_and_grad(loss)(trainable), jax.make_jaxpr(
        jax.grad(loss))(trainable)

  (value, grads), jaxpr = run(True)
  (value0, grads0), jaxpr0 = run(False)
  np.testing.assert_allclose(float(value), float(value0), rtol=1e-5)
  for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=1e-4,
                               atol=1e-6)
  # In the layer body q/k/v share one A product (2 fewer) and gate/up one (1
  # fewer). That happens 4 times: the forward pass, its recomputation under
  # remat, and the backward's x^T @ dt and dt @ a^T: 12 fewer.
  assert len(dot_outputs(jaxpr0.jaxpr)) - len(dot_outputs(jaxpr.jaxpr)) == 12
