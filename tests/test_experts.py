"""LoRA on stacked expert kernels, kept factored under every selection form.

References: float64 NumPy on the fused kernels (`helpers.np_fused`), the
merged path (the unwrapped function on `jlora.merge`), per-example fused
forwards for mixed-adapter batches, and the jaxpr of the gradient (no
product of kernel size, no weight gradient of the frozen experts).
"""

import dataclasses
import math
import os
import subprocess
import sys

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax import lax

import jlora
from jlora.node import is_lora
from helpers import np_fused, randomize_b, rel_err

KEY = jax.random.key(0)
# Sizes chosen so that no activation, factor or gradient of the tests has
# the size of an expert kernel (E * D * F = 168) or of one expert (42).
E, D, F, R, K = 4, 6, 7, 2, 2
B, S = 2, 4
T = B * S
W = np.asarray(jax.random.normal(jax.random.key(1), (E, D, F)), np.float32)
X = np.asarray(jax.random.normal(jax.random.key(2), (T, D)), np.float32)
IDS = np.array([2, 0, 3, 3, 1, 0, 2, 1], np.int32)  # one expert per token
TOPK = np.array([[2, 0], [3, 1], [0, 1], [3, 2], [1, 0], [2, 3], [0, 3],
                 [1, 2]], np.int32)  # (T, K)


# Each form: (fn(p, x, ids), float64 NumPy reference on the fused kernel).
# `ids` is traced like any array argument of a wrapped function.
def _ragged(p, x, ids):
  order = jnp.argsort(ids)
  y = lax.ragged_dot(x[order], p["w"], jnp.bincount(ids, length=E))
  return jnp.zeros_like(y).at[order].set(y)


def _np_per_token(w, x, ids):
  return np.stack([x[t] @ w[ids[t]] for t in range(len(ids))])


FORMS = {
    "static_index": (lambda p, x, ids: x @ p["w"][1] + x @ p["w"][3],
                     lambda w, x, ids: x @ w[1] + x @ w[3]),
    "static_slice": (lambda p, x, ids: jnp.einsum("ti,eio->teo", x,
                                                  p["w"][1:3]),
                     lambda w, x, ids: np.einsum("ti,eio->teo", x, w[1:3])),
    "traced_index": (lambda p, x, ids: x @ p["w"][ids[0]],
                     lambda w, x, ids: x @ w[ids[0]]),
    "dynamic_slice": (
        lambda p, x, ids: jnp.einsum(
            "ti,eio->teo", x, lax.dynamic_slice(p["w"], (ids[4], 0, 0),
                                                (2, D, F))),
        lambda w, x, ids: np.einsum("ti,eio->teo", x, w[ids[4]:ids[4] + 2])),
    "dynamic_index_in_dim": (
        lambda p, x, ids: x @ lax.dynamic_index_in_dim(p["w"], ids[1],
                                                       keepdims=False),
        lambda w, x, ids: x @ w[ids[1]]),
    "gather": (lambda p, x, ids: jnp.einsum("ti,tio->to", x, p["w"][ids]),
               _np_per_token),
    "take": (lambda p, x, ids: jnp.einsum("ti,tio->to", x,
                                          jnp.take(p["w"], ids, axis=0)),
             _np_per_token),
    "ragged_dot": (_ragged, _np_per_token),
    "batched_einsum": (
        lambda p, x, ids: jnp.einsum("eci,eio->eco", x[:E * 2].reshape(
            E, 2, D), p["w"]),
        lambda w, x, ids: np.einsum("eci,eio->eco", x[:E * 2].reshape(
            E, 2, D), w)),
    "vmap_over_experts": (
        lambda p, x, ids: jax.vmap(lambda w, x: x @ w)(p["w"], x[:E * 2]
                                                       .reshape(E, 2, D)),
        lambda w, x, ids: np.einsum("eci,eio->eco", x[:E * 2].reshape(
            E, 2, D), w)),
    # Selection, then layout ops, then the product.
    "select_transpose_cast": (
        lambda p, x, ids: jnp.einsum(
            "ti,toi->to", x.astype(jnp.bfloat16),
            p["w"][ids].transpose(0, 2, 1).astype(jnp.bfloat16),
            preferred_element_type=jnp.float32),
        _np_per_token),
    "select_reshape": (
        lambda p, x, ids: jnp.einsum("tab,abo->to", x.reshape(T, 2, 3),
                                     p["w"][2].reshape(2, 3, F)),
        lambda w, x, ids: x @ w[2]),
}
TOLERANCE = {"select_transpose_cast": 2e-2}


def _lora(w=W, seed=0, **kw):
  lp = jlora.apply({"w": jnp.asarray(w)}, rank=R, alpha=2.0, targets="w",
                   key=jax.random.key(seed), **kw)
  return randomize_b(lp, jax.random.key(seed + 100))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_each_form_matches_float64_and_merged_path(form, jit):
  fn, ref = FORMS[form]
  lp = _lora()
  forward = jax.jit(jlora.wrap(fn)) if jit else jlora.wrap(fn)
  got = forward(lp, X, IDS)
  want = ref(np_fused(lp["w"]), X.astype(np.float64), IDS)
  assert rel_err(got, want) < TOLERANCE.get(form, 2e-6)
  tol = TOLERANCE.get(form, 1e-5)
  np.testing.assert_allclose(got, fn(jlora.merge(lp), X, IDS), rtol=tol,
                             atol=tol * np.abs(want).max())


def _grads(fn, lp, *args):
  """Gradients of the adapters through the wrapped and the merged path."""
  trainable, frozen = jlora.partition(lp)

  def wrapped(t):
    return jnp.sum(jnp.sin(jlora.wrap(fn)(jlora.combine(t, frozen), *args)))

  def merged(t):
    return jnp.sum(jnp.sin(fn(jlora.merge(jlora.combine(t, frozen)), *args)))

  return (jax.grad(wrapped)(trainable), jax.grad(merged)(trainable),
          wrapped, merged, trainable)


@pytest.mark.parametrize("form", sorted(set(FORMS) - set(TOLERANCE)))
def test_each_form_gradients_match_merged_path(form):
  fn, _ = FORMS[form]
  g, g_ref, *_ = _grads(fn, _lora(), X, IDS)
  for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(g["w"].b).max()) > 0


# -- the structural test: no kernel-sized product on the gradient -------------


def kernel_sized_ops(jaxpr, seeds, shapes) -> list[str]:
  """Ops of `jaxpr` (sub-jaxprs included) that form a kernel-sized array.

  `seeds` maps input vars to {"a"} or {"b"}; `shapes` are the kernels' and
  one expert's shapes. Flags every matrix product whose output has one of
  those shapes (``a @ b`` or a weight gradient of the frozen experts) and
  every op whose output has one of their sizes and depends on both factors.
  """
  sizes = {math.prod(s) for s in shapes}
  found = []

  def walk(jaxpr, taint):
    for eqn in jaxpr.eqns:
      t = frozenset().union(*(taint.get(v, frozenset()) for v in eqn.invars
                              if not isinstance(v, jax.extend.core.Literal)))
      subs = list(jax.extend.core.jaxprs_in_params(eqn.params))
      for sub in subs:
        if len(sub.invars) == len(eqn.invars):
          inner = {s: taint.get(v, frozenset()) for s, v in
                   zip(sub.invars, eqn.invars)
                   if not isinstance(v, jax.extend.core.Literal)}
        else:
          inner = {s: t for s in sub.invars}
        walk(sub, inner)
      for v in eqn.outvars:
        taint[v] = t
        shape = tuple(v.aval.shape)
        if "dot" in eqn.primitive.name and shape in shapes:
          found.append(f"{eqn.primitive.name} -> {shape}")
        # A call's outputs (a scan's, a shard_map's) depend on all its
        # inputs only as far as the walk of its body above can tell.
        elif (t >= {"a", "b"} and math.prod(shape) in sizes and not subs
              and jnp.issubdtype(v.aval.dtype, jnp.inexact)):
          found.append(f"{eqn.primitive.name} -> {shape} from a and b")

  walk(jaxpr, dict(seeds))
  return found


def _factor_seeds(jaxpr, trainable):
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(trainable)[0]]
  return {v: frozenset(p[-1]) for v, p in zip(jaxpr.invars, paths)
          if p.endswith((".a", ".b"))}


def _kernel_shapes(lp):
  shapes = set()
  for n in jax.tree.leaves(lp, is_leaf=is_lora):
    if is_lora(n):
      shapes.add(tuple(n.shape))
      shapes.add(tuple(s for s, r in zip(n.shape, n.layout) if r != "b"))
      shapes.add(tuple(n.shape[n.layout.count("b") - 1:]))  # one layer
  return shapes


def assert_factored(fn, lp, *args):
  """The structural test on the gradient, and its negative control."""
  trainable, frozen = jlora.partition(lp)
  shapes = _kernel_shapes(lp)
  args = [jnp.asarray(a) for a in args]

  def check(forward):
    def loss(t):
      return jnp.sum(jnp.sin(forward(jlora.combine(t, frozen), *args)))
    jaxpr = jax.make_jaxpr(jax.grad(loss))(trainable).jaxpr
    return kernel_sized_ops(jaxpr, _factor_seeds(jaxpr, trainable), shapes)

  assert check(jlora.wrap(fn)) == []
  # The same check flags the merged path, which forms a @ b.
  assert check(lambda p, *a: fn(jlora.merge(p), *a))


@pytest.mark.parametrize("form", sorted(FORMS))
def test_no_kernel_sized_product_on_the_gradient(form):
  fn, _ = FORMS[form]
  assert_factored(fn, _lora(), X, IDS)


# -- a hand-written top-k MoE layer --------------------------------------------


def _route(p, x, k):
  probs = jax.nn.softmax(x @ p["router"], axis=-1)
  weights, experts = lax.top_k(probs, k)
  return weights / weights.sum(-1, keepdims=True), experts


def moe_gather(p, x, k=K):
  """Top-k MoE with SwiGLU experts; each token gathers its k experts."""
  weights, experts = _route(p, x, k)
  gate = jnp.einsum("td,tkdf->tkf", x, p["gate"][experts])
  up = jnp.einsum("td,tkdf->tkf", x, p["up"][experts])
  h = jax.nn.silu(gate) * up
  y = jnp.einsum("tkf,tkfd->tkd", h, p["down"][experts])
  return jnp.einsum("tkd,tk->td", y, weights)


def moe_ragged(p, x, k=K):
  """The same layer with tokens sorted by expert and grouped GEMMs."""
  weights, experts = _route(p, x, k)
  flat = experts.reshape(-1)
  order = jnp.argsort(flat)
  sizes = jnp.bincount(flat, length=p["gate"].shape[0])
  xs = x[order // k]
  h = jax.nn.silu(lax.ragged_dot(xs, p["gate"], sizes)) * lax.ragged_dot(
      xs, p["up"], sizes)
  y = lax.ragged_dot(h, p["down"], sizes)
  y = jnp.zeros_like(y).at[order].set(y).reshape(*experts.shape, -1)
  return jnp.einsum("tkd,tk->td", y, weights)


def np_moe(p, x, k=K, experts=None):
  """float64 NumPy top-k MoE; `p` holds fused float64 kernels."""
  x = np.asarray(x, np.float64)
  logits = x @ p["router"]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  top = np.argsort(-probs, axis=-1)[:, :k]
  out = np.zeros_like(x)
  for t in range(x.shape[0]):
    w = probs[t, top[t]] / probs[t, top[t]].sum()
    for j, e in enumerate(top[t]):
      g, u = x[t] @ p["gate"][e], x[t] @ p["up"][e]
      out[t] += w[j] * ((g / (1 + np.exp(-g)) * u) @ p["down"][e])
  return out


def moe_params(e=E, d=D, f=F, seed=5, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  shapes = {"router": (d, e), "gate": (e, d, f), "up": (e, d, f),
            "down": (e, f, d)}
  return {name: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[-2]),
                            dtype) for name, shape in shapes.items()}


def moe_lora(params=None, seed=0, rank=R):
  params = moe_params() if params is None else params

  @jax.jit  # one program instead of one per eager op
  def make(params):
    lp = jlora.apply(params, rank=rank, alpha=2.0, targets="gate|up|down",
                     key=jax.random.key(seed))
    return randomize_b(lp, jax.random.key(seed + 1), std=0.3)

  return make(params)


def np_fused_tree(lp):
  return {k: np_fused(v) if is_lora(v) else np.asarray(v, np.float64)
          for k, v in lp.items()}


MOE = {"gather": moe_gather, "ragged": moe_ragged}


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("moe", sorted(MOE))
def test_topk_moe_layer_matches_float64(moe, jit):
  lp = moe_lora()
  forward = jlora.wrap(MOE[moe])
  forward = jax.jit(forward) if jit else forward
  got = forward(lp, X)
  assert rel_err(got, np_moe(np_fused_tree(lp), X)) < 2e-6
  # Both dispatches agree, and the adapters change the output.
  assert rel_err(got, np_moe(np_fused_tree(jlora.merge(
      jlora.apply(moe_params(), rank=R, targets="gate|up|down", key=KEY))),
      X)) > 1e-2


@pytest.mark.parametrize("moe", sorted(MOE))
def test_topk_moe_layer_gradients_and_structure(moe):
  lp = moe_lora()
  g, g_ref, wrapped, _, trainable = _grads(MOE[moe], lp, X)
  for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  # A directional finite difference agrees with the gradient.
  direction = jax.tree.map(lambda x: jax.random.normal(KEY, x.shape),
                           trainable)
  eps = 1e-3
  shift = lambda s: jax.tree.map(lambda t, d: t + s * eps * d, trainable,
                                 direction)
  fd = (wrapped(shift(1.0)) - wrapped(shift(-1.0))) / (2 * eps)
  analytic = sum(jnp.vdot(a, d) for a, d in zip(jax.tree.leaves(g),
                                                jax.tree.leaves(direction)))
  assert abs(float(fd) - float(analytic)) < 1e-2 * max(1.0, abs(float(fd)))
  assert_factored(MOE[moe], lp, X)


def test_frozen_experts_get_no_gradient():
  lp = moe_lora()
  for moe in MOE.values():
    g = jax.grad(lambda p: jnp.sum(jlora.wrap(moe)(p, X)))(lp)
    for name in ("gate", "up", "down"):
      assert float(jnp.abs(g[name].w).max()) == 0.0
      assert float(jnp.abs(g[name].a).max()) > 0.0


@settings(max_examples=10, deadline=None)
@given(e=st.integers(1, 5), d=st.integers(2, 6), f=st.integers(2, 6),
       r=st.integers(1, 3), k=st.integers(1, 3), tokens=st.integers(1, 6),
       seed=st.integers(0, 2**16),
       dtype=st.sampled_from(["float32", "bfloat16"]),
       moe=st.sampled_from(sorted(MOE)))
def test_topk_moe_property(e, d, f, r, k, tokens, seed, dtype, moe):
  k, r = min(k, e), min(r, d, f)
  params = moe_params(e, d, f, seed, jnp.dtype(dtype))
  rng = np.random.default_rng(seed + 1)
  # Nodes built directly (jlora.apply would compile its init per shape).
  lp = {name: jlora.LoRA(
      w=w, a=jnp.asarray(rng.normal(size=(e, w.shape[1], r)), dtype),
      b=jnp.asarray(rng.normal(size=(e, r, w.shape[2])) * 0.3, dtype),
      alpha=2.0, layout="bio", path=name) if name != "router" else w
        for name, w in params.items()}
  x = jnp.asarray(rng.normal(size=(tokens, d)), dtype)
  layer = functools_partial(MOE[moe], k=k)
  got = jax.jit(jlora.wrap(layer))(lp, x)
  assert got.dtype == jnp.dtype(dtype)
  got = np.asarray(got, np.float64)
  if dtype == "float32":
    want = np_moe(np_fused_tree(lp), np.asarray(x, np.float64), k)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=1e-5)
  else:
    # bfloat16 routing can differ from float64 routing near ties: compare
    # with the merged path, which routes with the same rounding.
    merged = {k: jnp.asarray(v, dtype) for k, v in np_fused_tree(lp).items()}
    want = np.asarray(jax.jit(layer)(merged, x), np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, atol=5e-2 * scale, rtol=5e-2)


def functools_partial(fn, **kw):
  return lambda p, x: fn(p, x, **kw)


# -- composition: scan over layers, remat, jit, vmap ---------------------------

L = 2


def stacked_moe(moe, remat=False):
  """`moe` layers under a scan over (L, ...) stacked params ("bbio")."""
  def layer(h, p):
    return h + moe(p, h), None
  body = jax.checkpoint(layer) if remat else layer
  return lambda p, x: lax.scan(body, x, p)[0]


def np_stacked(p, x):
  for l in range(L):
    x = x + np_moe({k: v[l] for k, v in p.items()}, x)
  return x


@pytest.fixture(scope="module")
def layers():
  keys = [moe_params(seed=s) for s in range(L)]
  params = jax.tree.map(lambda *x: jnp.stack(x), *keys)
  return moe_lora(params)  # (L, E, in, out) kernels, layout "bbio"


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize("moe", sorted(MOE))
def test_scan_over_layers_of_experts(layers, moe, remat):
  assert layers["gate"].layout == "bbio"
  fn = stacked_moe(MOE[moe], remat)
  got = jax.jit(jlora.wrap(fn))(layers, X)
  assert rel_err(got, np_stacked(np_fused_tree(layers), X)) < 2e-6
  g, g_ref, *_ = _grads(fn, layers, X)
  for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  assert_factored(fn, layers, X)


def test_quantized_layers_of_experts_under_scan():
  keys = [moe_params(seed=s) for s in range(L)]
  params = jax.tree.map(lambda *x: jnp.stack(x), *keys)
  q = jlora.quantize(params, "nf4", targets="gate|up|down", block_size=6,
                     compute_dtype=jnp.float32)
  assert q["gate"].stacked == 2  # layers and experts
  qlp = randomize_b(jlora.apply(q, rank=R, targets="gate|up|down", key=KEY),
                    KEY, std=0.3)
  for moe in (moe_gather, moe_ragged):
    fn = stacked_moe(moe)
    got = jax.jit(jlora.wrap(fn))(qlp, X)
    assert rel_err(got, fn(jlora.merge(qlp), X)) < 2e-6


def test_vmap_over_wrapped_moe():
  # (JAX 0.10 cannot vmap a ragged_dot over its rows, wrapped or not.)
  lp = moe_lora()
  xs = np.stack([X, 2 * X])
  got = jax.vmap(jlora.wrap(moe_gather), in_axes=(None, 0))(lp, xs)
  for i in range(2):
    assert rel_err(got[i], np_moe(np_fused_tree(lp), xs[i])) < 2e-6


# -- variants: a quantized base, DoRA, dropout --------------------------------


def _float_shapes(jaxpr) -> list[tuple[int, ...]]:
  shapes = []
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      # Dense floats only: an FP8 base's stored e4m3 values are not dense.
      if (jnp.issubdtype(v.aval.dtype, jnp.floating)
          and jnp.finfo(v.aval.dtype).bits >= 16):
        shapes.append(tuple(v.aval.shape))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      shapes += _float_shapes(sub)
  return shapes


@pytest.mark.parametrize("method", ["int8", "fp8"])
@pytest.mark.parametrize("form", ["static_index", "traced_index", "gather",
                                  "take", "dynamic_slice", "ragged_dot"])
def test_quantized_base_is_selected_on_its_codes(form, method):
  fn, _ = FORMS[form]
  opts = dict(block_size=8) if method == "int8" else {}
  q = jlora.quantize({"w": jnp.asarray(W)}, method, targets="w",
                     compute_dtype=jnp.float32, **opts)
  if method == "fp8":  # dequantized products on any backend: merge's math
    q = jlora.quant.set_fp8_product(q, "upcast")
  assert q["w"].stacked == 1
  qlp = jlora.apply(q, rank=R, alpha=2.0, targets="w", key=KEY)
  qlp = randomize_b(qlp, jax.random.key(9))
  got = jlora.wrap(fn)(qlp, X, IDS)
  fused = jlora.merge(qlp)  # the dequantized base plus the update
  assert rel_err(got, fn(fused, X, IDS)) < 2e-6
  g, g_ref, *_ = _grads(fn, qlp, X, IDS)
  for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
  # Only the selected experts are dequantized: no float array of the whole
  # stack's shape, except where a grouped GEMM reads every expert.
  jaxpr = jax.make_jaxpr(jlora.wrap(fn))(qlp, X, IDS).jaxpr
  whole = (E, D, F) in _float_shapes(jaxpr)
  assert whole == (form == "ragged_dot")


@pytest.mark.parametrize("form", ["static_index", "gather", "dynamic_slice",
                                  "ragged_dot", "batched_einsum"])
def test_dora_gain_is_selected_with_the_expert(form):
  fn, ref = FORMS[form]
  lp = _lora()
  m = jax.random.uniform(KEY, (E, F), minval=0.5, maxval=2.0)
  lp = {"w": dataclasses.replace(lp["w"], m=m)}
  got = jlora.wrap(fn)(lp, X, IDS)
  assert rel_err(got, ref(np_fused(lp["w"]), X.astype(np.float64), IDS)) < 2e-6
  g, g_ref, *_ = _grads(fn, lp, X, IDS)
  for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
  # The column norms are taken factored too.
  assert_factored(fn, lp, X, IDS)


def test_dropout_key_follows_the_selected_expert():
  w = np.asarray(jax.random.normal(KEY, (E, D, D)), np.float32)
  node = jlora.apply({"w": jnp.asarray(w)}, rank=D, targets="w", key=KEY)["w"]
  # Identity factors make each expert's adapter path return its dropped input.
  eye = jnp.broadcast_to(jnp.eye(D), (E, D, D))
  lp = {"w": dataclasses.replace(node, a=eye, b=eye, alpha=float(D),
                                 dropout=0.5)}
  rng = jax.random.key(4)

  def run(fn):
    out = jlora.wrap(fn)(lp, X, IDS, lora_rng=rng)
    return np.asarray(out, np.float64)

  static = run(lambda p, x, ids: x @ p["w"][1])
  ratio = (static - X.astype(np.float64) @ w[1]) / X
  dropped = np.isclose(ratio, 0, atol=1e-3)
  assert np.all(dropped | np.isclose(ratio, 2, atol=1e-3))
  assert 0.2 < dropped.mean() < 0.8
  # Expert 1's key whether it is indexed or sliced.
  traced = run(lambda p, x, ids: x @ p["w"][ids[6] - 1])  # ids[6] == 2
  np.testing.assert_allclose(traced, static, rtol=1e-6, atol=1e-6)
  # Gathered for every token: row t draws from fold_in(keys[1], t), so rows
  # that share an expert still get independent masks.
  gathered = run(lambda p, x, ids: jnp.einsum(
      "ti,tio->to", x, p["w"][jnp.ones_like(ids)]))
  g_ratio = (gathered - X.astype(np.float64) @ w[1]) / X
  g_kept = np.isclose(g_ratio, 2, atol=1e-3)
  assert np.all(g_kept | np.isclose(g_ratio, 0, atol=1e-3))
  keys = jax.random.split(jax.random.fold_in(rng, 0), E)
  want = np.stack([np.asarray(jax.random.bernoulli(
      jax.random.fold_in(keys[1], t), 0.5, (D,))) for t in range(len(X))])
  np.testing.assert_array_equal(g_kept, want)
  assert len({r.tobytes() for r in g_kept}) > 1
  other = run(lambda p, x, ids: x @ p["w"][2]) - X.astype(np.float64) @ w[2]
  assert not np.allclose(other, static - X.astype(np.float64) @ w[1])


# -- mixed-adapter batches on MoE layers ---------------------------------------


@pytest.fixture(scope="module")
def adapters():
  s = jlora.AdapterSet(moe_params(), {}, None)
  for k, (rank, targets) in enumerate([(2, "gate|up|down"), (3, "up|down"),
                                       (1, "gate")]):
    lp = moe_lora(seed=10 * k + 20, rank=rank)
    lp = {n: (v if (is_lora(v) and n in targets.split("|")) else
              (v.w if is_lora(v) else v)) for n, v in lp.items()}
    s = jlora.add_adapter(s, f"a{k}", lp)
  return s


def _np_mixed(s, ids, x, moe_tokens=S):
  out = []
  for b, i in enumerate(ids):
    tree = jlora.select(s, s.names[i] if i >= 0 else None)
    rows = np.asarray(x[b * moe_tokens:(b + 1) * moe_tokens], np.float64)
    out.append(np_moe(np_fused_tree(tree), rows))
  return np.concatenate(out)


def moe_ragged_remat(p, x, k=K):
  """Sorted dispatch outside, the expert MLP in a checkpoint fed sorted rows."""
  weights, experts = _route(p, x, k)
  flat = experts.reshape(-1)
  order = jnp.argsort(flat)
  sizes = jnp.bincount(flat, length=p["gate"].shape[0])

  @jax.checkpoint
  def mlp(xs, sizes, gate, up, down):
    h = jax.nn.silu(lax.ragged_dot(xs, gate, sizes)) * lax.ragged_dot(
        xs, up, sizes)
    return lax.ragged_dot(h, down, sizes)

  y = mlp(x[order // k], sizes, p["gate"], p["up"], p["down"])
  y = jnp.zeros_like(y).at[order].set(y).reshape(*experts.shape, -1)
  return jnp.einsum("tkd,tk->td", y, weights)


MIXED = dict(MOE, ragged_remat=moe_ragged_remat)


@pytest.mark.parametrize("moe", sorted(MIXED))
def test_mixed_adapter_batch_on_moe_layer(adapters, moe):
  stacked = jlora.stack_adapters(adapters)
  ids = np.array([2, -1], np.int32), np.array([1, 0], np.int32)
  for batch_ids in ids:
    got = jax.jit(jlora.wrap(MIXED[moe]))(stacked, X, adapter_ids=batch_ids)
    want = _np_mixed(adapters, batch_ids, X)
    assert rel_err(got, want) < 2e-6


@pytest.mark.parametrize("moe", sorted(MOE))
def test_mixed_batch_gradients_reach_each_adapter_from_its_examples(
    adapters, moe):
  ids = np.array([1, 0], np.int32)
  forward = jlora.wrap(MOE[moe])
  trainable, frozen = jlora.partition(jlora.stack_adapters(adapters))
  loss = lambda fwd, t, f, x, **kw: jnp.sum(jnp.sin(fwd(
      jlora.combine(t, f), x, **kw)))
  grads = jax.jit(jax.grad(lambda t: loss(forward, t, frozen, X,
                                          adapter_ids=ids)))(trainable)
  for i in (0, 1):
    single_t, single_f = jlora.partition(jlora.select(adapters,
                                                      adapters.names[i]))
    rows = np.repeat(ids == i, S)
    want = jax.grad(lambda t: loss(forward, t, single_f, X[rows]))(single_t)
    for name in ("gate", "up", "down"):
      g, w = grads[name], want[name]
      if w is None:
        continue
      r = g.ranks[i]
      np.testing.assert_allclose(g.a[i, ..., :r], w.a, rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(g.b[i, ..., :r, :], w.b, rtol=1e-4,
                                 atol=1e-6)
  # "a2" runs on no example: its factors get exactly zero gradient.
  np.testing.assert_array_equal(np.asarray(grads["gate"].b[2]), 0)


# -- errors ------------------------------------------------------------------


def test_misread_expert_layout_names_the_path_and_layout():
  # Experts stored on axis 1, (in, E, out), but adapted as "bio".
  w = jnp.asarray(W.transpose(1, 0, 2))
  lp = jlora.apply({"w": w}, rank=R, targets="w", key=KEY)
  fix = r"'w'.*layout 'bio'.*axis 1.*input axis.*layout=\{'w': 'ibo'\}"
  uses = {
      "static": lambda p, x, ids: x @ p["w"][:, 1],
      "traced": lambda p, x, ids: x @ lax.dynamic_index_in_dim(
          p["w"], ids[0], axis=1, keepdims=False),
      "gather": lambda p, x, ids: jnp.einsum("ti,ito->to", x,
                                             p["w"][:, ids]),
      "ragged": lambda p, x, ids: lax.ragged_dot_general(
          x, p["w"], jnp.bincount(ids, length=E),
          lax.RaggedDotDimensionNumbers((([1], [0]), ([], [])), [0], [1])),
  }
  for name, fn in uses.items():
    with pytest.raises(jlora.LayoutError, match=fix if name != "ragged" else
                       r"'w'.*layout=\{'w': 'ibo'\}"):
      jlora.wrap(fn)(lp, X, IDS)
  # The suggested layout reads it.
  good = jlora.apply({"w": w}, rank=R, targets="w", key=KEY,
                     layout={"w": "ibo"})
  good = randomize_b(good, KEY)
  for fn in uses.values():
    np.testing.assert_allclose(jlora.wrap(fn)(good, X, IDS),
                               fn(jlora.merge(good), X, IDS), rtol=1e-5,
                               atol=1e-5)


# -- expert parallelism ------------------------------------------------------


def _expert_parallel_check():
  """Expert-sharded kernels and adapters: wrapped == merged, one device."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("expert", "data"))
  lp = moe_lora()
  want = {name: moe(jlora.merge(lp), X) for name, moe in MOE.items()}
  want_g = {name: _grads(moe, lp, X)[1] for name, moe in MOE.items()}
  experts = NamedSharding(mesh, P("expert"))
  sharded = {k: jax.device_put(v, NamedSharding(mesh, P())) if k == "router"
             else jax.device_put(v, experts) for k, v in lp.items()}
  assert sharded["gate"].a.sharding.spec[0] == "expert"
  x = jax.device_put(X, NamedSharding(mesh, P("data")))
  for name, moe in MOE.items():
    got = jax.jit(jlora.wrap(moe))(sharded, x)
    np.testing.assert_allclose(got, want[name], rtol=1e-5, atol=1e-5)
    trainable, frozen = jlora.partition(sharded)
    g = jax.jit(jax.grad(lambda t: jnp.sum(jnp.sin(jlora.wrap(moe)(
        jlora.combine(t, frozen), x)))))(trainable)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want_g[name])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_expert_sharded_mesh_matches_merged_path():
  if jax.device_count() >= 8:
    _expert_parallel_check()
    return
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  here = os.path.dirname(__file__)
  code = ("import sys; sys.path.insert(0, %r); import test_experts;"
          " test_experts._expert_parallel_check()" % here)
  subprocess.run([sys.executable, "-c", code], env=env, check=True)


def test_mixed_batch_ragged_rows_of_unknown_examples_raise(adapters):
  # Rows sorted by lax.sort (not gathered from the tokens): their examples
  # cannot be told, so a mixed batch refuses rather than guess.
  def moe_sorted_by_sort(p, x):
    weights, experts = _route(p, x, 1)
    keys = jnp.broadcast_to(experts[:, :1], x.shape)
    keys, xs = lax.sort((keys, x), dimension=0, num_keys=1)
    sizes = jnp.bincount(keys[:, 0], length=E)
    return lax.ragged_dot(xs, p["up"], sizes)

  stacked = jlora.stack_adapters(adapters)
  with pytest.raises(ValueError, match="'up'.*not gathered.*x_flat"):
    jlora.wrap(moe_sorted_by_sort)(stacked, X, adapter_ids=np.array([0, 1]))
