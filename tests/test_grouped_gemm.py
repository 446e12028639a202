"""The grouped GEMM behind factored expert products (`jlora._grouped_gemm`).

Its Hopper kernels run only on such a GPU (the last test). Everywhere, the
custom VJP, the zero-padding to the kernels' tiles and the masking of rows
past the groups run with stand-in kernels of the same contract, checked
against float64 NumPy; `jlora.wrap` is checked to route an expert kernel's
base product and both LoRA factors through them.
"""

import collections

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax import lax

import jlora
from jlora import _grouped_gemm as gg
from helpers import randomize_b, rel_err


def np_ragged(x, w, sizes):
  """float64: row i of group g times w[g]; rows past the groups give 0."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  out = np.zeros((x.shape[0], w.shape[2]))
  start = 0
  for g, n in enumerate(np.asarray(sizes)):
    out[start:start + n] = x[start:start + n] @ w[g]
    start += n
  return out


def stand_in(calls=None, dtype=None):
  """lax versions of the three kernels, checking the shapes they are given."""
  calls = collections.Counter() if calls is None else calls

  def aligned(*arrays):  # (M, K) rows or (G, K, N) kernels
    for a in arrays:
      assert all(d % 64 == 0 for d in a.shape[1:]), a.shape
      assert a.ndim == 3 or a.shape[0] % 8 == 0, a.shape  # rows tile by 8
      assert dtype is None or a.dtype == dtype

  def forward(x, w, sizes):
    aligned(x, w)
    calls["forward"] += 1
    return lax.ragged_dot(x, w, sizes)

  def input_grad(dy, w, sizes):
    aligned(dy, w)
    calls["input_grad"] += 1
    return lax.ragged_dot(dy, jnp.swapaxes(w, 1, 2), sizes)

  def weight_grad(x, dy, sizes):
    aligned(x, dy)
    calls["weight_grad"] += 1
    dims = lax.RaggedDotDimensionNumbers((((0,), (0,)), ((), ())), [0], [])
    return lax.ragged_dot_general(x, dy, sizes, dims)

  return gg.Kernels(forward, input_grad, weight_grad), calls


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 70), n=st.integers(1, 70),
       g=st.integers(1, 5), tail=st.integers(0, 6), seed=st.integers(0, 99))
def test_values_and_gradients_match_float64(m, k, n, g, tail, seed):
  rng = np.random.default_rng(seed)
  # Random group sizes summing to m - tail: the last `tail` rows are in no
  # group (lax.ragged_dot gives them 0, and no gradient).
  tail = min(tail, m)
  cuts = np.sort(rng.integers(0, m - tail + 1, g - 1))
  sizes = np.diff(np.concatenate([[0], cuts, [m - tail]])).astype(np.int32)
  x = rng.standard_normal((m, k)).astype(np.float32)
  w = rng.standard_normal((g, k, n)).astype(np.float32)
  dy = rng.standard_normal((m, n)).astype(np.float32)
  kernels, _ = stand_in(dtype=jnp.float32)

  y, vjp = jax.vjp(
    lambda x, w: gg.ragged_dot(x, w, jnp.asarray(sizes), kernels=kernels),
    x, w)
  dx, dw = vjp(jnp.asarray(dy))
  assert y.shape == (m, n) and dx.shape == x.shape and dw.shape == w.shape
  np.testing.assert_allclose(y, np_ragged(x, w, sizes), rtol=1e-4,
                             atol=1e-4)
  # d/dx <y, dy> = dy @ w[g].T per group; d/dw[g] = x[g].T @ dy[g].
  in_group = (np.arange(m) < sizes.sum())[:, None]
  dy_in = np.where(in_group, dy, 0.0)
  ref_dx = np_ragged(dy_in, np.swapaxes(w, 1, 2), sizes)
  ref_dw = np.zeros(w.shape)
  start = 0
  for j, size in enumerate(sizes):
    ref_dw[j] = x[start:start + size].T.astype(np.float64) @ dy[
      start:start + size]
    start += size
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dw, ref_dw, rtol=1e-4, atol=1e-4)


def test_only_what_is_differentiated_is_computed():
  x = jax.random.normal(jax.random.key(0), (12, 8))
  w = jax.random.normal(jax.random.key(1), (3, 8, 5))
  sizes = jnp.array([4, 5, 3], jnp.int32)
  kernels, calls = stand_in()

  def loss(x, w):
    return (gg.ragged_dot(x, w, sizes, kernels=kernels) ** 2).sum()

  expected = {0: {"forward": 1, "input_grad": 1},
              1: {"forward": 1, "weight_grad": 1},
              (0, 1): {"forward": 1, "input_grad": 1, "weight_grad": 1}}
  for argnums, want in expected.items():
    calls.clear()
    jax.grad(loss, argnums)(x, w)
    assert dict(calls) == want, argnums  # a frozen w: no (G, K, N) product


def test_off_hopper_it_is_lax_ragged_dot():
  x = jnp.ones((6, 4), jnp.bfloat16)
  w = jnp.ones((2, 4, 3), jnp.bfloat16)
  # This machine has no Hopper GPU (CPU CI); float32 never takes kernels.
  if not gg._hopper():
    assert gg.default_kernels(x, w) is None
  assert gg.default_kernels(x.astype(jnp.float32), w.astype(jnp.float32)) \
    is None
  assert gg.default_kernels(x, w, preferred_element_type=jnp.float32) is None
  jaxpr = jax.make_jaxpr(
    lambda x, w: gg.ragged_dot(x.astype(jnp.float32), w.astype(jnp.float32),
                               jnp.array([2, 4])))(x, w)
  assert [e.primitive.name for e in jaxpr.eqns][-1] == "ragged_dot_general"


E, D, F, R, TOKENS, TOPK = 4, 6, 5, 2, 10, 2


def moe(p, x):
  """A top-k expert MLP over tokens sorted by expert (two ragged_dots)."""
  ids = jnp.argsort(-(x @ p["router"]), axis=-1)[:, :TOPK].reshape(-1)
  order = jnp.argsort(ids)
  sizes = jnp.bincount(ids, length=E).astype(jnp.int32)
  rows = x[order // TOPK]
  h = jax.nn.silu(lax.ragged_dot(rows, p["up"], sizes))
  y = lax.ragged_dot(h, p["down"], sizes)
  return jnp.zeros((TOKENS * TOPK, D)).at[order].set(y)


def test_wrap_routes_expert_products_through_the_kernels(monkeypatch):
  key = jax.random.key(3)
  ks = jax.random.split(key, 4)
  params = {"router": jax.random.normal(ks[0], (D, E)),
            "up": jax.random.normal(ks[1], (E, D, F)),
            "down": jax.random.normal(ks[2], (E, F, D))}
  x = jax.random.normal(ks[3], (TOKENS, D))
  lp = randomize_b(jlora.apply(params, rank=R, key=key, targets="up|down",
                               layout={"up": "bio", "down": "bio"}), ks[0])
  trainable, frozen = jlora.partition(lp)

  def loss(t, x):
    return (jlora.wrap(moe)(jlora.combine(t, frozen), x) ** 2).sum()

  ref_y = jlora.wrap(moe)(lp, x)
  ref_g = jax.grad(loss, (0, 1))(trainable, x)
  kernels, calls = stand_in()
  monkeypatch.setattr(gg, "default_kernels", lambda *a, **k: kernels)
  y = jlora.wrap(moe)(lp, x)
  # Two ragged_dots, each: the base product and both factors.
  assert calls == {"forward": 6}
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  merged = jlora.merge(lp)
  assert rel_err(y, moe(merged, x)) < 1e-5
  calls.clear()
  g = jax.grad(loss, (0, 1))(trainable, x)
  # Weight gradients for the four factors only: the frozen experts get none.
  assert calls["weight_grad"] == 4
  for got, want in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_hopper_path_traces_here_and_lowers_lax_off_gpu(monkeypatch):
  """As on a Hopper machine: the Mosaic kernels are traced (their calls fit
  this jax), and a computation lowered for the CPU runs the lax branch.
  Only the input is differentiated: the weight-gradient kernel reads the
  GPU's core count while it is traced. Placed on the CPU, so that on a GPU
  machine too the lax branch is what runs."""
  with jax.default_device(jax.devices("cpu")[0]):
    _hopper_path_on_cpu(monkeypatch)


def _hopper_path_on_cpu(monkeypatch):
  ks = jax.random.split(jax.random.key(4), 4)
  params = {"router": jax.random.normal(ks[0], (D, E)),
            "up": jax.random.normal(ks[1], (E, D, F), jnp.bfloat16),
            "down": jax.random.normal(ks[2], (E, F, D), jnp.bfloat16)}
  x = jax.random.normal(ks[3], (TOKENS, D), jnp.bfloat16)
  lp = randomize_b(jlora.apply(params, rank=R, key=ks[0], targets="up|down",
                               layout={"up": "bio", "down": "bio"}), ks[1])
  trainable, frozen = jlora.partition(lp)

  def loss(t, x):
    y = jlora.wrap(moe)(jlora.combine(t, frozen), x)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  want = jax.jit(jax.value_and_grad(loss, 1))(trainable, x)
  monkeypatch.setattr(gg, "_hopper", lambda: True)
  assert gg.default_kernels(x, params["up"]) is not None
  step = jax.jit(jax.value_and_grad(loss, 1))
  jaxpr = str(step.trace(trainable, x).jaxpr)
  assert "platform_index" in jaxpr and "ragged_dot" in jaxpr
  got = step(trainable, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(b, np.float32), rtol=2e-2,
                               atol=2e-2)


@pytest.mark.skipif(not gg._hopper(), reason="needs a Hopper GPU")
def test_hopper_kernels_match_lax_ragged_dot():
  m, k, n, g = 1001, 192, 320, 8  # no dimension a multiple of the tiles
  ks = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(ks[0], (m, k), jnp.bfloat16)
  w = jax.random.normal(ks[1], (g, k, n), jnp.bfloat16)
  sizes = jnp.array([0, 300, 1, 99, 200, 0, 250, 100], jnp.int32)  # 950
  assert gg.default_kernels(x, w) is not None

  def f(x, w, fn):
    return jnp.sum(fn(x, w, sizes).astype(jnp.float32) ** 2)

  got = jax.jit(jax.value_and_grad(
    lambda x, w: f(x, w, gg.ragged_dot), (0, 1)))(x, w)
  want = jax.jit(jax.value_and_grad(
    lambda x, w: f(x.astype(jnp.float32), w.astype(jnp.float32),
                   lax.ragged_dot), (0, 1)))(x, w)
  y = gg.ragged_dot(x, w, sizes)
  np.testing.assert_allclose(
    y.astype(np.float32), np_ragged(x.astype(np.float32),
                                    w.astype(np.float32), sizes),
    rtol=2e-2, atol=2e-1)
  assert not np.any(np.asarray(y[950:], np.float32))
  assert rel_err(got[0], want[0]) < 1e-2
  for a, b in zip(got[1], want[1]):
    assert rel_err(a.astype(jnp.float32), b) < 2e-2


def test_model_experts_run_grouped_and_wrap_still_reads_ragged_dot(
    monkeypatch):
  """jlora.models' experts call the grouped GEMM; jlora's own traces (wrap,
  infer_layout) still read `lax.ragged_dot`, which wrap then runs factored
  through the same kernels."""
  transformers = pytest.importorskip("transformers")
  from jlora.models import ModelConfig, from_config

  hf = transformers.Qwen3MoeConfig(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, head_dim=8,
    moe_intermediate_size=12, num_experts=E, num_experts_per_tok=TOPK,
    max_position_embeddings=32, bos_token_id=None, eos_token_id=None,
    pad_token_id=None)
  model, params = from_config(ModelConfig.from_hf(hf), jax.random.key(0),
                              scan_layers=False)
  params = {"params": params}
  ids = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
  lp = randomize_b(jlora.apply(params, rank=R, key=jax.random.key(2),
                               targets="experts"), jax.random.key(3))
  layout = jlora.infer_layout(model.apply, params, ids)
  want_plain = model.apply(params, ids)
  want_wrapped = jlora.wrap(model.apply)(lp, ids)

  kernels, calls = stand_in()
  monkeypatch.setattr(gg, "default_kernels", lambda *a, **k: kernels)
  got_plain = model.apply(params, ids)
  assert calls == {"forward": 4}  # 2 layers x (gate_up, down)
  calls.clear()
  got_wrapped = jlora.wrap(model.apply)(lp, ids)
  assert calls == {"forward": 12}  # each: the base and both factors
  assert jlora.infer_layout(model.apply, params, ids) == layout
  np.testing.assert_allclose(got_plain, want_plain, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_wrapped, want_wrapped, rtol=1e-5, atol=1e-5)
  assert rel_err(got_wrapped, model.apply(jlora.merge(lp), ids)) < 1e-4


def test_unadapted_experts_under_wrap_run_grouped(monkeypatch):
  """LoRA on other kernels only: wrap still runs the plain expert products
  as grouped GEMMs (not XLA's dense expansion)."""
  ks = jax.random.split(jax.random.key(5), 4)
  params = {"router": jax.random.normal(ks[0], (D, E)),
            "up": jax.random.normal(ks[1], (E, D, F)),
            "down": jax.random.normal(ks[2], (E, F, D))}
  x = jax.random.normal(ks[3], (TOKENS, D))
  lp = randomize_b(jlora.apply(params, rank=R, key=ks[0], targets="router"),
                   ks[1])
  want = jlora.wrap(moe)(lp, x)
  kernels, calls = stand_in()
  monkeypatch.setattr(gg, "default_kernels", lambda *a, **k: kernels)
  got = jlora.wrap(moe)(lp, x)
  assert calls == {"forward": 2}
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, moe(jlora.merge(lp), x), rtol=1e-4,
                             atol=1e-4)
