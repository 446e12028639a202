"""`jlora.quant`: NF4/FP4/int8 bases against a float64 NumPy reference, and
QLoRA training through `jlora.apply` + `jlora.wrap` on them."""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jlora
from jlora import quant
from helpers import randomize_b, rel_err, train_adapters

KEY = jax.random.key(0)

# -- float64 NumPy reference ---------------------------------------------------

# The paper's NF4 values (QLoRA, appendix E).
PAPER_NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])
# bitsandbytes' FP4: code = sign bit | 3 bits, magnitudes below, over 12.
FP4_MAG = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3]) / 12
REF_FP4 = np.concatenate([FP4_MAG, -FP4_MAG])


def ref_dynamic():
  """bitsandbytes' signed dynamic 8-bit map, built in float64."""
  v = [0.0, 1.0]
  for e in range(7):
    edges = np.linspace(0.1, 1.0, 2 ** e + 1)
    mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - 6)
    v += list(mids) + list(-mids)
  return np.sort(np.array(v))


def ref_nearest(r, table):
  """Code of the nearest table value (ties to the lower value, then lower
  code), and the distance of each input to the nearest decision boundary."""
  order = np.argsort(table, kind="stable")
  vals = table[order]
  keep = np.concatenate([[True], np.diff(vals) > 0])
  vals, codes = vals[keep], order[keep]
  mids = (vals[:-1] + vals[1:]) / 2
  idx = np.searchsorted(mids, r, side="left")
  dist = np.min(np.abs(r[..., None] - mids), axis=-1)
  return codes[idx], dist


def ref_quantize(w, method, block, dq, stacked):
  """float64 quantize: dict of codes (unpacked), scales and boundary gaps."""
  w = np.asarray(w, np.float64)
  lead, sl = w.shape[:stacked], w.shape[stacked:]
  n = math.prod(sl)
  nb = -(-n // block)
  flat = np.zeros((*lead, nb * block))
  flat[..., :n] = w.reshape(*lead, n)
  blocks = flat.reshape(*lead, nb, block)
  absmax = np.abs(blocks).max(-1)
  r = blocks / np.where(absmax > 0, absmax, 1)[..., None]
  if method == "int8":
    codes = np.clip(np.round(r * 127), -127, 127)
    gap = np.abs(np.abs(r * 127 - np.floor(r * 127)) - 0.5) / 127
  else:
    codes, gap = ref_nearest(r, PAPER_NF4 if method == "nf4" else REF_FP4)
  out = dict(codes=codes.reshape(*lead, -1)[..., :n], gap=gap.reshape(
      *lead, -1)[..., :n], absmax=absmax, scales=absmax)
  if dq:
    offset = absmax.mean(-1)
    c = absmax - offset[..., None]
    nb2 = -(-nb // 256)
    cp = np.zeros((*lead, nb2 * 256))
    cp[..., :nb] = c
    cp = cp.reshape(*lead, nb2, 256)
    absmax2 = np.abs(cp).max(-1)
    r2 = cp / np.where(absmax2 > 0, absmax2, 1)[..., None]
    q2, gap2 = ref_nearest(r2, ref_dynamic())
    q2 = q2.reshape(*lead, -1)[..., :nb]
    scales = ref_dynamic()[q2] * np.repeat(absmax2, 256, axis=-1)[
        ..., :nb] + offset[..., None]
    out.update(q2=q2, gap2=gap2.reshape(*lead, -1)[..., :nb], absmax2=absmax2,
               offset=offset, scales=scales)
  return out


def ref_decode(codes, scales, method, block, shape, stacked):
  """float64 values from (unpacked) codes and per-block scales."""
  table = {"nf4": PAPER_NF4, "fp4": REF_FP4}.get(method)
  vals = codes / 127.0 if method == "int8" else table[codes]
  n = math.prod(shape[stacked:])
  per = np.repeat(scales, block, axis=-1)[..., :n]
  return (vals * per).reshape(shape)


def unpacked_codes(qa):
  """The stored codes of each slice, row-major, as ints (NumPy)."""
  c = np.asarray(qa.codes)
  lead = c.shape[:qa.stacked]
  n = math.prod(qa.slice_shape)
  if qa.method == "int8":
    return c.astype(np.int64).reshape(*lead, -1)[..., :n]
  pairs = np.stack([c >> 4, c & 15], -1).astype(np.int64)
  return pairs.reshape(*lead, -1)[..., :n]


def _gaussian(shape, seed=0, dtype=jnp.float32):
  return (0.02 * jax.random.normal(jax.random.key(seed), shape)).astype(dtype)


# -- code tables ---------------------------------------------------------------

def test_nf4_values_are_the_papers_normal_quantiles():
  # QLoRA, eq. 4: q_i from N(0,1) quantiles with delta = (1/30 + 1/32) / 2,
  # 8 positive and 7 negative, plus 0, each side normalised into [-1, 1].
  ppf = NormalDist().inv_cdf
  hi = 1 - 0.5 * (1 / 30 + 1 / 32)
  pos = [ppf(p) for p in np.linspace(hi, 0.5, 9)[:-1]]
  neg = [-ppf(p) for p in np.linspace(hi, 0.5, 8)[:-1]]
  derived = np.sort(np.array(pos + neg + [0.0]))
  derived /= np.abs(derived).max()
  np.testing.assert_allclose(quant.NF4_VALUES, derived, atol=2e-7)
  np.testing.assert_array_equal(quant.NF4_VALUES, PAPER_NF4.astype(np.float32))


def test_fp4_and_dynamic_tables():
  np.testing.assert_array_equal(quant.FP4_VALUES, REF_FP4.astype(np.float32))
  dyn = quant.DYNAMIC_VALUES
  assert dyn.shape == (256,) and len(np.unique(dyn)) == 256
  assert dyn.max() == 1.0 and 0.0 in dyn and np.all(np.diff(dyn) > 0)
  np.testing.assert_allclose(dyn, ref_dynamic(), rtol=1e-7)


def test_packing_puts_the_first_value_in_the_high_nibble():
  w = jnp.asarray([[-1.0, 1.0] + [0.0] * 62], jnp.float32)  # one block
  qa = quant.quantize_array(w, "nf4", double_quant=False)
  assert qa.codes.dtype == jnp.uint8 and qa.codes.shape == (1, 32)
  assert int(qa.codes[0, 0]) == 0x0F  # code 0 (-1.0) high, code 15 (1.0) low
  assert int(qa.codes[0, 1]) == 0x77  # two zeros, code 7


# -- round trip against the reference ------------------------------------------

def _check_against_reference(w, method, block, dq, stacked):
  qa = quant.quantize_array(w, method, block_size=block, double_quant=dq,
                            dtype=jnp.float32, stacked=stacked)
  ref = ref_quantize(w, method, block, dq, stacked)
  assert qa.shape == tuple(w.shape) and qa.dtype == jnp.float32
  assert qa.stacked == stacked
  # Block absmax is exact (a max of the same float32 values).
  if not dq:
    np.testing.assert_array_equal(
        np.asarray(qa.absmax).reshape(ref["absmax"].shape), ref["absmax"])
  else:
    q2 = np.asarray(qa.absmax).reshape(ref["q2"].shape).astype(np.int64)
    diff2 = q2 != ref["q2"]
    # Codes equal bit for bit, except on a decision boundary (float32 vs
    # float64 rounding), where only a neighbouring code is allowed.
    assert np.all(ref["gap2"][diff2] < 1e-5), ref["gap2"][diff2]
    np.testing.assert_allclose(qa.offset, ref["offset"], rtol=1e-5)
    np.testing.assert_allclose(qa.absmax2, ref["absmax2"], rtol=1e-5)
  codes = unpacked_codes(qa)
  diff = codes != ref["codes"]
  assert np.all(ref["gap"][diff] < 1e-6), ref["gap"][diff]
  if w.size >= 10_000:  # small bf16 blocks can sit on a boundary exactly
    assert diff.mean() < 1e-4, diff.mean()
  # Decoding: the reference decode of the stored codes equals dequantize().
  scales = np.asarray(qa.block_scales(), np.float64).reshape(
      ref["scales"].shape)
  np.testing.assert_allclose(scales, ref["scales"], rtol=1e-5,
                             atol=1e-6 * ref["absmax"].max())
  dense = np.asarray(qa.dequantize(), np.float64)
  np.testing.assert_allclose(
      dense, ref_decode(codes, scales, method, block, w.shape, stacked),
      rtol=1e-6, atol=1e-9)
  # And the whole round trip matches the reference's, where codes agree.
  full = ref_decode(ref["codes"], ref["scales"], method, block, w.shape,
                    stacked)
  same = ~diff.reshape(w.shape)
  np.testing.assert_allclose(dense[same], full[same], rtol=1e-5,
                             atol=1e-5 * np.abs(np.asarray(w)).max())


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("dq", [True, False])
def test_matches_reference_on_a_stacked_kernel(method, dq):
  # 1100 blocks per layer: five second-level blocks, the last one partial.
  w = _gaussian((2, 64, 1100))
  _check_against_reference(w, method, 64, dq, stacked=1)


@settings(max_examples=12, deadline=None)
@given(method=st.sampled_from(["nf4", "fp4", "int8"]), dq=st.booleans(),
       stacked=st.integers(0, 1), block=st.sampled_from([2, 16, 64, 128]),
       rows=st.integers(1, 9), cols=st.integers(1, 40),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       seed=st.integers(0, 2 ** 16))
def test_matches_reference_for_any_shape(method, dq, stacked, block, rows,
                                         cols, dtype, seed):
  cols *= 2 if cols % 3 else 1  # some rows a whole number of blocks
  shape = (2, rows, cols) if stacked else (rows, cols)
  w = _gaussian(shape, seed, dtype)
  _check_against_reference(w, method, block, dq, stacked)


def test_jit_and_eager_agree_and_zero_blocks_are_exact():
  w = _gaussian((128, 128)).at[:, :64].set(0.0)
  eager = quant.quantize_array(w, "nf4")
  jitted = jax.jit(lambda w: quant.quantize_array(w, "nf4"))(w)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_array_equal(a, b)
  dense = eager.dequantize(jnp.float32)
  np.testing.assert_array_equal(dense[:, :64], 0.0)
  np.testing.assert_array_equal(jax.jit(lambda q: q.dequantize())(eager),
                                eager.dequantize())


def test_nf4_error_on_gaussian_weights():
  w = _gaussian((1024, 1024), seed=3)

  def err(method, dq=True):
    q = quant.quantize_array(w, method, double_quant=dq)
    return rel_err(q.dequantize(jnp.float32), w)

  nf4, nf4_single, fp4, int8 = err("nf4"), err("nf4", False), err("fp4"), err(
      "int8")
  # Stated in quantize's docstring: 9.20% relative RMS error for NF4, 9.21%
  # with double quantization, 12.2% for FP4, 0.59% for int8.
  assert 0.090 < nf4_single < 0.094, nf4_single
  assert nf4_single <= nf4 < nf4_single * 1.002, (nf4, nf4_single)
  assert 0.119 < fp4 < 0.125, fp4  # NF4 beats FP4 on normal weights
  assert 0.0055 < int8 < 0.0070, int8
  # bits per parameter: 4 + 32/64 without, ~4.127 with double quantization
  q = quant.quantize_array(w, "nf4")
  assert abs(q.nbytes * 8 / w.size - 4.127) < 0.01
  assert quant.quantize_array(w, "nf4", double_quant=False).nbytes * 8 == (
      4.5 * w.size)


# -- the node ------------------------------------------------------------------

def test_array_metadata_and_layout_ops():
  w = _gaussian((3, 64, 256))
  q = quant.quantize_array(w, "nf4", stacked=1)
  assert (q.shape, q.ndim, q.size, q.dtype) == ((3, 64, 256), 3, w.size,
                                                jnp.bfloat16)
  assert q.codes.shape == (3, 64, 128) and q.absmax.shape == (3, 64, 4)
  assert q.absmax2.shape == (3, 1) and q.offset.shape == (3,)
  assert q.astype(jnp.float32).dtype == jnp.float32
  assert q.astype(jnp.float32).dequantize().dtype == jnp.float32
  # Any reshape that keeps the stacked axis stays quantized, same values.
  for shape in [(3, 64 * 256), (3, 128, 128), (3, 64, 4, 64), (3, 8, 8, 256)]:
    r = q.reshape(shape)
    assert quant.is_quantized(r) and r.shape == shape
    np.testing.assert_array_equal(r.dequantize(), q.dequantize().reshape(shape))
  merged = q.reshape(3 * 64, 256)  # merges the stacked axis: dense
  assert not quant.is_quantized(merged) and merged.shape == (192, 256)
  assert q.transpose(0, 1, 2) is q
  np.testing.assert_array_equal(q.transpose(0, 2, 1),
                                q.dequantize().transpose(0, 2, 1))
  np.testing.assert_array_equal(jnp.asarray(q), q.dequantize())
  # Slicing the stored arrays along the stacked axis gives each layer.
  layer = jax.tree.map(lambda x: x[1], q)
  assert layer.shape == (64, 256) and layer.stacked == 0
  np.testing.assert_array_equal(layer.dequantize(), q.dequantize()[1])
  assert "nf4" in repr(q)


def test_quantize_tree_selects_linear_kernels():
  params = {"dense": {"kernel": _gaussian((32, 64)), "bias": jnp.ones(64)},
            "embed": {"embedding": _gaussian((100, 32))},
            "lm_head": {"kernel": _gaussian((32, 100))},
            "ints": {"kernel": jnp.ones((4, 4), jnp.int32)}}
  q = quant.quantize(params, "nf4")
  assert quant.is_quantized(q["dense"]["kernel"])
  for path in [("dense", "bias"), ("embed", "embedding"), ("lm_head", "kernel"),
               ("ints", "kernel")]:
    assert q[path[0]][path[1]] is params[path[0]][path[1]]
  again = quant.quantize(q, "nf4")
  assert again["dense"]["kernel"] is q["dense"]["kernel"]
  d = quant.dequantize(q)
  assert d["dense"]["kernel"].dtype == jnp.bfloat16
  only = quant.quantize(params, "int8", targets="embedding")
  assert quant.is_quantized(only["embed"]["embedding"])
  assert not quant.is_quantized(only["dense"]["kernel"])


def test_errors_name_the_problem():
  w = {"k": {"kernel": _gaussian((8, 64))}}
  with pytest.raises(ValueError, match="unknown quantization method 'nf3'"):
    quant.quantize(w, "nf3")
  with pytest.raises(ValueError, match="block_size must be an even int"):
    quant.quantize(w, "nf4", block_size=63)
  lp = jlora.apply(w, rank=2, key=KEY)
  with pytest.raises(ValueError, match="quantize the base before jlora.apply"):
    quant.quantize(lp, "nf4")
  with pytest.raises(ValueError, match="unknown quantization method"):
    quant.quantizer("q4")


def test_quantized_kernel_without_adapter_runs_dequantized():
  two = {"q": {"kernel": _gaussian((8, 64))},
         "v": {"kernel": _gaussian((64, 16))}}
  qparams = quant.quantize(two, "nf4")
  lp = jlora.apply(qparams, rank=2, targets="q/", key=KEY)
  assert quant.is_quantized(lp["v"]["kernel"])
  lp["q"]["kernel"] = dataclasses.replace(
      lp["q"]["kernel"], b=jax.random.normal(KEY, (2, 64)))
  fn = lambda p, x: jnp.tanh(x @ p["q"]["kernel"]) @ p["v"]["kernel"]
  x = jax.random.normal(KEY, (4, 8), jnp.bfloat16)
  out = jlora.wrap(fn)(lp, x)
  dense = {"q": {"kernel": jlora.merge({"k": lp["q"]["kernel"]})["k"]},
           "v": {"kernel": lp["v"]["kernel"].dequantize()}}
  ref = np.tanh(np.asarray(x, np.float64) @ np.asarray(
      dense["q"]["kernel"], np.float64)) @ np.asarray(dense["v"]["kernel"],
                                                      np.float64)
  rel = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
  assert rel < 2e-2
  # Counts report the logical (dense) size of the quantized kernel.
  assert jlora.count(lp).total == 8 * 64 + 64 * 16 + 2 * (8 + 64)


# -- QLoRA: apply + wrap -------------------------------------------------------

class MLP(nn.Module):
  dtype: object = jnp.bfloat16

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(128, dtype=self.dtype, name="up")(x))
    return nn.Dense(64, dtype=self.dtype, name="down")(h)


def _np_mlp(p, x):
  """float64 forward; p holds float64 kernels (fused) and biases."""
  h = x @ p["up"]["kernel"] + p["up"]["bias"]
  h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
  return h @ p["down"]["kernel"] + p["down"]["bias"]


def _np_fused(node):
  """float64 w + scale * a @ b with w the exact dequantized base."""
  w = np.asarray(node.w.dequantize(jnp.float32), np.float64)
  return w + node.scale * np.asarray(node.a, np.float64) @ np.asarray(
      node.b, np.float64)


@pytest.mark.parametrize("jit", [False, True])
def test_wrapped_forward_on_quantized_base(jit):
  x = jax.random.normal(KEY, (8, 64))
  params = MLP().init(KEY, x)["params"]
  lp = randomize_b(jlora.apply(quant.quantize(params, "nf4"), rank=8,
                               key=KEY), jax.random.key(1), std=0.05)
  forward = jlora.wrap(MLP().apply)
  call = jax.jit(forward) if jit else forward
  y = call({"params": lp}, x)
  # Same math as the LoRA forward on the dequantized base.
  y_dense = call({"params": quant.dequantize(lp)}, x)
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             np.asarray(y_dense, np.float32), rtol=1e-6,
                             atol=1e-6)
  # And the float64 reference within bf16 tolerance.
  p64 = {k: {"kernel": _np_fused(v["kernel"]),
             "bias": np.asarray(v["bias"], np.float64)} for k, v in lp.items()}
  assert rel_err(y, _np_mlp(p64, np.asarray(x, np.float64))) < 2e-2
  # merge gives compute-dtype fused kernels equal to the reference.
  merged = jlora.merge(lp)
  assert merged["up"]["kernel"].dtype == jnp.bfloat16
  assert rel_err(merged["up"]["kernel"], p64["up"]["kernel"]) < 1e-2


def test_gradients_reach_adapters_only():
  x = jax.random.normal(KEY, (8, 64))
  params = MLP(jnp.float32).init(KEY, x)["params"]
  qp = quant.quantize(params, "nf4", double_quant=False,
                      compute_dtype=jnp.float32)
  lp = randomize_b(jlora.apply(qp, rank=4, key=KEY), jax.random.key(2))
  forward = jlora.wrap(MLP(jnp.float32).apply)

  def loss(tree):
    return jnp.sum(forward({"params": tree}, x) ** 2)

  # Differentiate the whole tree: the float32 block scales of the base get
  # exactly zero, the adapters get the LoRA gradient of the dequantized base.
  grads = jax.jit(jax.grad(loss, allow_int=True))(lp)
  for name in ("up", "down"):
    g = grads[name]["kernel"]
    np.testing.assert_array_equal(g.w.absmax, 0.0)
    assert float(jnp.abs(g.a).max()) > 0 and float(jnp.abs(g.b).max()) > 0
  dense_grads = jax.jit(jax.grad(loss))(quant.dequantize(lp))
  for name in ("up", "down"):
    for f in ("a", "b"):
      np.testing.assert_allclose(getattr(grads[name]["kernel"], f),
                                 getattr(dense_grads[name]["kernel"], f),
                                 rtol=1e-4, atol=1e-5)
  trainable, frozen = jlora.partition(lp)
  kinds = {type(x).__name__ for x in jax.tree.leaves(
      trainable, is_leaf=quant.is_quantized)}
  assert kinds <= {"ArrayImpl"}
  assert quant.is_quantized(frozen["up"]["kernel"].w)


# -- scanned (stacked) models --------------------------------------------------

L, D, F = 4, 64, 256


class Layer(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=jnp.bfloat16,
                                     param_dtype=jnp.bfloat16, name=name)
    u = dense(F, "up")(h)
    return h + dense(D, "down")(jax.nn.silu(u)), None


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
def test_scanned_model_never_dequantizes_the_whole_stack(remat):
  model = Stack(remat)
  x = jax.random.normal(KEY, (2, D), jnp.bfloat16)
  params = model.init(KEY, x)["params"]
  lp = randomize_b(jlora.apply(quant.quantize(params, "nf4"), rank=4,
                               key=KEY), jax.random.key(3), std=0.05)
  assert lp["layers"]["up"]["kernel"].w.codes.shape == (L, D, F // 2)
  forward = jlora.wrap(model.apply)
  trainable, frozen = jlora.partition(lp)

  def loss(t, x):
    y = forward({"params": jlora.combine(t, frozen)}, x)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  if not remat:
    y = jax.jit(forward)({"params": lp}, x)
    y_dense = jax.jit(forward)({"params": quant.dequantize(lp)}, x)
    np.testing.assert_allclose(np.asarray(y, np.float32),
                               np.asarray(y_dense, np.float32), rtol=2e-2,
                               atol=2e-2)
    g = jax.jit(jax.grad(loss))(trainable, x)
    g_dense = jax.jit(jax.grad(lambda t, x: jnp.sum(forward(
        {"params": jlora.combine(t, quant.dequantize(frozen))}, x).astype(
            jnp.float32) ** 2)))(trainable, x)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_dense)):
      assert rel_err(a, b) < 3e-2

  # No float array the size of a whole stacked kernel exists anywhere in the
  # training step: not in the forward, not as a saved residual.
  full = L * D * F
  avals = _float_avals(jax.make_jaxpr(jax.grad(loss))(trainable, x).jaxpr, [])
  assert [a for a in avals if math.prod(a[0]) >= full] == []
  assert ((D, F), jnp.dtype(jnp.bfloat16)) in avals  # one layer, per use
  # The check does see a base dequantized at the entry.
  entry = jax.make_jaxpr(jax.grad(lambda t, x: jnp.sum(forward(
      {"params": quant.dequantize(jlora.combine(t, frozen))}, x).astype(
          jnp.float32) ** 2)))(trainable, x)
  assert ((L, D, F), jnp.dtype(jnp.bfloat16)) in _float_avals(entry.jaxpr, [])


@pytest.fixture(scope="module")
def llama():
  from jlora.models import ModelConfig, from_config
  cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=4, num_kv_heads=2)
  model, params = from_config(cfg, KEY, dtype=jnp.bfloat16,
                              param_dtype=jnp.bfloat16, scan_layers=True,
                              remat="full")
  return model, params, quant.quantize(params, "nf4")


def test_llama_scan_layers_qlora_step(llama):
  model, _, qp = llama
  kernel = qp["model"]["layers"]["mlp"]["up_proj"]["kernel"]
  assert quant.is_quantized(kernel) and kernel.stacked == 1
  assert not quant.is_quantized(qp["lm_head"]["kernel"])
  lp = jlora.apply(qp, rank=4, key=KEY)
  ids = jax.random.randint(KEY, (2, 16), 0, 128)
  forward = jlora.wrap(model.apply)

  def loss(tree):
    logits = forward({"params": tree}, ids[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))

  _, losses = train_adapters(lp, loss, 3)
  assert np.isfinite(losses).all() and losses[-1] < losses[0]


# -- merge, load, checkpoint ---------------------------------------------------

def test_merge_and_quantize_keeps_settings():
  x = jax.random.normal(KEY, (8, 64))
  params = Stack().init(KEY, x[:2].astype(jnp.bfloat16))["params"]
  qp = quant.quantize(params, "fp4", block_size=32, double_quant=False)
  lp = randomize_b(jlora.apply(qp, rank=4, key=KEY), jax.random.key(4))
  out = quant.merge_and_quantize(lp)
  node, new = lp["layers"]["up"]["kernel"], out["layers"]["up"]["kernel"]
  assert quant.is_quantized(new)
  assert (new.method, new.block_size, new.double_quant, new.stacked,
          new.dtype) == ("fp4", 32, False, 1, jnp.bfloat16)
  fused = node.materialize()
  expected = quant.quantize_array(fused, "fp4", block_size=32,
                                  double_quant=False, stacked=1)
  np.testing.assert_array_equal(new.codes, expected.codes)
  assert rel_err(new.dequantize(), fused) < 0.15
  # On a dense base, only with a method.
  dense_lp = jlora.apply(params, rank=4, key=KEY)
  assert not quant.is_quantized(
      quant.merge_and_quantize(dense_lp)["layers"]["up"]["kernel"])
  assert quant.merge_and_quantize(dense_lp, "nf4")["layers"]["up"][
      "kernel"].stacked == 1


def test_quantizer_hook_matches_quantize_on_a_llama_tree(llama):
  from flax import traverse_util
  _, params, whole = llama
  hook = quant.quantizer("nf4")
  flat = traverse_util.flatten_dict(params, sep="/")
  # What a loader does: one tensor at a time, as it is read.
  loaded = traverse_util.unflatten_dict(
      {p: hook(p, np.asarray(x)) for p, x in flat.items()}, sep="/")
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), loaded, whole)
  assert all(jax.tree.leaves(same))
  assert jax.tree.structure(loaded) == jax.tree.structure(whole)
  assert quant.quantize_leaf("model/norm/scale", flat["model/norm/scale"]) is (
      flat["model/norm/scale"])
  assert quant.quantize_leaf("x/kernel", flat["lm_head/kernel"],
                             targets="nothing") is flat["lm_head/kernel"]


def test_orbax_round_trip(tmp_path):
  import orbax.checkpoint as ocp
  params = {"a": {"kernel": _gaussian((64, 128))},
            "b": {"kernel": _gaussian((2, 64, 100)), "bias": jnp.ones(3)}}
  for i, dq in enumerate([True, False]):
    q = quant.quantize(params, "nf4", double_quant=dq)
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(tmp_path / f"q{i}", q)
    with ocp.StandardCheckpointer() as ckpt:
      back = ckpt.restore(tmp_path / f"q{i}",
                          jax.tree.map(ocp.utils.to_shape_dtype_struct, q))
    assert jax.tree.structure(back) == jax.tree.structure(q)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(q)):
      np.testing.assert_array_equal(a, b)


# -- sharding and host offload -------------------------------------------------

needs_8 = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


def _mesh():
  return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


class Wide(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(512, name="up")(x))
    return nn.Dense(32, name="down")(h)


@needs_8
def test_sharded_quantize_and_train_step():
  mesh = _mesh()
  x = jax.random.normal(KEY, (16, 32))
  y = jax.random.normal(jax.random.key(1), (16, 32))
  params = Wide().init(KEY, x)["params"]
  specs = {"up": P(None, "model"), "down": P("model", None)}
  placed = jax.tree_util.tree_map_with_path(
      lambda p, v: jax.device_put(v, NamedSharding(
          mesh, specs[p[0].key] if p[-1].key == "kernel" else P())), params)
  q_sharded = quant.quantize(placed, "nf4")
  q_single = quant.quantize(params, "nf4")
  up, down = q_sharded["up"]["kernel"], q_sharded["down"]["kernel"]
  # (32, 512) column-parallel: codes (32, 256) and absmax (32, 8) shard too.
  assert up.codes.sharding.spec == P(None, "model")
  assert up.absmax.sharding.spec == P(None, "model")
  # (512, 32) row-parallel: the row axis of codes (512, 16) shards; 32
  # columns are not a whole block, so the flat fallback stores it replicated.
  assert down.codes.sharding.spec == P(None, None) or down.codes.ndim == 1
  for a, b in zip(jax.tree.leaves(q_sharded), jax.tree.leaves(q_single)):
    np.testing.assert_array_equal(a, b)
  lp = jlora.apply(q_sharded, rank=4, key=KEY)
  assert lp["up"]["kernel"].b.sharding.spec == P(None, "model")

  def train(lp, x, y):
    forward = jlora.wrap(Wide().apply)
    loss = lambda tree: jnp.mean((forward({"params": tree}, x) - y) ** 2)
    return train_adapters(lp, loss, 3)[1]

  xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
  ys = jax.device_put(y, NamedSharding(mesh, P("data", None)))
  np.testing.assert_allclose(train(lp, xs, ys),
                             train(jlora.apply(q_single, rank=4, key=KEY), x,
                                   y), rtol=1e-4, atol=1e-6)


@needs_8
def test_stacked_sharded_kernel_keeps_layer_axis_sharding():
  mesh = _mesh()
  w = jax.device_put(_gaussian((2, 64, 256)),
                     NamedSharding(mesh, P("data", None, "model")))
  q = quant.quantize_array(w, "nf4", stacked=1)
  assert q.codes.sharding.spec == P("data", None, "model")
  assert q.absmax.sharding.spec == P("data", None, "model")
  assert q.absmax2.sharding.spec == P("data", None)
  assert q.offset.sharding.spec == P("data")
  assert q.sharding.spec == P("data", None, "model")
  np.testing.assert_array_equal(
      q.dequantize(), quant.quantize_array(np.asarray(w), "nf4",
                                           stacked=1).dequantize())


def _has_host_memory():
  try:
    return "pinned_host" in [m.kind for m in
                             jax.devices()[0].addressable_memories()]
  except Exception:
    return False


@pytest.mark.skipif(not _has_host_memory(),
                    reason="this backend has no pinned_host memory space")
def test_host_offloaded_optimizer_state():
  params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
  grads = {"w": jnp.full((8, 4), 0.5), "b": jnp.ones(4)}
  tx = quant.host_offloaded(optax.adam(1e-2))
  ref_tx = optax.adam(1e-2)
  state, ref_state = tx.init(params), ref_tx.init(params)
  kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state) if x.ndim}
  assert kinds == {"pinned_host"}

  @jax.jit
  def step(p, s):
    u, s = tx.update(grads, s, p)
    return optax.apply_updates(p, u), s

  p, ref_p = params, params
  for _ in range(3):
    p, state = step(p, state)
    u, ref_state = ref_tx.update(grads, ref_state, ref_p)
    ref_p = optax.apply_updates(ref_p, u)
  assert {x.sharding.memory_kind for x in jax.tree.leaves(state)
          if x.ndim} == {"pinned_host"}
  assert {x.sharding.memory_kind for x in jax.tree.leaves(p)} == {"device"}
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_p)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


@needs_8
@pytest.mark.skipif(not _has_host_memory(),
                    reason="this backend has no pinned_host memory space")
def test_host_offloaded_state_keeps_sharding():
  sharding = NamedSharding(_mesh(), P("data", "model"))
  params = {"w": jax.device_put(jnp.ones((8, 16)), sharding)}
  tx = quant.host_offloaded(optax.adam(1e-2))
  step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.ones_like, p), s, p))
  _, state = step(params, tx.init(params))
  mu = state[0].mu["w"]
  assert mu.sharding.memory_kind == "pinned_host"
  assert mu.sharding.spec == P("data", "model")


# -- adversarial inputs --------------------------------------------------------

BAD = [(0, 3, 5, np.nan), (0, 40, 70, np.inf), (1, 7, 200, -np.inf)]


def _with_bad(w):
  w = np.array(w)
  for *idx, v in BAD:
    w[tuple(idx)] = v
  return w


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_nonfinite_kernel_raises_when_eager():
  """Concrete inputs: a ValueError naming the path and the count."""
  w = _with_bad(_gaussian((2, 64, 256)))
  params = {"dense": {"kernel": jnp.asarray(w)},
            "ok": {"kernel": _gaussian((64, 64))}}
  for dq in (True, False):
    with pytest.raises(ValueError,
                       match=r"'dense/kernel' has 3 non-finite values"):
      quant.quantize(params, "nf4", double_quant=dq)
  # quantize-on-load: the loader's per-tensor hook
  with pytest.raises(ValueError, match=r"'model/x/kernel' has 3 non-finite"):
    quant.quantizer("int8")("model/x/kernel", w)
  # float64 values beyond float32's range, where quantization computes
  big = np.ones((4, 64))
  big[2, 2] = 1e300
  with pytest.raises(ValueError, match=r"'big' has 1 non-finite value .*"
                     r"beyond float32's range"):
    quant.quantize_array(big, "nf4", name="big")
  # merge_and_quantize of a node whose fused kernel is not finite
  lp = jlora.apply({"d": {"kernel": _gaussian((64, 64))}}, rank=2, key=KEY)
  lp["d"]["kernel"] = dataclasses.replace(
      lp["d"]["kernel"], b=lp["d"]["kernel"].b.at[0, 0].set(jnp.inf) + 1.0)
  with pytest.raises(ValueError, match=r"'d/kernel' has 64 non-finite"):
    quant.merge_and_quantize(lp, "nf4")


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("dq", [True, False])
@pytest.mark.parametrize("cols", [256, 250])  # structured and flat storage
def test_nonfinite_under_jit_stays_in_its_place(method, dq, cols):
  """Traced inputs: every other value quantizes as if the bad one were 0;
  the bad one saturates (+-inf to +-the block scale, NaN to 0)."""
  clean = np.asarray(_gaussian((2, 64, cols)), np.float64)
  zeroed = _with_bad(clean)
  zeroed[~np.isfinite(zeroed)] = 0.0
  q = jax.jit(lambda x: quant.quantize_array(
      x, method, double_quant=dq, dtype=jnp.float32, stacked=1))(
          jnp.asarray(_with_bad(clean), jnp.float32))
  dense = np.asarray(q.dequantize(), np.float64)
  assert np.isfinite(dense).all()
  # The float64 reference of the scheme on the kernel with zeros in place.
  ref = ref_quantize(zeroed, method, 64, dq, stacked=1)
  expected = ref_decode(ref["codes"], ref["scales"], method, 64, clean.shape,
                        1)
  scale = np.repeat(ref["scales"], 64, axis=-1)[..., :64 * cols].reshape(
      clean.shape)
  for *idx, v in BAD:
    idx = tuple(idx)
    expected[idx] = 0.0 if np.isnan(v) else np.sign(v) * scale[idx]
  near = np.zeros(clean.shape, bool)  # values on a decision boundary
  near.reshape(2, -1)[:] = ref["gap"] < 1e-6
  np.testing.assert_allclose(dense[~near], expected[~near], rtol=2e-5,
                             atol=1e-7)
  # and bit for bit what the clean-with-zeros kernel gives, bad spots aside
  z = quant.quantize_array(jnp.asarray(zeroed, jnp.float32), method,
                           double_quant=dq, dtype=jnp.float32, stacked=1)
  same = np.ones(clean.shape, bool)
  for *idx, _ in BAD:
    same[tuple(idx)] = False
  np.testing.assert_array_equal(dense[same], np.asarray(z.dequantize())[same])


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_float64_and_one_axis_kernels_match_reference(method):
  w = np.asarray(_gaussian((6, 128), seed=5), np.float64) * np.pi
  # float64 is quantized from its float32 values (where quantization runs)
  w32 = w.astype(np.float32)
  for x, y in zip(jax.tree.leaves(quant.quantize_array(w, method)),
                  jax.tree.leaves(quant.quantize_array(w32, method))):
    np.testing.assert_array_equal(x, y)
  w = w32
  _check_against_reference(w, method, 64, True, stacked=0)
  _check_against_reference(w[0, :100], method, 64, False, stacked=0)  # 1-D
  # a block size that divides nothing, and one larger than the kernel
  _check_against_reference(w[:5, :50], method, 64, True, stacked=0)
  _check_against_reference(w[:3, :20], method, 128, False, stacked=0)


@pytest.mark.parametrize("shape,stacked", [((0, 64), 0), ((64, 0), 0),
                                           ((2, 0, 64), 1), ((0, 4, 64), 1),
                                           ((3, 0), 0)])
@pytest.mark.parametrize("dq", [True, False])
def test_zero_size_kernels(shape, stacked, dq):
  q = quant.quantize_array(jnp.zeros(shape), "nf4", double_quant=dq,
                           stacked=stacked)
  assert q.shape == shape and q.stacked == stacked
  out = q.dequantize(jnp.float32)
  assert out.shape == shape and out.dtype == jnp.float32
  assert q.block_scales().size == 0
  assert jax.jit(lambda q: q.dequantize())(q).shape == shape


def test_quantization_arguments_are_checked():
  w = _gaussian((8, 128))
  for bad in (0, -64, 63, 64.0, "64", True, None, 1):
    with pytest.raises(ValueError, match=r"block_size must be an even int"):
      quant.quantize_array(w, "nf4", block_size=bad)
  with pytest.raises(ValueError, match=r"block_size must be an even int"):
    quant.quantizer("nf4", block_size=0)  # at once, not on the first tensor
  for bad in ("NF4", "int4", None, 4):
    with pytest.raises(ValueError, match="unknown quantization method"):
      quant.quantize_array(w, bad)
  # NumPy integers are integers
  a = quant.quantize_array(w, "nf4", block_size=np.int64(32))
  b = quant.quantize_array(w, "nf4", block_size=32)
  assert a.block_size == 32 and type(a.block_size) is int
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(ValueError, match=r"double_quant must be a bool"):
    quant.quantize_array(w, "nf4", double_quant="false")
  with pytest.raises(ValueError, match=r"compute dtype must be a floating"):
    quant.quantize(w, "nf4", targets=".*", compute_dtype=jnp.int8)
  with pytest.raises(ValueError, match=r"stacked=2 leaves no axis"):
    quant.quantize_array(w, "nf4", stacked=2)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.bool_])
def test_integer_and_bool_kernels_are_not_quantized(dtype):
  ints = jnp.ones((8, 64), dtype)
  with pytest.raises(ValueError, match=rf"has dtype {jnp.dtype(dtype).name}"):
    quant.quantize_array(ints, "nf4")
  params = {"ints": {"kernel": ints}, "dense": {"kernel": _gaussian((8, 64))}}
  # "all-linear" means floating kernels: the integer leaf stays as it is...
  q = quant.quantize(params, "nf4")
  assert q["ints"]["kernel"] is ints and quant.is_quantized(
      q["dense"]["kernel"])
  assert quant.quantize_leaf("ints/kernel", ints) is ints
  # ...but an explicit target that selects it is an error naming it.
  named = (rf"not floating point: {{'ints/kernel': '{jnp.dtype(dtype).name}'}}"
           r".*exclude=\['ints/kernel'\]")
  with pytest.raises(ValueError, match=named):
    quant.quantize(params, "nf4", targets="kernel")
  with pytest.raises(ValueError, match=r"target 'ints/kernel' has dtype"):
    quant.quantize_leaf("ints/kernel", ints, targets="ints")


def test_already_quantized_is_never_quantized_twice():
  params = {"d": {"kernel": _gaussian((2, 64, 128))}}
  q = quant.quantize(params, "nf4", block_size=32)
  assert quant.quantize(q, "nf4", block_size=32)["d"]["kernel"] is q["d"][
      "kernel"]
  for kwargs, field in [(dict(method="int8", block_size=32), "method='nf4'"),
                        (dict(block_size=64), "block_size=32"),
                        (dict(block_size=32, double_quant=False),
                         "double_quant=True"),
                        (dict(block_size=32, compute_dtype=jnp.float32),
                         "compute_dtype=dtype\\(bfloat16\\)"),
                        (dict(block_size=32, layout={"d": "bbo"}),
                         "stacked=1")]:
    with pytest.raises(ValueError, match=rf"'d/kernel' is already quantized"
                       rf" with {field}"):
      quant.quantize(q, **kwargs)
  with pytest.raises(ValueError, match=r"'d/kernel' is already quantized"):
    quant.quantize_leaf("d/kernel", q["d"]["kernel"], "fp4")
  with pytest.raises(ValueError, match=r"already quantized \(nf4"):
    quant.quantize_array(q["d"]["kernel"], "nf4")
  # Deliberate re-quantization, as the message says: exactly the scheme
  # applied to the dequantized values.
  again = quant.quantize(quant.dequantize(q, jnp.float32), "int8")
  _check_against_reference(q["d"]["kernel"].dequantize(jnp.float32), "int8",
                           64, True, stacked=1)
  np.testing.assert_array_equal(
      again["d"]["kernel"].codes,
      quant.quantize_array(q["d"]["kernel"].dequantize(jnp.float32), "int8",
                           stacked=1).codes)


@pytest.mark.parametrize("method", ["nf4", "fp8"])
def test_dequantize_dtypes(method):
  q = quant.quantize({"k": {"kernel": _gaussian((4, 128))}}, method)
  q = q["k"]["kernel"]
  assert quant.is_quantized(q)
  f32 = np.asarray(q.dequantize(jnp.float32))
  assert q.dequantize().dtype == jnp.bfloat16  # the compute dtype
  for dtype in (jnp.bfloat16, jnp.float16, "float32", np.float32):
    out = q.dequantize(dtype)
    assert out.dtype == jnp.dtype(dtype)
    # computed in float32, rounded once
    np.testing.assert_array_equal(np.asarray(out),
                                  f32.astype(jnp.dtype(dtype)))
  tree = quant.dequantize({"k": q}, jnp.float16)
  assert tree["k"].dtype == jnp.float16
  for bad in (jnp.int32, jnp.bool_, "int8"):
    with pytest.raises(ValueError, match=r"dtype must be a floating dtype"):
      q.dequantize(bad)
    with pytest.raises(ValueError, match=r"dtype must be a floating dtype"):
      quant.dequantize({"k": q}, bad)


@settings(max_examples=10, deadline=None)
@given(method=st.sampled_from(["nf4", "fp4", "int8"]), dq=st.booleans(),
       cols=st.sampled_from([128, 100]),
       bad=st.lists(st.tuples(st.integers(0, 2 * 8 * 128 - 1),
                              st.sampled_from([np.nan, np.inf, -np.inf])),
                    min_size=1, max_size=6))
def test_nonfinite_values_never_spread(method, dq, cols, bad):
  """Under jit, anywhere and any number of them: each other value
  dequantizes bit for bit as if the bad ones were 0."""
  w = np.array(_gaussian((2, 8, cols), seed=len(bad)))
  flat = w.reshape(-1)
  spots = {i % flat.size: v for i, v in bad}
  zeroed = flat.copy()
  zeroed[list(spots)] = 0.0
  flat[list(spots)] = list(spots.values())
  fn = jax.jit(lambda x: quant.quantize_array(
      x, method, double_quant=dq, dtype=jnp.float32, stacked=1).dequantize())
  out = np.asarray(fn(jnp.asarray(w))).reshape(-1)
  ref = np.asarray(fn(jnp.asarray(zeroed.reshape(w.shape)))).reshape(-1)
  keep = np.ones(flat.size, bool)
  keep[list(spots)] = False
  np.testing.assert_array_equal(out[keep], ref[keep])
  assert np.isfinite(out).all()
  nan = [i for i, v in spots.items() if np.isnan(v)]
  np.testing.assert_array_equal(out[nan], 0.0)
