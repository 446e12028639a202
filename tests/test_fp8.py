"""FP8 (e4m3) frozen bases: storage, the FP8 product and its gradient.

The numerics are pinned against a float64 NumPy reference of the same
scheme (power-of-two scales, per output channel / per row, or per tensor);
on CPU the GPU path's math runs through its exact float32 emulation
(``product="fp8"``).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jlora
from jlora import _fp8, quant
from helpers import randomize_b, train_adapters

KEY = jax.random.key(0)
F32 = jnp.float32


# -- float64 NumPy reference of the scheme -----------------------------------

def np_scale(amax):
  """2**ceil(log2(amax / 448)) in float64; 1 where amax == 0."""
  amax = np.asarray(amax, np.float64)
  safe = np.where(amax > 0, amax, 448.0)
  return np.where(amax > 0, np.ldexp(1.0, np.ceil(np.log2(safe / 448.0))
                                     .astype(int)), 1.0)


def np_quantize(x, axes):
  """(e4m3 values as float64, float64 scales), one scale per index of the
  axes not in `axes`."""
  x = np.asarray(x, np.float64)
  s = np_scale(np.abs(x).max(axis=axes, keepdims=True))
  q = np.clip(x / s, -448, 448).astype(ml_dtypes.float8_e4m3fn)
  return q.astype(np.float64), s


def np_product(x, q, s, rowwise=True):
  """(..., in) x FP8 kernel (in, out) with scales s (1, out) or (1, 1)."""
  qx, sx = np_quantize(x, (-1,) if rowwise else tuple(range(x.ndim)))
  return (qx @ q) * sx * s.reshape(-1)


def np_input_grad(dy, q, s, rowwise=True):
  """dx of ``y = x @ w`` for the FP8 kernel: (dy * s) quantized per row."""
  g = np.asarray(dy, np.float64) * s.reshape(-1)
  qg, sg = np_quantize(g, (-1,) if rowwise else tuple(range(g.ndim)))
  return (qg @ q.T) * sg


def gaussian(shape, key=KEY, std=0.02, dtype=F32):
  return (std * jax.random.normal(key, shape)).astype(dtype)


def fp8(w, layout=None, **kw):
  layout = layout or jlora.node.default_layout(w.ndim)
  return _fp8.quantize_array(w, layout, **kw)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


# -- storage ------------------------------------------------------------------

LAYOUTS = ["io", "oi", "bio", "ioo", "iio", "bbio"]


@settings(deadline=None, max_examples=25)
@given(layout=st.sampled_from(LAYOUTS), scaling=st.sampled_from(
    ["channel", "tensor"]), seed=st.integers(0, 2**16),
       log_std=st.floats(-12, 6), dtype=st.sampled_from(["float32",
                                                          "bfloat16"]))
def test_kernel_quantization_matches_reference(layout, scaling, seed, log_std,
                                               dtype):
  rng = np.random.default_rng(seed)
  shape = tuple(int(rng.integers(1, 6)) for _ in layout)
  w = rng.normal(0, math.exp(log_std), shape)
  if w.size > 2:
    w.flat[rng.integers(0, w.size)] *= 1000.0  # an outlier
  w = jnp.asarray(w, dtype)
  q = fp8(w, layout, scaling=scaling, dtype=F32)
  shared = "i" if scaling == "channel" else "io"
  axes = tuple(k for k, r in enumerate(layout) if r in shared)
  ref_q, ref_s = np_quantize(np.asarray(w, np.float64), axes)
  assert q.values.dtype == jnp.float8_e4m3fn and q.scale.dtype == F32
  assert q.scale.shape == ref_s.shape
  np.testing.assert_array_equal(np.asarray(q.scale, np.float64), ref_s)
  np.testing.assert_array_equal(np.asarray(q.values, np.float64), ref_q)
  # Dequantization is exact: values times a power of two.
  np.testing.assert_array_equal(np.asarray(q.dequantize(F32), np.float64),
                                ref_q * ref_s)


def test_scales_bring_the_maximum_into_the_top_binade():
  w = jnp.array([[448.0, 0.0, 1e-3, -3.0, 449.0, 1e-30]], F32)
  s = np.asarray(_fp8.pow2_scale(jnp.abs(w)))
  np.testing.assert_array_equal(
      s, [[1.0, 1.0, 2.0 ** -18, 2.0 ** -7, 2.0, 2.0 ** -108]])
  assert ((np.abs(w[0, [0, 2, 3, 4, 5]]) / s[0, [0, 2, 3, 4, 5]] > 224) &
          (np.abs(w[0, [0, 2, 3, 4, 5]]) / s[0, [0, 2, 3, 4, 5]] <= 448)).all()
  # Non-finite maxima pass through, so NaN propagates instead of clipping.
  assert np.isnan(_fp8.pow2_scale(jnp.nan)) and np.isinf(
      _fp8.pow2_scale(jnp.inf))


def test_array_metadata_and_layout_ops():
  w = gaussian((3, 16, 8))
  q = fp8(w, dtype=jnp.bfloat16)
  assert (q.shape, q.ndim, q.size, q.dtype) == ((3, 16, 8), 3, 384,
                                                jnp.bfloat16)
  assert q.scale.shape == (3, 1, 8) and q.stacked == 1 and q.method == "fp8"
  assert q.nbytes == 384 + 3 * 8 * 4
  assert quant.is_quantized(q) and quant.is_fp8(q)
  dense = np.asarray(q.dequantize(F32))
  np.testing.assert_array_equal(jnp.asarray(q), q.dequantize())  # jax array
  # Casts, transposes and reshapes that keep per-channel scales stay FP8.
  assert q.astype(F32).dtype == F32 and quant.is_fp8(q.astype(F32))
  t = q.transpose(0, 2, 1)
  assert quant.is_fp8(t) and t.scale.shape == (3, 8, 1)
  np.testing.assert_array_equal(t.dequantize(F32), dense.transpose(0, 2, 1))
  r = q.reshape(3, 4, 4, 2, 4)  # in -> (4, 4), out -> (2, 4)
  assert quant.is_fp8(r) and r.scale.shape == (3, 1, 1, 2, 4)
  np.testing.assert_array_equal(r.dequantize(F32), dense.reshape(3, 4, 4, 2,
                                                                 4))
  # Merging an input axis with an output axis needs a scale per element.
  merged = q.reshape(3, 128)
  assert not quant.is_fp8(merged)
  np.testing.assert_array_equal(np.asarray(merged, np.float32),
                                np.asarray(q.dequantize(), np.float32)
                                .reshape(3, 128))
  assert "Fp8Array(e4m3, shape=(3, 16, 8)" in repr(q)


def test_reshape_merging_stacked_and_input_axes_falls_back():
  q = fp8(gaussian((3, 16, 8)))
  # (3, 16) mixes a per-index axis (stacked) with a shared one (input).
  out = q.reshape(48, 8)
  assert not quant.is_fp8(out)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(
      q.dequantize(), np.float32).reshape(48, 8))


def test_quantize_tree_and_count():
  params = {"q": {"kernel": gaussian((64, 32)), "bias": jnp.zeros(32)},
            "norm": {"scale": jnp.ones(64)}}
  qp = jlora.quantize(params, "fp8")
  assert quant.is_fp8(qp["q"]["kernel"])
  assert qp["q"]["kernel"].scaling == "channel"
  assert not quant.is_quantized(qp["norm"]["scale"])
  assert jlora.count(qp).total == 64 * 32 + 32 + 64
  t = quant.quantize_fp8(params, scaling="tensor", product="fp8",
                         compute_dtype=F32)["q"]["kernel"]
  assert t.scale.shape == (1, 1) and (t.product, t.dtype) == ("fp8", F32)
  # quantize_leaf / quantizer (what loaders call) agree with quantize.
  leaf = quant.quantizer("fp8")("q/kernel", params["q"]["kernel"])
  np.testing.assert_array_equal(leaf.values, qp["q"]["kernel"].values)
  assert quant.quantizer("fp8")("norm/scale", params["norm"]["scale"]) is (
      params["norm"]["scale"])
  emulated = quant.set_fp8_product(jlora.apply(qp, rank=2, key=KEY), "fp8")
  assert emulated["q"]["kernel"].w.product == "fp8"


def test_errors_name_the_problem():
  w = gaussian((8, 16))
  bad = w.at[3, 5].set(jnp.nan)
  with pytest.raises(ValueError, match="kernel 'layer/kernel' has NaN or inf"
                     ".*exclude"):
    jlora.quantize({"layer": {"kernel": bad}}, "fp8")
  with pytest.raises(ValueError, match="'w/kernel' has NaN or inf"):
    quant.quantizer("fp8")("w/kernel", w.at[0, 0].set(jnp.inf))
  with pytest.raises(ValueError, match="unknown FP8 scaling 'row'"):
    quant.quantize_fp8({"kernel": w}, scaling="row")
  with pytest.raises(ValueError, match="unknown FP8 product 'gpu'"):
    quant.quantize_fp8({"kernel": w}, product="gpu")
  with pytest.raises(ValueError, match="block_size=32 .* apply to nf4"):
    jlora.quantize({"kernel": w}, "fp8", block_size=32)
  with pytest.raises(ValueError, match="layout 'bio' for 'kernel' has 3"):
    jlora.quantize({"kernel": w}, "fp8", layout={"kernel": "bio"})
  lp = jlora.apply({"kernel": w}, rank=2, key=KEY)
  with pytest.raises(ValueError, match="quantize the base before"):
    jlora.quantize(lp, "fp8")
  # Traced kernels cannot be checked, and are not.
  jax.jit(lambda w: quant.quantize_fp8({"kernel": w}))(bad)


# -- the product --------------------------------------------------------------

def _bare(fn, w, x, product="fp8"):
  """fn(w, x) under jlora.wrap (jitted) with w an adapter-less FP8 kernel."""
  return jax.jit(jlora.wrap(fn))(dataclasses.replace(w, product=product), x)


@pytest.mark.parametrize("scaling", ["channel", "tensor"])
@pytest.mark.parametrize("jit", [False, True])
def test_product_and_input_gradient_match_reference(scaling, jit):
  w = gaussian((64, 48), jax.random.key(1))
  x = gaussian((2, 5, 64), jax.random.key(2), std=1.0)
  x = x.at[0, 0, 7].set(40.0)  # an outlier feature in one row
  dy = gaussian((2, 5, 48), jax.random.key(3), std=1.0)
  q = fp8(w, scaling=scaling, dtype=F32, product="fp8")
  rowwise = scaling == "channel"
  qw, sw = np.asarray(q.values, np.float64), np.asarray(q.scale, np.float64)

  fn = jlora.wrap(lambda w, x: x @ w)
  fn = jax.jit(fn) if jit else fn
  y, vjp = jax.vjp(lambda x: fn(q, x), x)
  ref = np_product(np.asarray(x), qw, sw, rowwise)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-6,
                             atol=2e-6 * np.abs(ref).max())
  (dx,) = vjp(dy)
  ref_dx = np_input_grad(np.asarray(dy), qw, sw, rowwise)
  np.testing.assert_allclose(np.asarray(dx), ref_dx, rtol=2e-6,
                             atol=2e-6 * np.abs(ref_dx).max())
  # The FP8 numerics differ from the dense product by FP8 rounding only.
  assert 1e-3 < rel(y, np.asarray(x) @ np.asarray(w, np.float64)) < 0.05


def test_product_in_bf16_rounds_the_reference():
  w = gaussian((64, 32), jax.random.key(1), dtype=jnp.bfloat16)
  x = gaussian((6, 64), jax.random.key(2), std=1.0, dtype=jnp.bfloat16)
  q = fp8(w, product="fp8")
  y = _bare(lambda w, x: x @ w, q, x)
  assert y.dtype == jnp.bfloat16
  ref = np_product(np.asarray(x, np.float64), np.asarray(q.values, np.float64),
                   np.asarray(q.scale, np.float64))
  # The GEMM writes bf16 and the rescale rounds again: 2 bf16 roundings.
  np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2 ** -7,
                             atol=1e-6)


def test_multi_axis_kernels_and_kernel_on_the_left():
  x = gaussian((2, 3, 16), jax.random.key(2), std=1.0)
  # (in, heads, head_dim): 'ioo', an einsum contracting one axis.
  w3 = fp8(gaussian((16, 4, 8)), "ioo", dtype=F32, product="fp8")
  y = _bare(lambda w, x: jnp.einsum("btf,fhd->bthd", x, w), w3, x)
  ref = np_product(np.asarray(x), np.asarray(w3.values, np.float64).reshape(
      16, 32), np.asarray(w3.scale, np.float64).reshape(1, 32))
  np.testing.assert_allclose(np.asarray(y).reshape(2, 3, 32), ref, rtol=2e-6,
                             atol=1e-6)
  # (heads, head_dim, out): 'iio', contracting two axes at once.
  h = gaussian((2, 3, 4, 8), jax.random.key(3), std=1.0)
  wo = fp8(gaussian((4, 8, 16)), "iio", dtype=F32, product="fp8")
  y = _bare(lambda w, h: jnp.einsum("bthd,hdo->bto", h, w), wo, h)
  ref = np_product(np.asarray(h).reshape(2, 3, 32), np.asarray(
      wo.values, np.float64).reshape(32, 16), np.asarray(wo.scale, np.float64)
                   .reshape(1, 16))
  np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-6, atol=1e-6)
  # The kernel as the left operand: out = w^T-contracted, axes (out, rows).
  w = fp8(gaussian((16, 8)), dtype=F32, product="fp8")
  fn = lambda w, x: lax.dot_general(w, x, (((0,), (1,)), ((), ())))
  x2 = x.reshape(6, 16)
  y, vjp = jax.vjp(lambda x: _bare(fn, w, x), x2)
  qw, sw = np.asarray(w.values, np.float64), np.asarray(w.scale, np.float64)
  np.testing.assert_allclose(np.asarray(y), np_product(np.asarray(x2), qw,
                                                       sw).T, rtol=2e-6,
                             atol=1e-6)
  dy = gaussian((8, 6), jax.random.key(4), std=1.0)
  np.testing.assert_allclose(np.asarray(vjp(dy)[0]), np_input_grad(
      np.asarray(dy).T, qw, sw), rtol=2e-6, atol=1e-6)


def test_contracting_the_output_axis_falls_back_to_dequantizing():
  # A tied embedding used as a head contracts the kernel's output axis,
  # along which the per-channel scale varies: exact dense product instead.
  w = fp8(gaussian((16, 8)), dtype=F32, product="fp8")
  x = gaussian((3, 8), std=1.0)
  y = _bare(lambda w, x: x @ w.T, w, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(x, np.float64) @ np.asarray(
      w.dequantize(), np.float64).T, rtol=1e-5, atol=1e-6)


def test_auto_upcasts_on_cpu_and_fp8_emulates():
  assert _fp8.product_path("auto") == "upcast"
  assert _fp8.product_path("fp8") == "emulate"
  assert _fp8.product_path("upcast") == "upcast"
  w = fp8(gaussian((32, 16)), dtype=F32)
  x = gaussian((4, 32), std=1.0)
  fn = lambda w, x: x @ w
  dense = np.asarray(x, np.float64) @ np.asarray(w.dequantize(), np.float64)
  np.testing.assert_allclose(_bare(fn, w, x, "auto"), dense, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(_bare(fn, w, x, "auto"),
                                _bare(fn, w, x, "upcast"))
  assert rel(_bare(fn, w, x, "fp8"), dense) > 1e-3  # activations quantized


def _fp8_dot_kinds(jaxpr, out=None):
  """For each dot_general: "f8" (two e4m3 operands), "scaled f8" (each
  operand convert(e4m3) times a scalar) or "other"."""
  out = [] if out is None else out
  producer = {v: e for e in jaxpr.eqns for v in e.outvars}
  is_f8 = lambda v: getattr(v.aval, "dtype", None) == jnp.float8_e4m3fn

  def scaled(v):
    mul = producer.get(v)
    if mul is None or mul.primitive.name != "mul":
      return False
    ops = [producer.get(u) for u in mul.invars]
    return (any(e is not None and e.primitive.name == "convert_element_type"
                and is_f8(e.invars[0]) for e in ops) and
            any(u.aval.shape == () for u in mul.invars))

  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      if all(is_f8(v) for v in eqn.invars):
        out.append("f8")
      elif all(scaled(v) for v in eqn.invars):
        out.append("scaled f8")
      else:
        out.append("other")
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      _fp8_dot_kinds(sub, out)
  return out


@pytest.mark.parametrize("scaling", ["channel", "tensor"])
def test_gpu_path_builds_fp8_dots_that_equal_the_emulation(monkeypatch,
                                                           scaling):
  """The GPU code path, run on CPU (XLA upcasts e4m3 operands there)."""
  w = fp8(gaussian((64, 32)), scaling=scaling, dtype=F32, product="fp8")
  x = gaussian((8, 64), std=1.0)
  loss = lambda x: jnp.sum(_bare(lambda w, x: jnp.tanh(x @ w), w, x) ** 2)
  emulated = jax.value_and_grad(loss)(x)
  monkeypatch.setattr(_fp8, "product_path", lambda product: "gpu")
  gpu = jax.value_and_grad(loss)(x)
  for a, b in zip(gpu, emulated):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  jaxpr = jax.make_jaxpr(jax.grad(loss))(x).jaxpr
  # Forward and input gradient each: a dot of two e4m3 operands (channel),
  # or dot(convert(q) * scalar, convert(w) * scalar) (tensor), the forms
  # XLA's GPU gemm rewriter turns into cuBLASLt FP8 GEMMs.
  kinds = _fp8_dot_kinds(jaxpr)
  assert kinds == ["f8"] * 2 if scaling == "channel" else ["scaled f8"] * 2


# -- inside models: adapters, scans, the merged path ----------------------------

class MLP(nn.Module):
  dtype: object = F32

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(128, dtype=self.dtype, name="up")(x))
    return nn.Dense(64, dtype=self.dtype, name="down")(h)


def _mlp(dtype=F32, product="fp8", **kw):
  x = jax.random.normal(KEY, (8, 64))
  params = MLP(dtype).init(KEY, x)["params"]
  qp = quant.quantize_fp8(params, product=product, compute_dtype=dtype, **kw)
  return x, params, qp


def test_adapted_and_bare_kernels_share_one_fp8_product():
  x, _, qp = _mlp()
  forward = jlora.wrap(MLP().apply)
  # Only "up" adapted (b = 0): "down" runs bare, in FP8, not dequantized.
  lp = jlora.apply(qp, rank=4, targets="up", key=KEY)
  assert quant.is_fp8(lp["down"]["kernel"])
  y = forward({"params": lp}, x)
  y_all = forward({"params": jlora.apply(qp, rank=4, key=KEY)}, x)
  np.testing.assert_array_equal(y, y_all)
  # The reference: two FP8 products with float64 in between.
  up, down = qp["up"]["kernel"], qp["down"]["kernel"]
  h = np_product(np.asarray(x), np.asarray(up.values, np.float64),
                 np.asarray(up.scale, np.float64)) + np.asarray(
                     qp["up"]["bias"], np.float64)
  h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
  ref = np_product(h, np.asarray(down.values, np.float64), np.asarray(
      down.scale, np.float64)) + np.asarray(qp["down"]["bias"], np.float64)
  assert rel(y, ref) < 1e-5
  dense = MLP().apply({"params": quant.dequantize(qp)}, x)
  assert 1e-3 < rel(y, dense) < 0.05


@pytest.mark.parametrize("jit", [False, True])
def test_wrapped_matches_merged_path(jit):
  x, params, _ = _mlp()
  lp = randomize_b(jlora.apply(quant.quantize_fp8(params, compute_dtype=F32),
                               rank=4, key=KEY), jax.random.key(5), 0.05)
  forward = jlora.wrap(MLP().apply)
  call = jax.jit(forward) if jit else forward
  merged = jlora.merge(lp)  # dequantizes: plain float32 kernels
  assert merged["up"]["kernel"].dtype == F32
  ref = MLP().apply({"params": merged}, x)
  # Upcast (here "auto" on CPU): the LoRA math on the dequantized base.
  np.testing.assert_allclose(call({"params": lp}, x), ref, rtol=1e-5,
                             atol=1e-5)
  # Emulated FP8: the adapter path is unchanged and the base product is the
  # FP8 one, so the result moves from the merged one by FP8 rounding only.
  emulated = quant.set_fp8_product(lp, "fp8")
  y = call({"params": emulated}, x)
  assert 1e-3 < rel(y, ref) < 0.05
  # Same adapters with b = 0 give the bare FP8 base: their difference is
  # exactly the adapter's contribution as the merged path computes it.
  zero_b = jax.tree.map(lambda n: dataclasses.replace(n, b=jnp.zeros_like(n.b))
                        if jlora.node.is_lora(n) else n, emulated,
                        is_leaf=jlora.node.is_lora)
  up = lambda tree: jlora.wrap(lambda p, x: nn.Dense(128).apply(
      {"params": p}, x))(tree["up"], x)
  delta = up(emulated) - up(zero_b)
  node = emulated["up"]["kernel"]
  ref_delta = node.scale * (np.asarray(x, np.float64) @ np.asarray(node.a)
                            @ np.asarray(node.b))
  np.testing.assert_allclose(delta, ref_delta, rtol=1e-4, atol=1e-5)


def test_gradients_reach_adapters_only():
  x, _, qp = _mlp()
  lp = randomize_b(jlora.apply(qp, rank=4, key=KEY), jax.random.key(2))
  forward = jlora.wrap(MLP().apply)
  loss = lambda tree: jnp.sum(forward({"params": tree}, x) ** 2)
  grads = jax.jit(jax.grad(loss))(lp)
  for name in ("up", "down"):
    g = grads[name]["kernel"]
    np.testing.assert_array_equal(np.asarray(g.w.values, np.float32), 0.0)
    np.testing.assert_array_equal(g.w.scale, 0.0)
    assert float(jnp.abs(g.a).max()) > 0 and float(jnp.abs(g.b).max()) > 0
  # Against the dense LoRA gradient on the dequantized base: FP8 error only.
  dense = jax.jit(jax.grad(loss))(quant.dequantize(lp))
  for name in ("up", "down"):
    for f in ("a", "b"):
      assert rel(getattr(grads[name]["kernel"], f),
                 getattr(dense[name]["kernel"], f)) < 0.05


L, D, F = 3, 32, 64


class Layer(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=F32, name=name)
    return h + dense(D, "down")(jax.nn.silu(dense(F, "up")(h))), None


class Stack(nn.Module):
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    layer = nn.remat(Layer, prevent_cse=False) if self.remat else Layer
    return nn.scan(layer, variable_axes={"params": 0},
                   split_rngs={"params": True}, length=L)(name="layers")(
                       x, None)[0]


def _float_avals(jaxpr, out):
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      aval = v.aval
      if hasattr(aval, "shape") and jnp.issubdtype(aval.dtype, jnp.floating):
        out.append((tuple(aval.shape), aval.dtype))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      _float_avals(sub, out)
  return out


@pytest.mark.parametrize("remat", [False, True])
def test_scan_over_stacked_fp8_kernels(remat):
  x = jax.random.normal(KEY, (4, D))
  params = Stack().init(KEY, x)["params"]
  qp = quant.quantize_fp8(params, product="fp8", compute_dtype=F32)
  assert qp["layers"]["up"]["kernel"].scale.shape == (L, 1, F)
  lp = randomize_b(jlora.apply(qp, rank=4, targets="up", key=KEY),
                   jax.random.key(3), 0.05)
  forward = jlora.wrap(Stack(remat).apply)
  trainable, frozen = jlora.partition(lp)
  loss = lambda t, x: jnp.sum(forward({"params": jlora.combine(t, frozen)}, x)
                              ** 2)
  y = jax.jit(forward)({"params": lp}, x)
  g = jax.jit(jax.grad(loss))(trainable, x)

  # The same layers one by one, each slice a plain (unscanned) FP8 kernel.
  def unrolled(t, x):
    tree = jlora.combine(t, frozen)["layers"]
    for i in range(L):
      layer = jax.tree.map(
          lambda n: dataclasses.replace(jax.tree.map(lambda a: a[i], n),
                                        layout="io")
          if jlora.node.is_lora(n) else jax.tree.map(lambda a: a[i], n),
          tree, is_leaf=jlora.node.is_lora)
      x = jlora.wrap(Layer().apply)({"params": layer}, x, None)[0]
    return x

  np.testing.assert_allclose(y, jax.jit(unrolled)(trainable, x), rtol=1e-6,
                             atol=1e-6)
  g_ref = jax.jit(jax.grad(lambda t, x: jnp.sum(unrolled(t, x) ** 2)))(
      trainable, x)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # No dequantized array the size of a whole stacked kernel exists in the
  # step: adapted ("up") and bare ("down") kernels are used one layer at a
  # time (the stored e4m3 stacks themselves only pass through stop_gradient).
  avals = _float_avals(jax.make_jaxpr(jax.grad(loss))(trainable, x).jaxpr, [])
  big = [a for a in avals if math.prod(a[0]) >= L * D * F]
  assert big and {dtype for _, dtype in big} == {jnp.dtype(jnp.float8_e4m3fn)}


def test_llama_fp8_train_step():
  from jlora.models import ModelConfig, from_config
  cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=4, num_kv_heads=2)
  model, params = from_config(cfg, KEY, dtype=jnp.bfloat16,
                              param_dtype=jnp.bfloat16, scan_layers=True,
                              remat="full")
  qp = quant.quantize_fp8(params, product="fp8")
  kernel = qp["model"]["layers"]["mlp"]["up_proj"]["kernel"]
  assert quant.is_fp8(kernel) and kernel.scale.shape == (2, 1, 128)
  lp = jlora.apply(qp, rank=4, targets="q_proj|v_proj", key=KEY)
  ids = jax.random.randint(KEY, (2, 16), 0, 128)
  forward = jlora.wrap(model.apply)

  def loss(tree):
    logits = forward({"params": tree}, ids[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(F32))
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))

  _, losses = train_adapters(lp, loss, 3)
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
  dense_loss = loss(jlora.apply(params, rank=4, targets="q_proj|v_proj",
                                key=KEY))
  assert abs(losses[0] - float(dense_loss)) < 0.02 * float(dense_loss)


@pytest.mark.parametrize("adapt_experts", [True, False])
@pytest.mark.parametrize("scan", [False, True])
def test_moe_experts_in_fp8(scan, adapt_experts):
  """FP8 expert kernels, adapted or bare, in a MoE model: the grouped
  products (XLA has no FP8 grouped GEMM) dequantize per use, so with FP8
  numerics asked for everywhere (``product="fp8"``) the model equals its
  merged, dequantized form, and the adapters' gradients equal its."""
  from jlora.models import ModelConfig, from_config
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    num_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=24)
  model, params = from_config(cfg, KEY, dtype=F32, param_dtype=F32,
                              scan_layers=scan)
  experts = r"experts/(gate_up|down)_proj/kernel"
  qp = quant.quantize_fp8(params, targets=experts, product="fp8",
                          compute_dtype=F32)
  stacked = qp["model"]["layers"]["mlp"] if scan else (
      qp["model"]["layers"]["0"]["mlp"])
  assert quant.is_fp8(stacked["experts"]["down_proj"]["kernel"])
  targets = experts + "|q_proj" if adapt_experts else "q_proj|v_proj"
  lp = randomize_b(jlora.apply(qp, rank=2, targets=targets, key=KEY),
                   jax.random.key(3), std=0.3)
  ids = jax.random.randint(KEY, (2, 12), 0, 64)

  def loss(apply, tree):
    logits = apply({"params": tree}, ids[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(F32))
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))

  trainable, frozen = jlora.partition(lp)
  got, g = jax.jit(jax.value_and_grad(lambda t: loss(
      jlora.wrap(model.apply), jlora.combine(t, frozen))))(trainable)
  want, g_ref = jax.jit(jax.value_and_grad(lambda t: loss(
      model.apply, jlora.merge(jlora.combine(t, frozen)))))(trainable)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_merge_gives_plain_arrays_for_bare_fp8_kernels():
  """`merge` fuses adapted kernels and dequantizes FP8 kernels left without
  an adapter: every leaf is a plain array an unwrapped model can take."""
  x, _, qp = _mlp()
  lp = randomize_b(jlora.apply(qp, rank=4, targets="up", key=KEY),
                   jax.random.key(4))
  assert quant.is_fp8(lp["down"]["kernel"])  # bare: no adapter
  fused = jlora.merge(lp)
  assert not any(quant.is_quantized(v) for v in jax.tree.leaves(
      fused, is_leaf=quant.is_quantized))
  assert len(jax.tree.leaves(fused)) == len(jax.tree.leaves(
      MLP().init(KEY, x)))
  bare = qp["down"]["kernel"]
  np.testing.assert_array_equal(
      fused["down"]["kernel"],
      np.asarray(bare.values, np.float64) * np.asarray(bare.scale))
  np.testing.assert_allclose(fused["up"]["kernel"],
                             lp["up"]["kernel"].materialize())
  y = MLP().apply({"params": fused}, x)  # unwrapped
  np.testing.assert_allclose(y, jlora.wrap(MLP().apply)(
      {"params": quant.set_fp8_product(lp, "upcast")}, x), rtol=1e-5,
      atol=1e-5)


def test_merge_and_quantize_keeps_fp8_settings():
  x, params, _ = _mlp()
  qp = quant.quantize_fp8(params, scaling="tensor", product="fp8",
                          compute_dtype=F32)
  lp = randomize_b(jlora.apply(qp, rank=4, key=KEY), jax.random.key(4))
  out = quant.merge_and_quantize(lp)
  new = out["up"]["kernel"]
  assert quant.is_fp8(new)
  assert (new.scaling, new.product, new.dtype) == ("tensor", "fp8", F32)
  fused = lp["up"]["kernel"].materialize()
  np.testing.assert_array_equal(new.values, fp8(fused, scaling="tensor")
                                .values)
  assert quant.is_fp8(quant.merge_and_quantize(jlora.apply(
      params, rank=2, key=KEY), "fp8")["up"]["kernel"])
  nf4 = quant.merge_and_quantize(lp, "nf4")["up"]["kernel"]
  assert isinstance(nf4, quant.QuantizedArray) and nf4.method == "nf4"


# -- sharding, checkpoints, loading ----------------------------------------------

needs_8 = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


class Wide(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(512, name="up")(x))
    return nn.Dense(32, name="down")(h)


@needs_8
@pytest.mark.parametrize("copy", [False, True])
def test_sharded_quantize_and_train_step(copy):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
  x = jax.random.normal(KEY, (16, 32))
  y = jax.random.normal(jax.random.key(1), (16, 32))
  params = Wide().init(KEY, x)["params"]
  specs = {"up": P(None, "model"), "down": P("model", None)}
  placed = jax.tree_util.tree_map_with_path(
      lambda p, v: jax.device_put(v, NamedSharding(
          mesh, specs[p[0].key] if p[-1].key == "kernel" else P())), params)
  q_sharded = quant.quantize_fp8(placed, product="fp8", transposed_copy=copy)
  q_single = quant.quantize_fp8(params, product="fp8", transposed_copy=copy)
  up, down = q_sharded["up"]["kernel"], q_sharded["down"]["kernel"]
  # Values keep the kernel's sharding; scales keep it on their output axis;
  # a transposed copy has it on the axes it holds.
  if copy:
    assert up.values_t.sharding.spec == P("model", None)
    assert down.values_t.sharding.spec == P(None, "model")
  assert up.values.sharding.spec == P(None, "model")
  assert up.scale.sharding.spec == P(None, "model")
  assert down.values.sharding.spec == P("model", None)
  assert down.scale.sharding.spec == P(None, None)
  assert up.sharding.spec == P(None, "model")
  for a, b in zip(jax.tree.leaves(q_sharded), jax.tree.leaves(q_single)):
    np.testing.assert_array_equal(a, b)

  def train(qp, x, y):
    lp = jlora.apply(qp, rank=4, targets="up", key=KEY)
    forward = jlora.wrap(Wide().apply)
    loss = lambda tree: jnp.mean((forward({"params": tree}, x) - y) ** 2)
    return train_adapters(lp, loss, 3)[1]

  xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
  ys = jax.device_put(y, NamedSharding(mesh, P("data", None)))
  np.testing.assert_allclose(train(q_sharded, xs, ys),
                             train(q_single, x, y), rtol=1e-5, atol=1e-6)


def test_orbax_round_trip(tmp_path):
  import orbax.checkpoint as ocp
  params = {"a": {"kernel": gaussian((64, 128))},
            "b": {"kernel": gaussian((2, 64, 100)), "bias": jnp.ones(3)}}
  q = quant.quantize_fp8(params, scaling="tensor", product="fp8")
  _, frozen = jlora.partition(jlora.apply(q, rank=2, targets="a", key=KEY))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "frozen", frozen)
  with ocp.StandardCheckpointer() as ckpt:
    back = ckpt.restore(tmp_path / "frozen",
                        jax.tree.map(ocp.utils.to_shape_dtype_struct, frozen))
  assert jax.tree.structure(back) == jax.tree.structure(frozen)
  assert back["b"]["kernel"].values.dtype == jnp.float8_e4m3fn
  assert back["a"]["kernel"].w.product == "fp8"
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_quantize_on_load(tmp_path, scan_layers):
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from helpers import TINY_HF
  from jlora.models import from_pretrained
  config = transformers.LlamaConfig(**TINY_HF)
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
  model, dense = from_pretrained(tmp_path, scan_layers=scan_layers)
  _, qparams = from_pretrained(tmp_path, scan_layers=scan_layers,
                               quantize="fp8")
  expected = jlora.quantize(dense, "fp8")
  flat_q = jax.tree_util.tree_leaves_with_path(qparams)
  flat_e = jax.tree_util.tree_leaves_with_path(expected)
  assert [p for p, _ in flat_q] == [p for p, _ in flat_e]
  for (_, a), (_, b) in zip(flat_q, flat_e):
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32))
  layers = qparams["model"]["layers"]
  q_proj = (layers if scan_layers else layers["0"])["self_attn"]["q_proj"]
  assert quant.is_fp8(q_proj["kernel"])
  assert not quant.is_quantized(qparams["lm_head"]["kernel"])


# -- the transposed copy ------------------------------------------------------

def _dots(jaxpr, e4m3_only=True) -> list:
  """(lhs shape, rhs shape, dimension numbers) of each dot_general (of two
  e4m3 operands only, or all)."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and (not e4m3_only or all(
        v.aval.dtype == jnp.float8_e4m3fn for v in eqn.invars)):
      out.append((eqn.invars[0].aval.shape, eqn.invars[1].aval.shape,
                  eqn.params["dimension_numbers"]))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += _dots(sub, e4m3_only)
  return out


def _contracts_last(dots) -> bool:
  """Whether every product contracts the trailing axes of both operands
  (the order a GPU's FP8 GEMM reads without a transpose)."""
  def last(shape, axes):
    return sorted(axes) == list(range(len(shape) - len(axes), len(shape)))
  return all(last(ls, lc) and last(rs, rc)
             for ls, rs, ((lc, rc), _) in dots)


COPY_CASES = {
  # layout, kernel shape, fn(w, x), x shape
  "io": ("io", (16, 12), lambda w, x: x @ w, (2, 3, 16)),
  "oi (x @ w.T)": ("oi", (12, 16), lambda w, x: x @ w.T, (2, 3, 16)),
  "bio": ("bio", (3, 16, 12), lambda w, x: jnp.einsum("eti,eio->eto", x, w),
          (3, 4, 16)),
  "ioo": ("ioo", (16, 4, 3), lambda w, x: jnp.einsum("bi,ihd->bhd", x, w),
          (5, 16)),
  "iio": ("iio", (4, 4, 12), lambda w, x: jnp.einsum("bhd,hdo->bo", x, w),
          (5, 4, 4)),
  "kernel on the left": ("io", (16, 12), lambda w, x: lax.dot_general(
      w, x, (((0,), (1,)), ((), ()))), (6, 16)),
}


@pytest.mark.parametrize("scaling", ["channel", "tensor"])
@pytest.mark.parametrize("case", sorted(COPY_CASES))
def test_transposed_copy_gives_the_same_product_read_in_gemm_order(
    case, scaling, monkeypatch):
  """With the copy stored, the product and the input gradient are exactly
  those without it (same e4m3 values, same math), and on the GPU path both
  products, forward and backward, contract trailing axes of both
  operands."""
  layout, shape, fn, x_shape = COPY_CASES[case]
  w = gaussian(shape, jax.random.key(1))
  x = gaussian(x_shape, jax.random.key(2), std=1.0)
  plain = fp8(w, layout, scaling=scaling, dtype=F32, product="fp8")
  copy = fp8(w, layout, scaling=scaling, dtype=F32, product="fp8",
             transposed_copy=True)
  # The copy holds the same values in another order.
  np.testing.assert_array_equal(
      np.transpose(np.asarray(plain.values, np.float32), copy.t_axes),
      np.asarray(copy.values_t, np.float32))
  assert copy.nbytes == plain.nbytes + plain.values.size

  def run(q):
    g = jlora.wrap(fn)
    y, vjp = jax.vjp(lambda x: g(q, x), x)
    return y, vjp(jnp.cos(y))[0]

  got, want = jax.jit(run)(copy), jax.jit(run)(plain)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  # The GPU path's jaxpr (XLA upcasts e4m3 on CPU): a bare kernel has only
  # its two products, forward and input gradient.
  monkeypatch.setattr(_fp8, "product_path", lambda product: "gpu")
  dots = _dots(jax.make_jaxpr(run)(copy).jaxpr, e4m3_only=False)
  assert len(dots) == 2 and _contracts_last(dots)
  if case in ("io", "bio"):  # the negative control: one order stored
    assert not _contracts_last(_dots(jax.make_jaxpr(run)(plain).jaxpr,
                                     e4m3_only=False))


def test_transposed_copy_follows_transposes_without_moving():
  q = fp8(gaussian((2, 16, 12)), "bio", product="fp8", transposed_copy=True)
  assert q.t_axes == (0, 2, 1) and q.t_tail == (-1, -2)
  t = q.transpose(0, 2, 1)  # the stored orders swap roles, unmoved
  assert t.values is q.values_t and t.values_t is q.values
  assert t.t_axes == (0, 2, 1)
  odd = q.transpose(1, 0, 2)  # neither stored order: values transposed
  assert odd.values_t is q.values_t and odd.t_axes == (1, 2, 0)
  np.testing.assert_array_equal(
      np.asarray(odd.values, np.float32),
      np.asarray(q.values, np.float32).transpose(1, 0, 2))
  np.testing.assert_array_equal(np.asarray(t.dequantize(), np.float32),
                                np.asarray(q.dequantize(), np.float32)
                                .transpose(0, 2, 1))
  # A reshape keeps the values alone; the copy serves the stored kernel.
  r = q.reshape(2, 16, 3, 4)
  assert quant.is_fp8(r) and r.values_t is None


def test_llama_step_with_transposed_copies_scans_them(monkeypatch):
  """A scanned Llama's loss and adapter gradients are exactly those without
  the copies, every e4m3 product of the step reads GEMM order, and
  merge_and_quantize keeps the copies."""
  from jlora.models import ModelConfig, from_config
  cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=4, num_kv_heads=2)
  model, params = from_config(cfg, KEY, dtype=jnp.bfloat16,
                              param_dtype=jnp.bfloat16, scan_layers=True,
                              remat="matmuls")
  ids = jax.random.randint(KEY, (2, 16), 0, 128)

  def step(trainable, frozen):
    forward = jlora.wrap(model.apply)

    def loss(t):
      logits = forward({"params": jlora.combine(t, frozen)}, ids[:, :-1])
      logp = jax.nn.log_softmax(logits.astype(F32))
      return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))
    return jax.value_and_grad(loss)(trainable)

  runs = []
  for copy in (False, True):
    qp = quant.quantize_fp8(params, product="fp8", transposed_copy=copy)
    lp = randomize_b(jlora.apply(qp, rank=4, key=KEY), jax.random.key(5))
    trainable, frozen = jlora.partition(lp)
    runs.append(jax.jit(step)(trainable, frozen))
    with monkeypatch.context() as m:  # the GPU path's jaxpr
      m.setattr(_fp8, "product_path", lambda product: "gpu")
      jax.clear_caches()  # the jitted step's trace holds the emulation
      dots = _dots(jax.make_jaxpr(step)(trainable, frozen).jaxpr)
    jax.clear_caches()
    assert len(dots) == 14  # 7 projections, forward and backward
    assert _contracts_last(dots) == copy
  for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])):
    np.testing.assert_array_equal(a, b)
  kernel = qp["model"]["layers"]["mlp"]["up_proj"]["kernel"]
  assert kernel.values_t.shape == (2, 128, 64)  # (layers, out, in)
  again = quant.merge_and_quantize(lp)["model"]["layers"]["mlp"]["up_proj"][
      "kernel"]
  assert again.t_axes == kernel.t_axes and again.values_t is not None


def test_loader_hook_stacks_transposed_copies():
  """`from_config` quantizing layer by layer through a hook with
  transposed_copy: each stacked kernel holds its copy, equal to the
  transposed values, and the hook refuses FP8 options for other methods."""
  from jlora.models import ModelConfig, from_config
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                    num_layers=3, num_heads=4, num_kv_heads=2)
  _, qp = from_config(cfg, KEY, scan_layers=True, quantize=quant.quantizer(
      "fp8", transposed_copy=True))
  up = qp["model"]["layers"]["mlp"]["up_proj"]["kernel"]
  assert up.values.shape == (3, 32, 48) and up.values_t.shape == (3, 48, 32)
  np.testing.assert_array_equal(
      np.asarray(up.values, np.float32).transpose(0, 2, 1),
      np.asarray(up.values_t, np.float32))
  with pytest.raises(TypeError, match="options of method 'fp8'"):
    quant.quantizer("nf4", transposed_copy=True)
  with pytest.raises(ValueError, match="unknown FP8 scaling"):
    quant.quantizer("fp8", scaling="row")


# -- an FP8 LM head in the chunked cross-entropy ------------------------------

def _np_ce(h, qw, sw, y):
  """Loss and d loss / d h of the FP8 scheme in float64: per-row FP8
  logits, and the input gradient of the FP8 product."""
  z = np_product(h, qw, sw)
  lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
  loss = np.mean(lse - z[np.arange(len(y)), y])
  dz = np.exp(z - lse[:, None])
  dz[np.arange(len(y)), y] -= 1
  return loss, np_input_grad(dz / len(y), qw, sw)


@pytest.mark.parametrize("copy", [False, True])
def test_fp8_head_in_chunked_cross_entropy(copy, monkeypatch):
  from jlora.models.losses import chunked_cross_entropy
  h = gaussian((4, 10, 32), jax.random.key(1), std=1.0)
  y = jax.random.randint(jax.random.key(2), (4, 10), 0, 96)
  w = gaussian((32, 96), jax.random.key(3), std=0.2)
  head = quant.quantize_fp8({"lm_head": {"kernel": w}}, targets="lm_head",
                            product="fp8", compute_dtype=F32,
                            transposed_copy=copy)["lm_head"]["kernel"]
  f = lambda h, head: chunked_cross_entropy(h, head, y, chunk_size=16)
  loss, dh = jax.jit(jax.value_and_grad(f))(h, head)
  want, want_dh = _np_ce(np.asarray(h).reshape(40, 32), np.asarray(
      head.values, np.float64), np.asarray(head.scale, np.float64),
                         np.asarray(y).reshape(-1))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(dh).reshape(40, 32), want_dh,
                             rtol=1e-4, atol=1e-4 * np.abs(want_dh).max())
  # The dense head gives another loss: FP8 numerics, not a dense fallback.
  assert abs(float(f(h, head.dequantize())) - float(loss)) > 1e-5
  # The GPU path: both head products are e4m3 GEMMs (in GEMM order with
  # the copy).
  monkeypatch.setattr(_fp8, "product_path", lambda product: "gpu")
  jax.clear_caches()
  dots = _dots(jax.make_jaxpr(jax.grad(f))(h, head).jaxpr)
  jax.clear_caches()
  assert len(dots) == 2 and _contracts_last(dots) == copy
  with pytest.raises(TypeError, match="FP8 head, which is frozen"):
    jax.grad(f, argnums=1)(h, dataclasses.replace(head, product="upcast"))


def test_bare_fp8_kernels_under_selections():
  """FP8 kernels without an adapter indexed as models do: a layer of a
  stacked kernel (static and traced index) keeps the FP8 form, and an
  embedding lookup (a gather along an axis the scales share) sees the
  dense table; all equal the dequantized model."""
  stack = gaussian((3, 16, 12), jax.random.key(1))
  table = gaussian((40, 16), jax.random.key(2))
  q = quant.quantize_fp8({"stack": stack, "embed": table},
                         targets="stack|embed", product="upcast",
                         compute_dtype=F32, transposed_copy=True)
  ids = jnp.array([3, 0, 39, 7])

  def fn(p, ids, i):
    x = p["embed"][ids]                      # (4, 16)
    return x @ p["stack"][1] + x @ p["stack"][i]

  dense = jax.tree.map(lambda a: a.dequantize(), q,
                       is_leaf=quant.is_quantized)
  want = fn(dense, ids, 2)
  got = jax.jit(jlora.wrap(fn))(q, ids, 2)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # The layer selections act on the stored arrays: only the selected
  # layers are dequantized, never the whole (3, 16, 12) stack; the lookup
  # dequantizes the (40, 16) table.
  shapes = {a[0] for a in _float_avals(
      jax.make_jaxpr(jlora.wrap(fn))(q, ids, 2).jaxpr, [])
            if a[1] == jnp.dtype(F32)}
  assert (40, 16) in shapes and (16, 12) in shapes
  assert (3, 16, 12) not in shapes


def test_bare_fp8_experts_are_dequantized_per_grouped_product():
  """A bare FP8 expert stack in a grouped product (XLA has no FP8 form of
  it) equals the dense product, and the backward pass dequantizes the
  stack again (inside a rematerialised call) instead of keeping the
  forward's dense stack."""
  q = quant.quantize_fp8({"e": gaussian((3, 16, 12))}, targets="e",
                         product="fp8", compute_dtype=F32)
  x = gaussian((6, 16), jax.random.key(2), std=1.0)
  sizes = jnp.array([2, 3, 1], jnp.int32)
  fn = lambda p, x: lax.ragged_dot(x, p["e"], sizes)
  np.testing.assert_allclose(jax.jit(jlora.wrap(fn))(q, x),
                             fn({"e": q["e"].dequantize()}, x), rtol=1e-6)
  jaxpr = jax.make_jaxpr(jax.grad(
      lambda x: jnp.sum(jlora.wrap(fn)(q, x) ** 2)))(x).jaxpr
  recomputed = [a for e in jaxpr.eqns if e.primitive.name in (
      "checkpoint", "remat2") for sub in jax.extend.core.jaxprs_in_params(
          e.params) for a in _float_avals(sub, [])]
  assert ((3, 16, 12), jnp.dtype(F32)) in recomputed
