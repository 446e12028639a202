"""Mixed-adapter batches: `stack_adapters` + ``wrap(..., adapter_ids=ids)``.

References: float64 NumPy forwards of each example with its own adapter
fused (`helpers.np_fused`), per-adapter gradients and training runs taken one
adapter at a time, and the trees that went in (bit-exact round trips).
"""

import dataclasses
import functools

import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jlora
from jlora.models import LlamaForCausalLM, ModelConfig, generate
from jlora.node import is_lora, is_multi
from helpers import dot_outputs, np_fused, randomize_b, train_adapters

KEY = jax.random.key(0)


class MLP(nn.Module):
  flatten: bool = False

  @nn.compact
  def __call__(self, x):
    shape = x.shape
    if self.flatten:  # (B, T, F) -> (B * T, F), as some models do
      x = x.reshape(-1, shape[-1])
    h = nn.relu(nn.Dense(16, name="up")(x))
    y = nn.Dense(5, name="down")(h)
    return y.reshape(*shape[:-1], 5) if self.flatten else y


X = np.asarray(jax.random.normal(jax.random.key(1), (6, 3, 8)), np.float32)
PARAMS = MLP().init(KEY, X)["params"]


def _lora(seed, **kw):
  lp = jlora.apply(PARAMS, key=jax.random.key(seed), **kw)
  return randomize_b(lp, jax.random.key(seed + 100))


@pytest.fixture(scope="module")
def three():
  """Three adapters: other ranks, an rsLoRA one, one adapting 'up' only."""
  s = jlora.add_adapter(PARAMS, "r2", _lora(1, rank=2, alpha=3.0))
  s = jlora.add_adapter(s, "r4rs", _lora(2, rank=4, alpha=2.0, rslora=True))
  return jlora.add_adapter(s, "up1", _lora(3, rank=1, targets="up"))


def np_forward(p, x):
  """float64 MLP forward; `p` plain params or a LoRA tree."""
  k = lambda layer: (np_fused(p[layer]["kernel"]) if is_lora(
      p[layer]["kernel"]) else np.asarray(p[layer]["kernel"], np.float64))
  h = np.maximum(x @ k("up") + np.asarray(p["up"]["bias"], np.float64), 0)
  return h @ k("down") + np.asarray(p["down"]["bias"], np.float64)


def np_mixed(s, names, ids, x):
  x = np.asarray(x, np.float64)
  return np.stack([
      np_forward(jlora.select(s, names[i] if i >= 0 else None), x[k])
      for k, i in enumerate(ids)])


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("flatten", [False, True])
def test_each_example_runs_its_own_adapter(three, jit, flatten):
  names = ["r2", "r4rs", "up1"]
  stacked = jlora.stack_adapters(three, names)
  ids = np.array([2, 0, -1, 1, 1, 0], np.int32)
  forward = jlora.wrap(MLP(flatten).apply)
  if jit:
    forward = jax.jit(forward)
  got = forward({"params": stacked}, X, adapter_ids=ids)
  want = np_mixed(three, names, ids, X)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # Every example differs from the base unless its id is -1.
  base = np_forward(PARAMS, np.asarray(X, np.float64))
  moved = np.abs(want - base).max(axis=(1, 2)) > 1e-3
  np.testing.assert_array_equal(moved, ids >= 0)


def test_stacked_nodes_hold_padded_factors(three):
  stacked = jlora.stack_adapters(three)
  up, down = stacked["up"]["kernel"], stacked["down"]["kernel"]
  assert is_multi(up) and is_multi(down)
  assert up.names == ("r2", "r4rs", "up1") and up.ranks == (2, 4, 1)
  assert down.ranks == (2, 4, 0)  # "up1" does not adapt 'down'
  assert up.a.shape == (3, 8, 4) and up.b.shape == (3, 4, 16)
  assert up.scales == pytest.approx((1.5, 1.0, 1.0))
  assert up.w is three.base["up"]["kernel"]
  np.testing.assert_array_equal(np.asarray(up.a[0, :, 2:]), 0)
  np.testing.assert_array_equal(np.asarray(down.b[2]), 0)
  # The wrapped set (stacked on each call) gives the same outputs.
  ids = np.array([0, 1, 2, 0, 1, 2], np.int32)
  a = jlora.wrap(MLP().apply)({"params": stacked}, X, adapter_ids=ids)
  b = jlora.wrap_adapter(MLP().apply)({"params": three}, X, adapter_ids=ids)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unstack_inverts_stack_bit_exact(three):
  back = jlora.unstack_adapters(jlora.stack_adapters(three))
  assert back.names == three.names
  for name in three.names:
    got, want = jlora.select(back, name), jlora.select(three, name)
    assert jax.tree.structure(got, is_leaf=is_lora) == jax.tree.structure(
        want, is_leaf=is_lora)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_adalora_gains_are_folded_into_b():
  lp = _lora(4, rank=3)
  e = jnp.array([2.0, 0.0, -0.5])
  lp = jax.tree.map(lambda n: dataclasses.replace(n, e=e) if is_lora(n) else n,
                    lp, is_leaf=is_lora)
  s = jlora.add_adapter(PARAMS, "ada", lp)
  ids = np.zeros(6, np.int32)
  got = jlora.wrap(MLP().apply)({"params": jlora.stack_adapters(s)}, X,
                                adapter_ids=ids)
  np.testing.assert_allclose(np.asarray(got), np_forward(lp, X.astype(
      np.float64)), rtol=1e-5, atol=1e-5)


def _loss(apply, tree, x, **kw):
  return jnp.sum(jnp.square(apply({"params": tree}, x, **kw)))


def test_gradients_reach_each_adapter_from_its_examples_only(three):
  names = ["r2", "r4rs", "up1"]
  ids = np.array([1, 1, 0, -1, 1, 0], np.int32)
  forward = jlora.wrap(MLP().apply)
  trainable, frozen = jlora.partition(jlora.stack_adapters(three, names))
  grads = jax.jit(jax.grad(lambda t: _loss(
      forward, jlora.combine(t, frozen), X, adapter_ids=ids)))(trainable)
  for i, name in enumerate(names):
    single_t, single_f = jlora.partition(jlora.select(three, name))
    rows = ids == i
    if rows.any():
      want = jax.grad(lambda t: _loss(forward, jlora.combine(t, single_f),
                                      X[rows]))(single_t)
    else:
      want = jax.tree.map(jnp.zeros_like, single_t)
    for layer in ("up", "down"):
      g, w = grads[layer]["kernel"], want[layer]["kernel"]
      r = g.ranks[i]
      if w is None:
        assert r == 0
        continue
      np.testing.assert_allclose(np.asarray(g.a[i, :, :r]), np.asarray(w.a),
                                 rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(np.asarray(g.b[i, :r]), np.asarray(w.b),
                                 rtol=1e-4, atol=1e-5)
      # Padded ranks get no gradient, so they stay zero under training.
      np.testing.assert_array_equal(np.asarray(g.a[i, :, r:]), 0)
      np.testing.assert_array_equal(np.asarray(g.b[i, r:]), 0)
  # "up1" has no example: its factors get exactly zero gradient.
  np.testing.assert_array_equal(np.asarray(grads["up"]["kernel"].b[2]), 0)


def test_training_a_stack_equals_training_each_adapter_alone(three):
  """Adam is per-parameter and the summed loss separates by adapter."""
  names = ["r2", "r4rs"]
  ids = np.array([0, 1, 1, 0, 0, 1], np.int32)
  forward = jlora.wrap(MLP().apply)

  def train(tree, x, **kw):
    return train_adapters(tree, lambda t: _loss(forward, t, x, **kw), 5)[0]

  trained = jlora.unstack_adapters(
      train(jlora.stack_adapters(three, names), X, adapter_ids=ids))
  for i, name in enumerate(names):
    alone = train(jlora.select(three, name), X[ids == i])
    got = jlora.select(trained, name)
    for layer in ("up", "down"):
      for f in ("a", "b"):
        np.testing.assert_allclose(
            np.asarray(getattr(got[layer]["kernel"], f)),
            np.asarray(getattr(alone[layer]["kernel"], f)), rtol=2e-4,
            atol=2e-5)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 5), ranks=st.lists(st.integers(1, 4), min_size=1,
                                               max_size=4),
       seed=st.integers(0, 2**16), dtype=st.sampled_from(["float32",
                                                          "bfloat16"]))
def test_mixed_batch_matches_float64_property(batch, ranks, seed, dtype):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(7, 6)).astype(dtype)
  s = jlora.AdapterSet({"kernel": jnp.asarray(w)}, {}, None)
  for k, r in enumerate(ranks):
    lp = randomize_b(jlora.apply({"kernel": jnp.asarray(w)}, rank=r,
                                 alpha=float(k + 1),
                                 key=jax.random.key(seed + k)),
                     jax.random.key(seed + 50 + k))
    s = jlora.add_adapter(s, f"a{k}", lp)
  ids = rng.integers(-1, len(ranks), size=batch).astype(np.int32)
  x = rng.normal(size=(batch, 3, 7)).astype(dtype)
  # With batch == 3 the (batch, 3, 7) input has two candidate batch axes,
  # which must be named.
  axis = {"adapter_ids_axis": 0} if batch == 3 else {}
  got = jax.jit(jlora.wrap(lambda p, x: x @ p["kernel"], **axis))(
      jlora.stack_adapters(s), x, adapter_ids=ids)
  nodes = [jlora.select(s, n)["kernel"] for n in s.names]
  want = np.stack([
      np.asarray(x[k], np.float64) @ (np_fused(nodes[i]) if i >= 0 else
                                      np.asarray(w, np.float64))
      for k, i in enumerate(ids)])
  tol = 1e-5 if dtype == "float32" else 6e-2
  scale = max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(np.asarray(got, np.float64), want,
                             atol=tol * scale, rtol=tol)


CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                  num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def llama():
  model = LlamaForCausalLM(CFG, scan_layers=True, remat="matmuls")
  tokens = jax.random.randint(jax.random.key(3), (4, 6), 0, CFG.vocab_size)
  params = model.init(KEY, tokens)["params"]
  s = jlora.AdapterSet(params, {}, None)
  for k, targets in enumerate(["q_proj|v_proj", "all-linear"]):
    lp = jlora.apply(params, rank=4 + 4 * k, key=jax.random.key(10 + k),
                     targets=targets)
    s = jlora.add_adapter(s, f"task{k}", randomize_b(
        lp, jax.random.key(20 + k), std=0.3))
  return model, tokens, s


def test_llama_scan_remat_logits_and_generation(llama):
  model, tokens, s = llama
  ids = np.array([1, -1, 0, 1], np.int32)
  forward = jax.jit(jlora.wrap(model.apply))
  got = forward({"params": jlora.stack_adapters(s)}, tokens, adapter_ids=ids)
  for k, i in enumerate(ids):
    tree = jlora.select(s, s.names[i] if i >= 0 else None)
    want = forward({"params": tree}, tokens[k:k + 1])
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[0]),
                               rtol=2e-4, atol=2e-4)
  # Decoding with a KV cache: one token per step, each row its own adapter.
  out = generate(model, jlora.stack_adapters(s), tokens, max_new_tokens=4,
                 apply_fn=functools.partial(jlora.wrap(model.apply),
                                            adapter_ids=ids))
  for k, i in enumerate(ids):
    tree = jlora.select(s, s.names[i] if i >= 0 else None)
    want = generate(model, tree, tokens[k:k + 1], max_new_tokens=4,
                    apply_fn=jlora.wrap(model.apply))
    np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(want[0]))


def test_sharded_mixed_batch_matches_one_device(three):
  devices = np.array(jax.devices()[:8])
  if devices.size < 2:
    pytest.skip("needs several devices")
  mesh = Mesh(devices.reshape(-1), ("data",))
  x = np.concatenate([X, X[:2]])  # 8 examples, one per device
  ids = np.array([0, 1, 2, -1, 2, 1, 0, 0], np.int32)
  stacked = jlora.stack_adapters(three)
  want = jlora.wrap(MLP().apply)({"params": stacked}, x, adapter_ids=ids)
  data = NamedSharding(mesh, P("data"))
  forward = jax.jit(jlora.wrap(MLP().apply), out_shardings=data)
  got = forward({"params": stacked}, jax.device_put(x, data),
                adapter_ids=jax.device_put(ids, data))
  assert got.sharding.is_equivalent_to(data, got.ndim)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6,
                             atol=1e-6)


def test_errors_name_the_problem(three, tmp_path):
  stacked = jlora.stack_adapters(three)
  forward = jlora.wrap(MLP().apply)
  with pytest.raises(ValueError, match="adapter_ids=ids"):
    forward({"params": stacked}, X)
  with pytest.raises(ValueError, match="stack_adapters"):
    forward({"params": jlora.select(three, "r2")}, X,
            adapter_ids=np.zeros(6, np.int32))
  with pytest.raises(ValueError, match=r"index 3.*0\.\.2"):
    forward({"params": stacked}, X, adapter_ids=np.array([3, 0, 0, 0, 0, 0]))
  with pytest.raises(ValueError, match="1-D integer"):
    forward({"params": stacked}, X, adapter_ids=np.zeros((6, 1), np.int32))
  with pytest.raises(ValueError, match="1-D integer"):
    forward({"params": stacked}, X, adapter_ids=np.zeros(6, np.float32))
  with pytest.raises(ValueError, match="up/kernel.*batch"):
    forward({"params": stacked}, X, adapter_ids=np.zeros(4, np.int32))
  with pytest.raises(TypeError, match="unstack_adapters"):
    jlora.merge(stacked)
  with pytest.raises(TypeError, match="save_adapter.*unstack_adapters"):
    jlora.save_adapter(tmp_path / "a", stacked)
  with pytest.raises(TypeError, match="peft.save.*unstack_adapters"):
    jlora.peft.save(stacked, tmp_path / "p")
  with pytest.raises(TypeError, match="add_adapter.*unstack_adapters"):
    jlora.add_adapter(three, "again", stacked)
  # A use other than a matrix product cannot run per-example adapters.
  with pytest.raises(TypeError, match="up/kernel.*matrix product"):
    jlora.wrap(lambda p, x: x @ (p["up"]["kernel"] * 2.0))(
        stacked, X, adapter_ids=np.zeros(6, np.int32))
  dora = jlora.add_adapter(PARAMS, "d", _lora(5, rank=2, dora=True))
  with pytest.raises(ValueError, match="DoRA"):
    jlora.stack_adapters(dora)
  with pytest.raises(KeyError, match="nope"):
    jlora.stack_adapters(three, ["r2", "nope"])
  with pytest.raises(ValueError, match="repeat"):
    jlora.stack_adapters(three, ["r2", "r2"])
  with pytest.raises(ValueError, match="no MultiLoRA"):
    jlora.unstack_adapters(jlora.select(three, "r2"))


def test_summary_and_count_of_a_stack(three):
  stacked = jlora.stack_adapters(three)
  text = jlora.summary(stacked)
  assert "2/4/1" in text and "1.5/1/1" in text
  want = sum(int(np.prod(x.shape)) for n in ("up", "down")
             for x in (stacked[n]["kernel"].a, stacked[n]["kernel"].b))
  assert jlora.count(stacked).trainable == want


def test_stacked_adapters_share_input_products(three):
  """q/k/v-style kernels with stacked adapters still share one A product."""
  names = ["r2", "r4rs", "up1"]
  ids = np.array([2, 0, -1, 1, 1, 0], np.int32)
  # 'down' cut to 8 inputs, so that 'up' and 'down' can both read x.
  square = dict(PARAMS)
  square["down"] = {**PARAMS["down"], "kernel": PARAMS["down"]["kernel"][:8]}
  s = jlora.AdapterSet(square, {}, None)
  for n in names:
    lp = jlora.select(three, n)
    if "kernel" in lp["down"] and is_lora(lp["down"]["kernel"]):
      d = lp["down"]["kernel"]
      lp = {**lp, "down": {**lp["down"], "kernel": dataclasses.replace(
          d, w=d.w[:8], a=d.a[:8])}}
    s = jlora.add_adapter(s, n, lp)
  stacked = jlora.stack_adapters(s, names)
  f = lambda p, x: x @ p["up"]["kernel"] + jnp.pad(
      x @ p["down"]["kernel"], [(0, 0), (0, 0), (0, 11)])
  shared = jlora.wrap(f)(stacked, X, adapter_ids=ids)
  alone = jlora.wrap(f, share_inputs=False)(stacked, X, adapter_ids=ids)
  np.testing.assert_allclose(np.asarray(shared), np.asarray(alone),
                             rtol=1e-6, atol=1e-6)
  want = np.stack([
      np.asarray(X[k], np.float64) @ np_fused_or_base(s, names, i, "up") +
      np.pad(np.asarray(X[k], np.float64) @ np_fused_or_base(
          s, names, i, "down"), [(0, 0), (0, 11)])
      for k, i in enumerate(ids)])
  np.testing.assert_allclose(np.asarray(shared), want, rtol=1e-5, atol=1e-5)
  count = lambda share: len(dot_outputs(jax.make_jaxpr(
      lambda p: jlora.wrap(f, share_inputs=share)(p, X, adapter_ids=ids))(
          stacked).jaxpr))
  assert count(False) - count(True) == 1


def np_fused_or_base(s, names, i, layer):
  node = jlora.select(s, names[i] if i >= 0 else None)[layer]["kernel"]
  return np_fused(node) if is_lora(node) else np.asarray(node, np.float64)


def test_training_state_of_a_stack_checkpoints_and_resumes(three, tmp_path):
  """A stack's trainable half and optimizer state go through Orbax intact."""
  trainable, _ = jlora.partition(jlora.stack_adapters(three))
  tx = optax.adam(1e-2)
  opt_state = tx.init(trainable)
  manager = jlora.CheckpointManager(tmp_path / "ckpt", async_save=False)
  manager.save(3, trainable=trainable, opt_state=opt_state)
  manager.close()
  restored = jlora.CheckpointManager(tmp_path / "ckpt").restore(
      like=(trainable, opt_state))
  assert restored.step == 3
  got = jax.tree.leaves(restored.trainable, is_leaf=is_lora)
  want = jax.tree.leaves(trainable, is_leaf=is_lora)
  for g, w in zip(got, want):
    assert is_multi(g) and g.names == w.names and g.ranks == w.ranks
    np.testing.assert_array_equal(np.asarray(g.a), np.asarray(w.a))
    np.testing.assert_array_equal(np.asarray(g.b), np.asarray(w.b))


# -- issue 21: id range under jit, the batch axis ---------------------------

def _two(w_shape=(6, 5)):
  w = jax.random.normal(KEY, w_shape)
  s = jlora.AdapterSet({"kernel": w}, {}, None)
  for k in range(2):
    lp = jlora.apply({"kernel": w}, rank=2, key=jax.random.key(k))
    s = jlora.add_adapter(s, f"a{k}", randomize_b(lp, jax.random.key(9 + k)))
  return s, [jlora.select(s, n)["kernel"] for n in s.names]


def _rows(x, nodes, ids, axis):
  """float64 reference: example k along `axis` runs nodes[ids[k]]."""
  x = np.moveaxis(np.asarray(x, np.float64), axis, 0)
  w = np.asarray(nodes[0].w, np.float64)
  out = np.stack([x[k] @ (np_fused(nodes[i]) if i >= 0 else w)
                  for k, i in enumerate(ids)])
  return np.moveaxis(out, 0, axis)


@pytest.mark.parametrize("ids", [[0, -2, 1], [-5, 0, 0], [0, 1, 2]])
def test_out_of_range_ids_raise_eagerly_and_are_nan_and_checkable_under_jit(
    ids):
  from jax.experimental import checkify
  s, nodes = _two()
  stacked = jlora.stack_adapters(s)
  f = jlora.wrap(lambda p, x: x @ p["kernel"])
  x = np.asarray(jax.random.normal(jax.random.key(1), (3, 6)), np.float32)
  ids = np.array(ids, np.int32)
  bad = (ids < -1) | (ids >= 2)
  with pytest.raises(ValueError, match=rf"index {ids[bad][0]} .*indices "
                     r"0\.\.1, and -1 runs the bare base"):
    f(stacked, x, adapter_ids=ids)
  # Under jit the values are unknown while tracing: the bad rows are NaN,
  # never silently the base's, and the rest are right.
  out = np.asarray(jax.jit(f)(stacked, x, adapter_ids=ids))
  np.testing.assert_array_equal(np.isnan(out).all(axis=1), bad)
  good = np.where(bad, -1, ids)
  np.testing.assert_allclose(out[~bad], _rows(x, nodes, good, 0)[~bad],
                             rtol=1e-5, atol=1e-5)
  # checkify reports the id and the range.
  err, _ = checkify.checkify(jax.jit(f))(stacked, x, adapter_ids=ids)
  assert f"adapter_ids holds {ids[bad][0]}, out of range" in err.get()
  assert "indices 0..1, and -1 runs the bare base" in err.get()
  err, _ = checkify.checkify(jax.jit(f))(stacked, x,
                                         adapter_ids=np.array([0, 1, -1]))
  assert err.get() is None


def test_time_major_input_runs_adapters_along_the_batch_axis():
  s, nodes = _two()
  stacked = jlora.stack_adapters(s)
  f = lambda p, x: x @ p["kernel"]
  ids = np.array([1, -1], np.int32)
  x = np.asarray(jax.random.normal(jax.random.key(1), (4, 2, 6)), np.float32)
  # T = 4 is a multiple of B = 2; the batch is the axis of size B.
  got = jax.jit(jlora.wrap(f))(stacked, x, adapter_ids=ids)
  np.testing.assert_allclose(np.asarray(got), _rows(x, nodes, ids, 1),
                             rtol=1e-5, atol=1e-5)
  # T == B: two candidate axes, an error that says how to name one.
  x2 = x[:2]
  with pytest.raises(ValueError, match=r"axes \[0, 1\] could each be the "
                     r"batch axis.*adapter_ids_axis"):
    jlora.wrap(f)(stacked, x2, adapter_ids=ids)
  for axis in (1, -2):
    got = jax.jit(jlora.wrap(f, adapter_ids_axis=axis))(stacked, x2,
                                                         adapter_ids=ids)
    np.testing.assert_allclose(np.asarray(got), _rows(x2, nodes, ids, 1),
                               rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"adapter_ids_axis=2.*shape \(2, 2, 6\)"):
    jlora.wrap(f, adapter_ids_axis=2)(stacked, x2, adapter_ids=ids)
  with pytest.raises(TypeError, match="adapter_ids_axis must be an int"):
    jlora.wrap(f, adapter_ids_axis="time")


def test_named_batch_axis_holds_inside_a_scan_over_time():
  """-2 names (T, B, F) outside and each step's (B, F) inside a scan."""
  s, nodes = _two((6, 6))
  stacked = jlora.stack_adapters(s)

  def rnn(p, xs):
    step = lambda h, x: (jnp.tanh(x @ p["kernel"] + h), h)
    return jax.lax.scan(step, jnp.zeros(xs.shape[1:]), xs)[1]

  ids = np.array([0, 1, -1], np.int32)
  xs = np.asarray(jax.random.normal(jax.random.key(2), (3, 3, 6)), np.float32)
  got = jlora.wrap(rnn, adapter_ids_axis=-2)(stacked, xs, adapter_ids=ids)
  for k, i in enumerate(ids):
    w = np_fused(nodes[i]) if i >= 0 else np.asarray(nodes[0].w, np.float64)
    h, want = np.zeros(6), []
    for x in np.asarray(xs[:, k], np.float64):
      want.append(h)
      h = np.tanh(x @ w + h)
    np.testing.assert_allclose(np.asarray(got[:, k]), np.stack(want),
                               rtol=1e-5, atol=1e-5)
  # Each step's (B, F) input has one candidate axis: inference agrees.
  np.testing.assert_allclose(
      np.asarray(jlora.wrap(rnn)(stacked, xs, adapter_ids=ids)),
      np.asarray(got), rtol=1e-6, atol=1e-6)


def test_empty_and_single_ids():
  s, nodes = _two()
  stacked = jlora.stack_adapters(s)
  f = jlora.wrap(lambda p, x: x @ p["kernel"])
  x = np.asarray(jax.random.normal(jax.random.key(1), (1, 1, 6)), np.float32)
  with pytest.raises(ValueError, match="adapter_ids is empty"):
    f(stacked, x, adapter_ids=np.zeros(0, np.int32))
  # One example: every axis may hold it, and all give the same result.
  got = f(stacked, x, adapter_ids=np.array([1]))
  np.testing.assert_allclose(np.asarray(got), _rows(x, nodes, [1], 0),
                             rtol=1e-5, atol=1e-5)
