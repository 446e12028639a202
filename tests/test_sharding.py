"""LoRA on a device mesh: 8 simulated CPU devices (set in conftest.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jlora

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")

KEY = jax.random.key(0)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(32, name="up")(x))
    return nn.Dense(8, name="down")(h)


LAYOUTS = {
    # FSDP: every kernel sharded along its first axis.
    "fsdp": {"up": P(("data", "model"), None), "down": P(("data", "model"), None)},
    # Tensor parallel: column- then row-parallel, Megatron style.
    "tensor": {"up": P(None, "model"), "down": P("model", None)},
}


def _mesh():
  return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


def _place(params, mesh, specs):
  def put(path, x):
    name = path[0].key
    spec = specs[name] if path[-1].key == "kernel" else P()
    return jax.device_put(x, NamedSharding(mesh, spec))
  return jax.tree_util.tree_map_with_path(put, params)


def _train(lp, x, y, steps=3):
  model = MLP()
  forward = jlora.wrap(model.apply)
  trainable, frozen = jlora.partition(lp)
  tx = optax.adam(1e-2)
  state = tx.init(trainable)

  @jax.jit
  def step(t, state, frozen, x, y):
    def loss(t):
      return jnp.mean((forward({"params": jlora.combine(t, frozen)}, x) - y) ** 2)
    l, g = jax.value_and_grad(loss)(t)
    u, state = tx.update(g, state, t)
    return optax.apply_updates(t, u), state, l

  losses = []
  for _ in range(steps):
    trainable, state, l = step(trainable, state, frozen, x, y)
    losses.append(l)
  return trainable, np.array(losses)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sharded_train_step_matches_single_device(layout):
  mesh = _mesh()
  x = jax.random.normal(KEY, (16, 16))
  y = jax.random.normal(jax.random.key(1), (16, 8))
  params = MLP().init(KEY, x)["params"]

  single = jlora.apply(params, rank=4, alpha=8.0, key=KEY)
  t_single, l_single = _train(single, x, y)

  sharded_params = _place(params, mesh, LAYOUTS[layout])
  lp = jlora.apply(sharded_params, rank=4, alpha=8.0, key=KEY)
  xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
  ys = jax.device_put(y, NamedSharding(mesh, P("data", None)))
  t_sharded, l_sharded = _train(lp, xs, ys)

  np.testing.assert_allclose(l_sharded, l_single, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(t_sharded), jax.tree.leaves(t_single)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # The base stays where it was put.
  assert lp["up"]["kernel"].w.sharding.spec == LAYOUTS[layout]["up"]


def test_adapter_sharding_follows_kernel():
  mesh = _mesh()
  params = MLP().init(KEY, jnp.ones((4, 16)))["params"]
  lp = jlora.apply(_place(params, mesh, LAYOUTS["tensor"]), rank=4, key=KEY)
  up, down = lp["up"]["kernel"], lp["down"]["kernel"]
  # a: the kernel's input-axis spec, rank replicated; b: rank replicated,
  # the kernel's output-axis spec.
  assert up.a.sharding.spec == P(None, None)
  assert up.b.sharding.spec == P(None, "model")
  assert down.a.sharding.spec == P("model", None)
  assert down.b.sharding.spec == P(None, None)
  assert len(up.b.sharding.device_set) == 8


def test_stacked_kernel_adapter_sharding():
  mesh = _mesh()
  w = jax.device_put(jnp.ones((2, 16, 32)),
                     NamedSharding(mesh, P("data", None, "model")))
  node = jlora.apply({"kernel": w}, rank=4, key=KEY)["kernel"]
  assert node.a.sharding.spec == P("data", None, None)
  assert node.b.sharding.spec == P("data", None, "model")
