"""`jlora.wrap`: factored forward equals float64 NumPy math, for every model kind."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from helpers import dot_outputs, np_merge, randomize_b, rel_err

KEY = jax.random.key(0)
X = np.asarray(jax.random.normal(jax.random.key(1), (3, 8)), np.float32)


# -- model kinds: (fn(params, x), params, apply-kwargs, numpy reference) -----

def linen_mlp():
  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Dense(16, name="up")(x))
      return nn.Dense(5, name="down")(h)
  m = MLP()
  params = m.init(KEY, X)["params"]

  def ref(p, x):
    h = np.maximum(x @ p["up"]["kernel"] + p["up"]["bias"], 0)
    return h @ p["down"]["kernel"] + p["down"]["bias"]
  return (lambda p, x: m.apply({"params": p}, x)), params, {}, ref


def linen_dense_general():
  class DG(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.DenseGeneral((2, 4), name="qkv")(x)
      return nn.DenseGeneral(5, axis=(-2, -1), name="o")(h)
  m = DG()
  params = m.init(KEY, X)["params"]

  def ref(p, x):
    h = np.einsum("bi,ihd->bhd", x, p["qkv"]["kernel"]) + p["qkv"]["bias"]
    return np.einsum("bhd,hdo->bo", h, p["o"]["kernel"]) + p["o"]["bias"]
  layout = {"qkv/kernel": "ioo", "o/kernel": "iio"}
  return (lambda p, x: m.apply({"params": p}, x)), params, dict(
      layout=layout), ref


def linen_einsum():
  class E(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Einsum((8, 2, 3), "bi,ihd->bhd", name="proj")(x)
  m = E()
  params = m.init(KEY, X)["params"]

  def ref(p, x):
    return np.einsum("bi,ihd->bhd", x, p["proj"]["kernel"]) + p["proj"]["bias"]
  return (lambda p, x: m.apply({"params": p}, x)), params, dict(
      layout={"proj": "ioo"}), ref


def linen_scan():
  class Layer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
      return jnp.tanh(nn.Dense(8, name="dense")(h)), None

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      layers = nn.scan(Layer, variable_axes={"params": 0},
                       split_rngs={"params": True}, length=3)
      return layers(name="layers")(x, None)[0]
  m = Stack()
  params = m.init(KEY, X)["params"]

  def ref(p, x):
    for k, b in zip(p["layers"]["dense"]["kernel"], p["layers"]["dense"]["bias"]):
      x = np.tanh(x @ k + b)
    return x
  return (lambda p, x: m.apply({"params": p}, x)), params, {}, ref


def linen_remat_scan():
  class Layer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
      return jnp.tanh(nn.Dense(8, name="dense")(h)), None

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      layers = nn.scan(nn.remat(Layer), variable_axes={"params": 0},
                       split_rngs={"params": True}, length=2)
      return layers(name="layers")(x, None)[0]
  m = Stack()
  params = m.init(KEY, X)["params"]
  _, _, _, ref = linen_scan()
  return (lambda p, x: m.apply({"params": p}, x)), params, {}, ref


def linen_bf16():
  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(16, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                   name="up")(x)
      return nn.Dense(5, dtype=jnp.bfloat16, name="down")(nn.relu(h))
  m = MLP()
  params = m.init(KEY, X)["params"]
  _, _, _, ref = linen_mlp()
  return (lambda p, x: m.apply({"params": p}, x)), params, {}, ref


def nnx_linear():
  model = nnx.Linear(8, 5, rngs=nnx.Rngs(0))
  graph, state = nnx.split(model)

  def ref(p, x):
    return x @ p["kernel"] + p["bias"]
  return (lambda s, x: nnx.merge(graph, s)(x)), state, {}, ref


def nnx_linear_general():
  model = nnx.LinearGeneral(8, (2, 3), rngs=nnx.Rngs(0))
  graph, state = nnx.split(model)

  def ref(p, x):
    return np.einsum("bi,ihd->bhd", x, p["kernel"]) + p["bias"]
  return (lambda s, x: nnx.merge(graph, s)(x)), state, dict(
      layout={"kernel": "ioo"}), ref


def nnx_einsum():
  model = nnx.Einsum("bi,io->bo", (8, 5), (5,), rngs=nnx.Rngs(0))
  graph, state = nnx.split(model)

  def ref(p, x):
    return x @ p["kernel"] + p["bias"]
  return (lambda s, x: nnx.merge(graph, s)(x)), state, {}, ref


W = np.asarray(jax.random.normal(jax.random.key(2), (8, 5)), np.float32)
WS = np.asarray(jax.random.normal(jax.random.key(3), (3, 8, 8)), np.float32)


@jax.custom_vjp
def _sin(x):
  return jnp.sin(x)


_sin.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x),))


def plain(fn, ref, w=W):
  def case():
    return fn, {"w": jnp.asarray(w)}, dict(targets="w"), ref
  return case


CASES = {
    "linen_dense": linen_mlp,
    "linen_dense_general": linen_dense_general,
    "linen_einsum": linen_einsum,
    "linen_scan": linen_scan,
    "linen_remat_scan": linen_remat_scan,
    "nnx_linear": nnx_linear,
    "nnx_linear_general": nnx_linear_general,
    "nnx_einsum": nnx_einsum,
    "matmul": plain(lambda p, x: x @ p["w"], lambda p, x: x @ p["w"]),
    "jnp_dot": plain(lambda p, x: jnp.dot(x, p["w"]), lambda p, x: x @ p["w"]),
    "jnp_einsum": plain(lambda p, x: jnp.einsum("bi,io->bo", x, p["w"]),
                        lambda p, x: x @ p["w"]),
    "kernel_on_left": plain(lambda p, x: (p["w"].T @ x.T).T,
                            lambda p, x: x @ p["w"]),
    "nested_jit": plain(lambda p, x: jax.jit(lambda w, x: x @ w)(p["w"], x),
                        lambda p, x: x @ p["w"]),
    "checkpoint": plain(
        lambda p, x: jax.checkpoint(lambda w, x: jnp.sin(x @ w))(p["w"], x),
        lambda p, x: np.sin(x @ p["w"])),
    "lax_scan": plain(
        lambda p, x: jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x,
                                  p["w"])[0],
        lambda p, x: _np_scan(p["w"], x), WS),
    "custom_vjp": plain(lambda p, x: _sin(x @ p["w"]),
                        lambda p, x: np.sin(x @ p["w"])),
    "elementwise_use": plain(lambda p, x: x @ (2.0 * p["w"]),
                             lambda p, x: x @ (2.0 * p["w"])),
}


def _np_scan(ws, x):
  for w in ws:
    x = np.tanh(x @ w)
  return x


def _lora(case):
  fn, params, kwargs, ref = CASES[case]()
  lp = jlora.apply(params, rank=2, alpha=3.0, key=KEY, **kwargs)
  return fn, randomize_b(lp, jax.random.key(7)), ref


def _plain_dict(tree):
  """A float64 NumPy nested dict of a (possibly nnx) params tree."""
  merged = np_merge(tree)
  return nnx.State(merged).to_pure_dict() if isinstance(
      merged, nnx.State) else merged


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_float64_reference(case, jit):
  fn, lp, ref = _lora(case)
  forward = jlora.wrap(fn)
  if jit:
    forward = jax.jit(forward)
  out = forward(lp, X)
  expected = ref(_plain_dict(lp), X.astype(np.float64))
  assert rel_err(out, expected) < 2e-6
  # The unwrapped function on merged params agrees too.
  np.testing.assert_allclose(out, fn(jlora.merge(lp), X), rtol=1e-5,
                             atol=1e-5)


def test_bf16_forward_within_bf16_tolerance():
  fn, params, _, ref = linen_bf16()
  lp = randomize_b(jlora.apply(params, rank=2, alpha=3.0, key=KEY), KEY)
  out = jlora.wrap(fn)(lp, X)
  assert out.dtype == jnp.bfloat16
  assert rel_err(out, ref(_plain_dict(lp), X.astype(np.float64))) < 2e-2


FACTORED_CASES = sorted(set(CASES) - {"elementwise_use"})


@pytest.mark.parametrize("case", FACTORED_CASES)
def test_update_matrix_and_base_gradient_never_formed(case):
  fn, lp, _ = _lora(case)
  trainable, frozen = jlora.partition(lp)

  def loss(t):
    return jnp.sum(jlora.wrap(fn)(jlora.combine(t, frozen), X) ** 2)

  jaxpr = jax.make_jaxpr(jax.grad(loss))(trainable).jaxpr
  kernel_sizes = {math.prod(n.shape[-2:]) if n.layout.endswith("io") else
                  math.prod(n.shape) // math.prod(
                      s for s, r in zip(n.shape, n.layout) if r == "b")
                  for n in jax.tree.leaves(lp, is_leaf=jlora.node.is_lora)
                  if jlora.node.is_lora(n)}
  for shape in dot_outputs(jaxpr):
    # A dot whose output has the size of an (in, out) kernel would be a@b or
    # the weight gradient of w; activations here never have that size.
    assert math.prod(shape[-2:]) not in kernel_sizes or shape[0] == X.shape[0]


def test_elementwise_use_sees_fused_kernel_and_trains():
  fn, lp, ref = _lora("elementwise_use")
  trainable, frozen = jlora.partition(lp)
  g = jax.grad(lambda t: jnp.sum(jlora.wrap(fn)(jlora.combine(t, frozen), X)))(
      trainable)
  assert float(jnp.abs(g["w"].a).sum()) > 0 and float(jnp.abs(g["w"].b).sum()) > 0


@pytest.mark.parametrize("case", ["linen_dense", "linen_scan",
                                  "linen_dense_general", "nnx_linear",
                                  "checkpoint", "lax_scan"])
def test_gradients_match_merged_path_and_finite_differences(case):
  fn, lp, _ = _lora(case)
  trainable, frozen = jlora.partition(lp)

  def loss_wrapped(t):
    return jnp.sum(jnp.sin(jlora.wrap(fn)(jlora.combine(t, frozen), X)))

  def loss_merged(t):
    return jnp.sum(jnp.sin(fn(jlora.merge(jlora.combine(t, frozen)), X)))

  g = jax.jit(jax.grad(loss_wrapped))(trainable)
  g_ref = jax.grad(loss_merged)(trainable)
  for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5)
  # Directional finite difference: (L(t + eps d) - L(t - eps d)) / 2 eps.
  direction = jax.tree.map(lambda x: jax.random.normal(KEY, x.shape), trainable)
  eps = 1e-4  # small: relu kinks and sin curvature bias larger steps
  shift = lambda s: jax.tree.map(lambda t, d: t + s * eps * d, trainable,
                                 direction)
  fd = (loss_wrapped(shift(1.0)) - loss_wrapped(shift(-1.0))) / (2 * eps)
  analytic = sum(jnp.vdot(a, d) for a, d in zip(jax.tree.leaves(g),
                                                jax.tree.leaves(direction)))
  assert abs(float(fd) - float(analytic)) < 2e-2 * max(1.0, abs(float(fd)))


def test_base_kernel_gets_no_gradient():
  fn, lp, _ = _lora("linen_dense")
  g = jax.grad(lambda p: jnp.sum(jlora.wrap(fn)(p, X)))(lp)
  assert float(jnp.abs(g["up"]["kernel"].w).max()) == 0.0
  assert float(jnp.abs(g["up"]["kernel"].b).max()) > 0.0


def test_vmap_over_inputs_and_tree_map():
  fn, lp, ref = _lora("linen_dense")
  xs = np.stack([X, 2 * X])
  out = jax.vmap(jlora.wrap(fn), in_axes=(None, 0))(lp, xs)
  merged = _plain_dict(lp)
  for i in range(2):
    assert rel_err(out[i], ref(merged, xs[i].astype(np.float64))) < 2e-6
  doubled = jax.tree.map(lambda x: 2 * x, lp)
  assert isinstance(doubled["up"]["kernel"], jlora.LoRA)
  np.testing.assert_array_equal(doubled["up"]["kernel"].a,
                                2 * lp["up"]["kernel"].a)


def test_wrong_layout_raises_with_fix():
  fn, params, _, _ = linen_dense_general()
  lp = jlora.apply(params, rank=2, key=KEY, targets="qkv")  # default 'bio'
  with pytest.raises(jlora.LayoutError, match=r"qkv/kernel.*layout=\{'qkv/kernel': 'ioo'\}"):
    jlora.wrap(fn)(lp, X)


def test_partition_half_passed_to_wrap_raises():
  fn, lp, _ = _lora("linen_dense")
  trainable, _ = jlora.partition(lp)
  with pytest.raises(ValueError, match="combine"):
    jlora.wrap(fn)(trainable, X)


def test_without_lora_nodes_calls_function_unchanged():
  fn, params, _, ref = linen_mlp()
  np.testing.assert_allclose(jlora.wrap(fn)(params, X), fn(params, X))


def test_static_arguments_pass_through():
  def fn(p, x, *, scale, mode):
    assert mode == "train"
    return scale * (x @ p["w"])
  lp = randomize_b(jlora.apply({"w": jnp.asarray(W)}, rank=2, targets="w",
                               key=KEY), KEY)
  out = jlora.wrap(fn)(lp, X, scale=2.0, mode="train")
  np.testing.assert_allclose(out, 2.0 * (X @ np_merge(lp)["w"]), rtol=1e-5)


def test_dropout_masks_adapter_input_only():
  w = jnp.asarray(WS[0])
  lp = jlora.apply({"w": w}, rank=8, alpha=8.0, targets="w", key=KEY)
  # Identity factors make the adapter path return its (dropped) input.
  node = dataclasses.replace(lp["w"], a=jnp.eye(8), b=jnp.eye(8), dropout=0.5)
  fn = jlora.wrap(lambda p, x: x @ p["w"])
  base = X.astype(np.float64) @ np.asarray(w, np.float64)
  # No key: deterministic, the plain fused product.
  np.testing.assert_allclose(fn({"w": node}, X), base + X, rtol=1e-5,
                             atol=1e-5)
  rng = jax.random.key(5)
  out = fn({"w": node}, X, lora_rng=rng)
  ratio = (np.asarray(out, np.float64) - base) / X
  # Each input entry is either dropped (0) or scaled by 1/(1-p) = 2.
  dropped = np.isclose(ratio, 0, atol=1e-3)
  assert np.all(dropped | np.isclose(ratio, 2, atol=1e-3))
  assert 0.2 < dropped.mean() < 0.8
  np.testing.assert_array_equal(out, fn({"w": node}, X, lora_rng=rng))
  assert not np.allclose(out, fn({"w": node}, X, lora_rng=jax.random.key(6)))


def test_dora_gain_matches_reference():
  lp = randomize_b(jlora.apply({"w": jnp.asarray(W)}, rank=2, targets="w",
                               key=KEY), KEY)
  m = jax.random.uniform(KEY, (5,), minval=0.5, maxval=2.0)
  node = dataclasses.replace(lp["w"], m=m)
  out = jlora.wrap(lambda p, x: x @ p["w"])({"w": node}, X)
  expected = X.astype(np.float64) @ np_merge({"w": node})["w"]
  assert rel_err(out, expected) < 2e-6
  assert rel_err(jlora.merge({"w": node})["w"], np_merge({"w": node})["w"]) < 2e-6


# -- issue 21: dropout per stacked index, key checks -------------------------

L, B_, I_ = 3, 4, 6


def _identity_stack(dropout=0.5):
  """A (L, I, I) stacked node whose adapter path returns its dropped input."""
  w = jax.random.normal(KEY, (L, I_, I_))
  node = jlora.apply({"w": w}, rank=I_, alpha=float(I_), targets="w",
                     key=KEY)["w"]
  eye = jnp.broadcast_to(jnp.eye(I_), (L, I_, I_))
  return w, dataclasses.replace(node, a=eye, b=eye, dropout=dropout)


def _documented_masks(rng, n, shape, p=0.5):
  """The key derivation `jlora.wrap`'s docstring states."""
  keys = jax.random.split(jax.random.fold_in(rng, n), L)
  return np.stack([np.asarray(jax.random.bernoulli(k, 1 - p, shape))
                   for k in keys])


@pytest.mark.parametrize("use", ["batched_einsum", "batched_dot_general",
                                 "scan", "jit_scan"])
def test_dropout_masks_differ_per_layer_and_follow_the_key_derivation(use):
  w, node = _identity_stack()
  x = jax.random.normal(jax.random.key(4), (B_, I_)) + 3.0  # never 0
  xs = jnp.broadcast_to(x, (L, B_, I_))
  fns = {
      "batched_einsum": lambda p: jnp.einsum("lbi,lio->lbo", xs, p["w"]),
      "batched_dot_general": lambda p: jax.lax.dot_general(
          xs, p["w"], (((2,), (1,)), ((0,), (0,)))),
      "scan": lambda p: jax.lax.scan(lambda c, w: (c, x @ w), 0.0,
                                     p["w"])[1],
  }
  fns["jit_scan"] = jax.jit(fns["scan"])
  rng = jax.random.key(11)
  out = jlora.wrap(fns[use])({"w": node}, lora_rng=rng)
  base = np.einsum("bi,lio->lbo", np.asarray(x, np.float64),
                   np.asarray(w, np.float64))
  ratio = (np.asarray(out, np.float64) - base) / np.asarray(x)[None]
  kept = np.isclose(ratio, 2.0, atol=1e-3)
  assert np.all(kept | np.isclose(ratio, 0.0, atol=1e-3))
  # Each layer its own mask, the one its own key gives.
  for l in range(1, L):
    assert not np.array_equal(kept[0], kept[l])
  np.testing.assert_array_equal(kept, _documented_masks(rng, 0, (B_, I_)))


def test_dropout_on_integer_input_scales_without_truncation():
  lp = jlora.apply({"w": jnp.asarray(WS[0])}, rank=8, alpha=8.0, targets="w",
                   key=KEY)
  node = dataclasses.replace(lp["w"], a=jnp.eye(8), b=jnp.eye(8),
                             dropout=0.25)
  x = jnp.arange(1, 17, dtype=jnp.int32).reshape(2, 8)
  f = lambda p, x: jax.lax.dot_general(
      x, p["w"], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  out = jlora.wrap(f)({"w": node}, x, lora_rng=jax.random.key(2))
  base = np.asarray(x, np.float64) @ np.asarray(WS[0], np.float64)
  ratio = (np.asarray(out, np.float64) - base) / np.asarray(x)
  dropped = np.isclose(ratio, 0.0, atol=1e-4)
  assert dropped.any() and not dropped.all()
  np.testing.assert_allclose(ratio[~dropped], 1 / 0.75, rtol=1e-4)


@pytest.mark.parametrize("rng", [0, jnp.zeros((3,), jnp.uint32),
                                 jax.random.split(KEY, 2)])
def test_bad_lora_rng_names_the_accepted_forms(rng):
  fn, lp, _ = _lora("matmul")
  with pytest.raises((TypeError, ValueError),
                     match=r"lora_rng must be one PRNG key"):
    jlora.wrap(fn)(lp, X, lora_rng=rng)


def test_stacked_axis_kept_by_a_shared_input_product_is_a_layout_error():
  # 'bi,lio->lbo' reads like gemma's heads under a 'bio' layout: one adapter
  # per head, so it is refused rather than guessed; a batched input works.
  _, node = _identity_stack()
  x = jnp.ones((B_, I_))
  with pytest.raises(jlora.LayoutError, match=r"'w'.*it fits 'oio'"):
    jlora.wrap(lambda p: jnp.einsum("bi,lio->lbo", x, p["w"]))({"w": node})


def test_vmap_over_dropout_keys():
  w, node = _identity_stack()
  x = jax.random.normal(jax.random.key(4), (B_, I_)) + 3.0
  f = jlora.wrap(lambda p, x: jnp.einsum(
      "lbi,lio->lbo", jnp.broadcast_to(x, (L, B_, I_)), p["w"]))
  keys = jax.random.split(jax.random.key(8), 2)
  many = jax.vmap(lambda k: f({"w": node}, x, lora_rng=k))(keys)
  for i in range(2):
    np.testing.assert_array_equal(np.asarray(many[i]), np.asarray(
        f({"w": node}, x, lora_rng=keys[i])))
  assert not np.array_equal(np.asarray(many[0]), np.asarray(many[1]))


def test_shard_map_bodies_compute_with_the_adapted_kernels():
  # One kernel each device gets whole (kept factored: no dot forms a
  # (16, 12) kernel) and one split over the manual axis (fused there).
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  ks = jax.random.split(KEY, 3)
  params = {"whole": {"kernel": jax.random.normal(ks[0], (16, 12))},
            "split": {"kernel": jax.random.normal(ks[1], (16, 8))}}
  lp = randomize_b(jlora.apply(params, rank=2, key=ks[2]), KEY)
  rows = np.asarray(jax.random.normal(ks[2], (8, 16)), np.float32)

  def fn(p, x):
    body = lambda xr, xa, w, v: (xr @ w, xa @ v)
    return jax.shard_map(
        body, mesh=mesh, in_specs=(P("data"), P(), P(), P(None, "data")),
        out_specs=(P("data"), P(None, "data")))(
            x, x, p["whole"]["kernel"], p["split"]["kernel"])

  got = jax.jit(jlora.wrap(fn))(lp, rows)
  ref = np_merge(lp)
  np.testing.assert_allclose(got[0], rows @ ref["whole"]["kernel"], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(got[1], rows @ ref["split"]["kernel"], rtol=1e-5,
                             atol=1e-5)
  jaxpr = jax.make_jaxpr(jlora.wrap(fn))(lp, rows).jaxpr
  assert (16, 12) not in dot_outputs(jaxpr)

  trainable, frozen = jlora.partition(lp)
  loss = lambda f: lambda t: sum(jnp.sum(jnp.sin(y)) for y in f(
      jlora.combine(t, frozen), rows))
  got = jax.jit(jax.grad(loss(jlora.wrap(fn))))(trainable)
  want = jax.jit(jax.grad(loss(lambda p, x: fn(jlora.merge(p), x))))(
      trainable)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
