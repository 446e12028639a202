"""LoRA+ labels and optimizer against hand-computed updates."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import variants

JIT = [False, True]


def _tree():
  rng = np.random.default_rng(0)
  params = {
      "attn": {"kernel": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32),
               "bias": jnp.zeros(6)},
      "classifier": {"kernel": jnp.asarray(rng.standard_normal((6, 3)),
                                           jnp.float32)},
  }
  lp = jlora.apply(params, 2, targets="attn", key=jax.random.key(0))
  node = lp["attn"]["kernel"]
  lp["attn"]["kernel"] = dataclasses.replace(
      node, b=jnp.ones_like(node.b), m=jnp.ones(6))
  return lp


def _grads(tree, seed=1):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def test_labels_name_every_role():
  lp = _tree()
  got = variants.labels(lp, full="classifier")
  node = got["attn"]["kernel"]
  assert (node.w, node.a, node.b, node.e, node.m) == (
      "frozen", "lora_a", "lora_b", None, "lora_m")
  assert got["attn"]["bias"] == "frozen"
  assert got["classifier"]["kernel"] == "full"
  assert jax.tree.structure(got) == jax.tree.structure(lp)
  # LoRA-FA freezes a; a callable selector works like a regex.
  fa = variants.labels(lp, full=lambda path, x: path.endswith("bias"),
                       train_a=False)
  assert fa["attn"]["kernel"].a == "frozen"
  assert fa["attn"]["bias"] == "full"
  assert fa["classifier"]["kernel"] == "frozen"


def test_labels_of_a_trainable_half():
  trainable, _ = jlora.partition(_tree())
  got = variants.labels(trainable)
  assert jax.tree.structure(got) == jax.tree.structure(trainable)
  assert got["attn"]["kernel"].w is None and got["attn"]["kernel"].a == "lora_a"


@pytest.mark.parametrize("jit", JIT)
@pytest.mark.parametrize("train_a", [True, False])
def test_sgd_updates_follow_the_ratio(jit, train_a):
  lp = _tree()
  g = _grads(lp)
  lr, ratio, full_lr = 0.1, 16.0, 0.01
  tx = variants.loraplus_optimizer(optax.sgd, lr, ratio, full="classifier",
                                   full_lr=full_lr, train_a=train_a)
  state = tx.init(lp)
  update = jax.jit(tx.update) if jit else tx.update
  u, _ = update(g, state, lp)
  gn, un = g["attn"]["kernel"], u["attn"]["kernel"]
  np.testing.assert_allclose(un.a, -lr * np.asarray(gn.a) * train_a,
                             rtol=1e-6)
  np.testing.assert_allclose(un.b, -lr * ratio * np.asarray(gn.b), rtol=1e-6)
  np.testing.assert_allclose(un.m, -lr * ratio * np.asarray(gn.m), rtol=1e-6)
  np.testing.assert_array_equal(un.w, np.zeros_like(gn.w))
  np.testing.assert_array_equal(u["attn"]["bias"], np.zeros(6))
  np.testing.assert_allclose(u["classifier"]["kernel"],
                             -full_lr * np.asarray(g["classifier"]["kernel"]),
                             rtol=1e-6)


@pytest.mark.parametrize("jit", JIT)
def test_adam_with_a_schedule(jit):
  # Adam's first step is -lr * sign(g) (up to eps), so b moves ratio x more.
  lp = _tree()
  g = _grads(lp, seed=2)
  schedule = optax.linear_schedule(1e-2, 0.0, 10)
  tx = variants.loraplus_optimizer(optax.adam, schedule, ratio=4.0)
  state = tx.init(lp)
  update = jax.jit(tx.update) if jit else tx.update
  u, state = update(g, state, lp)
  node = u["attn"]["kernel"]
  np.testing.assert_allclose(node.a, -1e-2 * np.sign(g["attn"]["kernel"].a),
                             rtol=1e-4)
  np.testing.assert_allclose(node.b, -4e-2 * np.sign(g["attn"]["kernel"].b),
                             rtol=1e-4)
  u, _ = update(g, state, lp)  # step 1: lr = 9e-3
  np.testing.assert_allclose(u["attn"]["kernel"].b,
                             -3.6e-2 * np.sign(g["attn"]["kernel"].b),
                             rtol=1e-4)


def test_optimizer_on_the_trainable_half():
  trainable, frozen = jlora.partition(_tree())
  g = _grads(trainable)
  tx = variants.loraplus_optimizer(optax.sgd, 1.0, 2.0)
  u, _ = tx.update(g, tx.init(trainable), trainable)
  np.testing.assert_allclose(u["attn"]["kernel"].b,
                             -2.0 * np.asarray(g["attn"]["kernel"].b))
  new = optax.apply_updates(trainable, u)
  assert jlora.combine(new, frozen)["attn"]["kernel"].w is not None
