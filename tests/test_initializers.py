"""PiSSA, OLoRA and Gaussian inits against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jlora
from jlora import variants

JIT = [False, True]


def _maybe_jit(fn, jit):
  return jax.jit(fn) if jit else fn


def _params(shape, seed=0, decay=False):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(shape)
  if decay:  # a spectrum that falls off, as trained weights have
    w = w * (0.7 ** np.arange(shape[-1]))
  return {"layer": {"kernel": jnp.asarray(w, jnp.float32),
                    "bias": jnp.zeros(shape[-1], jnp.float32)}}


def _lora(params, rank, alpha=16.0, **kw):
  return jlora.apply(params, rank, alpha=alpha, key=jax.random.key(1), **kw)


def _node(tree):
  return tree["layer"]["kernel"]


def _principal(w, r):
  """Rank-r truncated SVD of each (in, out) matrix, float64."""
  u, s, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
  return (u[..., :, :r] * s[..., None, :r]) @ vt[..., :r, :], s[..., :r]


@pytest.mark.parametrize("jit", JIT)
@pytest.mark.parametrize("shape", [(24, 16), (3, 16, 20)])
def test_pissa_matches_numpy_svd(jit, shape):
  params = _params(shape)
  lp = _lora(params, 4)
  node = _node(_maybe_jit(variants.pissa, jit)(lp))
  w = np.asarray(params["layer"]["kernel"], np.float64)
  principal, s = _principal(w, 4)
  a, b = np.asarray(node.a, np.float64), np.asarray(node.b, np.float64)
  # scale * a @ b is the principal part; a and b are scaled singular vectors.
  np.testing.assert_allclose(node.scale * a @ b, principal, atol=2e-5)
  np.testing.assert_allclose(np.swapaxes(a, -1, -2) @ a,
                             np.vectorize(np.diag, signature="(r)->(r,r)")(
                                 s / node.scale), atol=2e-5)
  np.testing.assert_allclose(np.asarray(node.w), w - principal, atol=2e-5)
  # The base outside the adapter is untouched.
  np.testing.assert_array_equal(_maybe_jit(variants.pissa, jit)(lp)["layer"][
      "bias"], params["layer"]["bias"])


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_2"])
@pytest.mark.parametrize("shape", [(24, 16), (3, 16, 20)])
def test_merge_of_untrained_adapter_is_the_base(init, shape):
  # Eager runs of each init are in the tests below; this one is jitted.
  params = _params(shape)
  lp = _lora(params, 6)
  fn = lambda t: jlora.merge(variants.initialize(t, init, jax.random.key(2)))
  fused = jax.jit(fn)(lp)
  np.testing.assert_allclose(fused["layer"]["kernel"],
                             params["layer"]["kernel"], atol=1e-5)


@settings(max_examples=5, deadline=None)
@given(stacked=st.sampled_from([(), (2,), (2, 3)]),
       fan_in=st.integers(2, 12), fan_out=st.integers(2, 12),
       data=st.data())
def test_pissa_and_olora_keep_the_model_any_shape(stacked, fan_in, fan_out,
                                                  data):
  rank = data.draw(st.integers(1, min(fan_in, fan_out)))
  rslora = data.draw(st.booleans())
  params = _params((*stacked, fan_in, fan_out), seed=fan_in * 13 + fan_out)
  lp = _lora(params, rank, alpha=float(data.draw(st.integers(1, 32))),
             rslora=rslora)
  fused = jax.jit(lambda t: (jlora.merge(variants.pissa(t)),
                             jlora.merge(variants.olora(t))))(lp)
  for tree in fused:
    np.testing.assert_allclose(tree["layer"]["kernel"],
                               params["layer"]["kernel"], atol=1e-5)


def test_pissa_on_a_dense_general_layout():
  # (in, heads, head_dim): PiSSA works on the (in, heads*head_dim) matrix.
  params = _params((16, 2, 6))
  lp = _lora(params, 3, layout={"kernel": "ioo"})
  node = _node(variants.pissa(lp))
  w = np.asarray(params["layer"]["kernel"], np.float64).reshape(16, 12)
  principal, _ = _principal(w, 3)
  np.testing.assert_allclose(node.scale * np.asarray(node.a @ node.b),
                             principal, atol=2e-5)
  np.testing.assert_allclose(jlora.merge(variants.pissa(lp))["layer"]["kernel"],
                             params["layer"]["kernel"], atol=1e-5)


def test_randomized_svd_approaches_the_exact_one():
  params = _params((64, 48), decay=True)
  lp = _lora(params, 4)
  w = np.asarray(params["layer"]["kernel"], np.float64)
  principal, _ = _principal(w, 4)
  fast = _node(variants.pissa(lp, n_iter=6, key=jax.random.key(0),
                              oversample=4))
  err = np.linalg.norm(fast.scale * np.asarray(fast.a @ fast.b) - principal)
  assert err < 1e-3 * np.linalg.norm(principal)
  u, s, vt = variants.randomized_svd(jax.random.key(0), jnp.asarray(w, jnp.float32),
                                     4, n_iter=6, oversample=4)
  np.testing.assert_allclose(s, np.linalg.svd(w, compute_uv=False)[:4],
                             rtol=1e-4)
  assert u.shape == (64, 4) and vt.shape == (4, 48)


@pytest.mark.parametrize("jit", JIT)
def test_olora_matches_peft_semantics(jit):
  params = _params((2, 20, 12))
  lp = _lora(params, 5, alpha=10.0)
  node = _node(_maybe_jit(variants.olora, jit)(lp))
  w = np.asarray(params["layer"]["kernel"], np.float64)
  for k in range(2):
    # PyTorch's weight is w.T = Q R; lora_B = Q[:, :r], lora_A = R[:r].
    q, r = np.linalg.qr(w[k].T)
    lora_b, lora_a = q[:, :5], r[:5]
    # The product is invariant to the sign convention of the QR.
    np.testing.assert_allclose(np.asarray(node.a[k] @ node.b[k]),
                               (lora_b @ lora_a).T, atol=2e-5)
    np.testing.assert_allclose(np.asarray(node.b[k] @ node.b[k].T),
                               np.eye(5), atol=2e-5)
    np.testing.assert_allclose(np.asarray(node.w[k]),
                               w[k] - node.scale * (lora_b @ lora_a).T,
                               atol=2e-5)


@pytest.mark.parametrize("jit", JIT)
def test_gaussian_init(jit):
  params = _params((256, 128))
  lp = _lora(params, 8)
  node = _node(_maybe_jit(lambda t: variants.gaussian(t, jax.random.key(3)),
                          jit)(lp))
  assert abs(float(jnp.std(node.a)) - 1 / 8) < 0.01
  assert float(jnp.abs(node.b).max()) == 0.0
  np.testing.assert_array_equal(node.w, params["layer"]["kernel"])


def test_pissa_resets_gains_and_keeps_dora_magnitude():
  import dataclasses
  params = _params((12, 10))
  lp = _lora(params, 3)
  w = params["layer"]["kernel"]
  node = dataclasses.replace(_node(lp), e=jnp.full((3,), 5.0),
                             m=jnp.linalg.norm(w, axis=0))
  out = variants.pissa({"layer": {"kernel": node}})["layer"]["kernel"]
  np.testing.assert_array_equal(out.e, jnp.ones(3))
  np.testing.assert_allclose(out.materialize(), w, atol=1e-5)


def test_errors_name_the_fix():
  lp = _lora(_params((8, 8)), 2)
  with pytest.raises(ValueError, match="PRNG key"):
    variants.pissa(lp, n_iter=2)
  with pytest.raises(ValueError, match="unknown init method 'svd'"):
    variants.initialize(lp, "svd")
  trainable, _ = jlora.partition(lp)
  with pytest.raises(ValueError, match="combine"):
    variants.pissa(trainable)
