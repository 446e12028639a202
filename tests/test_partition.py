"""partition/combine round trips, masks, and optimizers that train adapters only."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.node import is_lora
from helpers import randomize_b

KEY = jax.random.key(0)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(16, name="up")(x))
    return nn.Dense(4, name="down")(h)


def _setup():
  model = MLP()
  x = jax.random.normal(KEY, (32, 8))
  y = jax.random.normal(jax.random.key(1), (32, 4))
  params = model.init(KEY, x)["params"]
  lp = jlora.apply(params, rank=2, alpha=4.0, key=KEY)
  return model, params, lp, x, y


def test_partition_halves_and_exact_inverse():
  _, _, lp, _, _ = _setup()
  trainable, frozen = jlora.partition(lp)
  # Only adapter arrays are trainable leaves.
  leaves = jax.tree.leaves(trainable)
  node = lp["up"]["kernel"]
  assert len(leaves) == 4
  assert trainable["up"]["bias"] is None and trainable["up"]["kernel"].w is None
  assert frozen["up"]["kernel"].a is None and frozen["up"]["kernel"].b is None
  back = jlora.combine(trainable, frozen)
  assert jax.tree.structure(back, is_leaf=is_lora) == jax.tree.structure(
      lp, is_leaf=is_lora)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(lp)):
    assert x is y
  assert back["up"]["kernel"].a is node.a


def test_combine_rejects_two_values_at_one_leaf():
  _, _, lp, _, _ = _setup()
  _, frozen = jlora.partition(lp)
  with pytest.raises(ValueError, match="both halves"):
    jlora.combine(frozen, frozen)


def test_mask_marks_adapters_only():
  _, _, lp, _, _ = _setup()
  m = jlora.mask(lp)
  assert m["up"]["bias"] is False
  node = m["up"]["kernel"]
  assert (node.w, node.a, node.b) == (False, True, True)
  assert jax.tree.structure(m) == jax.tree.structure(lp)


def _train(lp, tx, model, x, y, steps=5, whole_tree=False):
  forward = jlora.wrap(model.apply)

  def loss_fn(t, frozen):
    return jnp.mean((forward({"params": jlora.combine(t, frozen)}, x) - y) ** 2)

  if whole_tree:
    state = tx.init(lp)

    @jax.jit
    def step(p, state):
      l, g = jax.value_and_grad(lambda p: jnp.mean(
          (forward({"params": p}, x) - y) ** 2))(p)
      u, state = tx.update(g, state, p)
      return optax.apply_updates(p, u), state, l
    losses = []
    for _ in range(steps):
      lp, state, l = step(lp, state)
      losses.append(float(l))
    return lp, losses

  trainable, frozen = jlora.partition(lp)
  state = tx.init(trainable)

  @jax.jit
  def step(t, state):
    l, g = jax.value_and_grad(loss_fn)(t, frozen)
    u, state = tx.update(g, state, t)
    return optax.apply_updates(t, u), state, l
  losses = []
  for _ in range(steps):
    trainable, state, l = step(trainable, state)
    losses.append(float(l))
  return jlora.combine(trainable, frozen), losses


@pytest.mark.parametrize("whole_tree", [False, True])
def test_training_changes_adapters_only_and_lowers_loss(whole_tree):
  model, params, lp, x, y = _setup()
  tx = optax.adam(1e-2)
  if whole_tree:
    tx = jlora.optimizer(tx)
  trained, losses = _train(lp, tx, model, x, y, steps=20,
                           whole_tree=whole_tree)
  assert losses[-1] < losses[0]
  # Base leaves are bit-identical after training.
  for path in [("up", "bias"), ("down", "bias")]:
    np.testing.assert_array_equal(trained[path[0]][path[1]],
                                  params[path[0]][path[1]])
  for name in ("up", "down"):
    np.testing.assert_array_equal(trained[name]["kernel"].w,
                                  params[name]["kernel"])
    assert not np.array_equal(trained[name]["kernel"].b, 0)


def test_optimizer_gives_exact_zero_updates_off_mask():
  _, _, lp, _, _ = _setup()
  lp = randomize_b(lp, KEY)
  grads = jax.tree.map(jnp.ones_like, lp)
  tx = jlora.optimizer(optax.sgd(0.1), lp)
  updates, _ = tx.update(grads, tx.init(lp), lp)
  assert float(jnp.abs(updates["up"]["bias"]).max()) == 0.0
  assert float(jnp.abs(updates["up"]["kernel"].w).max()) == 0.0
  np.testing.assert_allclose(updates["up"]["kernel"].a, -0.1)
  # optax.masked alone would have passed the raw gradient through.
  masked = optax.masked(optax.sgd(0.1), jlora.mask(lp))
  raw, _ = masked.update(grads, masked.init(lp), lp)
  assert float(raw["up"]["bias"].max()) == 1.0


def test_multi_transform_with_mask_labels():
  _, _, lp, _, _ = _setup()
  tx = optax.multi_transform({True: optax.sgd(1.0), False: optax.set_to_zero()},
                             jlora.mask(lp))
  grads = jax.tree.map(jnp.ones_like, lp)
  updates, _ = tx.update(grads, tx.init(lp), lp)
  np.testing.assert_array_equal(updates["down"]["kernel"].b, -1.0)
  np.testing.assert_array_equal(updates["down"]["kernel"].w, 0.0)


def test_lora_fa_keeps_a_frozen():
  model, params, _, x, y = _setup()
  lp = jlora.apply(params, rank=2, alpha=4.0, key=KEY, train_a=False)
  trainable, frozen = jlora.partition(lp)
  assert trainable["up"]["kernel"].a is None
  assert frozen["up"]["kernel"].a is lp["up"]["kernel"].a
  assert jlora.mask(lp)["up"]["kernel"].a is False
  trained, losses = _train(lp, optax.adam(1e-2), model, x, y, steps=10)
  assert losses[-1] < losses[0]
  np.testing.assert_array_equal(trained["up"]["kernel"].a, lp["up"]["kernel"].a)
  assert not np.array_equal(trained["up"]["kernel"].b, 0)


def test_full_params_train_besides_adapters():
  model, params, lp, x, y = _setup()
  trainable, frozen = jlora.partition(lp, full="down/bias")
  assert trainable["down"]["bias"] is lp["down"]["bias"]
  assert frozen["down"]["bias"] is None and trainable["up"]["bias"] is None
  back = jlora.combine(trainable, frozen)
  assert back["down"]["bias"] is lp["down"]["bias"]
  assert jlora.mask(lp, full="down/bias")["down"]["bias"] is True
  # Whole-tree optimizer: the selected bias moves, the other one does not.
  tx = jlora.optimizer(optax.adam(1e-2), full=r"down/bias")
  trained, _ = _train(lp, tx, model, x, y, steps=5, whole_tree=True)
  assert not np.array_equal(trained["down"]["bias"], params["down"]["bias"])
  np.testing.assert_array_equal(trained["up"]["bias"], params["up"]["bias"])
  with pytest.raises(ValueError, match="matched no parameter"):
    jlora.partition(lp, full="classifier")


def test_dora_and_adalora_fields_are_trainable():
  _, _, lp, _, _ = _setup()
  node = lp["up"]["kernel"]
  lp["up"]["kernel"] = node.__class__(**{**node.__dict__, "m": jnp.ones(16),
                                         "e": jnp.ones(2)})
  trainable, frozen = jlora.partition(lp)
  assert trainable["up"]["kernel"].m is not None
  assert trainable["up"]["kernel"].e is not None
  assert frozen["up"]["kernel"].m is None


# -- issue 21: halves that do not belong together, trees with nothing to train

def _two_layer_params():
  return {"a": {"kernel": jax.random.normal(KEY, (4, 4))},
          "b": {"kernel": jax.random.normal(KEY, (4, 4))}}


def test_combine_of_halves_from_different_target_sets_names_the_path():
  params = _two_layer_params()
  t_a, f_a = jlora.partition(jlora.apply(params, rank=2, targets="a/",
                                         key=KEY))
  t_ab, f_ab = jlora.partition(jlora.apply(params, rank=2, targets="a/|b/",
                                           key=KEY))
  # Trainable half of a subset with the frozen half of a superset: 'b/kernel'
  # would come out as half a node, failing much later.
  with pytest.raises(ValueError, match=r"'b/kernel' is an adapter in the "
                     r"frozen half but missing.*different target sets"):
    jlora.combine(t_a, f_ab)
  with pytest.raises(ValueError, match=r"'b/kernel' is an adapter in the "
                     r"trainable half but a plain array"):
    jlora.combine(t_ab, f_a)
  t_b, f_b = jlora.partition(jlora.apply(params, rank=2, targets="b/",
                                         key=KEY))
  with pytest.raises(ValueError, match=r"'a/kernel' is an adapter in the "
                     r"trainable half but a plain array"):
    jlora.combine(t_a, f_b)


def test_combine_of_different_trees_names_the_first_mismatch():
  lp = jlora.apply(_two_layer_params(), rank=2, key=KEY)
  trainable, frozen = jlora.partition(lp)
  with pytest.raises(ValueError, match=r"different trees, first at 'b/kernel'"
                     r" only in the frozen half"):
    jlora.combine({"a": trainable["a"]}, frozen)
  with pytest.raises(ValueError, match=r"first at 'a/kernel' only in the "
                     r"trainable half"):
    jlora.combine(trainable, {"x": frozen["a"], "b": frozen["b"]})


def test_combine_rejects_both_halves_and_other_adapter_configs():
  lp = jlora.apply(_two_layer_params(), rank=2, key=KEY)
  trainable, frozen = jlora.partition(lp)
  with pytest.raises(ValueError, match=r"both halves hold \['a', 'b'\] of "
                     r"'a/kernel'"):
    jlora.combine(trainable, trainable)
  with pytest.raises(ValueError, match="both halves"):
    jlora.combine(lp, lp)
  _, other = jlora.partition(jlora.apply(_two_layer_params(), rank=2,
                                         alpha=4.0, key=KEY))
  with pytest.raises(ValueError, match=r"'a/kernel' differ.*\['alpha'\]"):
    jlora.combine(trainable, other)


def test_combine_round_trips_under_jit_and_for_nnx_state():
  from flax import nnx
  lp = jlora.apply(_two_layer_params(), rank=2, key=KEY)
  back = jax.jit(jlora.combine)(*jlora.partition(lp))
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(lp)):
    np.testing.assert_array_equal(x, y)
  _, state = nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  lp = jlora.apply(state, rank=2, key=KEY)
  back = jlora.combine(*jlora.partition(lp))
  assert isinstance(back, nnx.State)
  assert jax.tree.structure(back, is_leaf=is_lora) == jax.tree.structure(
      lp, is_leaf=is_lora)


def test_a_tree_without_adapters_has_nothing_to_train():
  params = _two_layer_params()
  for call in (jlora.partition, jlora.mask,
               lambda p: jlora.optimizer(optax.sgd(0.1)).init(p)):
    with pytest.raises(ValueError, match=r"no LoRA nodes.*jlora\.apply"):
      call(params)
  # Full fine-tuning of selected params is still a split.
  trainable, frozen = jlora.partition(params, full="b/")
  assert trainable["a"]["kernel"] is None
  assert trainable["b"]["kernel"] is params["b"]["kernel"]
  # Counting a plain tree is fine: nothing of it trains.
  assert jlora.count(params) == jlora.Count(0, 32)


def test_full_selecting_an_adapted_kernel_raises():
  _, _, lp, _, _ = _setup()
  for full in ("up", r"up/kernel", lambda p, x: p.startswith("down")):
    with pytest.raises(ValueError, match=r"selects \['(up|down)/kernel'\], "
                       "which hold LoRA adapters"):
      jlora.partition(lp, full=full)
    with pytest.raises(ValueError, match="which hold LoRA adapters"):
      jlora.mask(lp, full=full)
  assert jlora.mask(lp, full="up/bias")["up"]["bias"] is True


def test_grad_through_merge_equals_grad_through_wrap():
  model, _, lp, x, _ = _setup()
  lp = randomize_b(lp, KEY)
  trainable, frozen = jlora.partition(lp)
  loss = lambda out: jnp.sum(jnp.sin(out))
  g_merge = jax.grad(lambda t: loss(model.apply(
      {"params": jlora.merge(jlora.combine(t, frozen))}, x)))(trainable)
  g_wrap = jax.grad(lambda t: loss(jlora.wrap(model.apply)(
      {"params": jlora.combine(t, frozen)}, x)))(trainable)
  for a, b in zip(jax.tree.leaves(g_merge), jax.tree.leaves(g_wrap)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_combine_round_trips_with_quantized_frozen_kernels():
  # A quantized kernel left without an adapter is one frozen leaf (None in
  # the trainable half), not a tree of codes and scales.
  k1, k2 = jax.random.split(jax.random.key(5))
  params = {"q": {"kernel": jax.random.normal(k1, (64, 64))},
            "v": {"kernel": jax.random.normal(k2, (64, 64))}}
  qp = jlora.quantize(params, "nf4")
  lp = jlora.apply(qp, rank=2, targets="q", key=k1)
  t, f = jlora.partition(lp)
  assert t["v"]["kernel"] is None
  back = jax.jit(jlora.combine)(t, f)
  np.testing.assert_array_equal(
      np.asarray(jlora.dequantize(back["v"]["kernel"])),
      np.asarray(jlora.dequantize(qp["v"]["kernel"])))
