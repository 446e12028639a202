"""Paths that exist only on a GPU: cuDNN attention, host offload, FP8 GEMMs.

Skipped elsewhere. On a GPU run the suite as
``JAX_PLATFORMS=cuda,cpu python -m pytest`` (conftest pins float32 matrix
products to full precision, so the parity tests keep their CPU tolerances).
Each test compares the GPU path with the portable path it replaces.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.models import CausalLM, ModelConfig

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="needs a GPU (cuDNN, pinned host"
    " memory, FP8 GEMMs)")

CFG = ModelConfig(vocab_size=128, hidden_size=128, intermediate_size=256,
                  num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=256)


def _logits(attention, **kw):
  model = CausalLM(CFG, jnp.bfloat16, jnp.float32, True, "none", attention)
  ids = jax.random.randint(jax.random.key(1), (2, 64), 0, CFG.vocab_size)
  params = model.init(jax.random.key(0), ids[:, :1])["params"]
  return np.asarray(model.apply({"params": params}, ids, **kw), np.float32)


def test_cudnn_attention_matches_xla():
  np.testing.assert_allclose(_logits("cudnn"), _logits("xla"), atol=5e-2,
                             rtol=5e-2)


def test_cudnn_attention_with_packed_documents_matches_xla():
  segments = jnp.asarray(np.repeat([[1] * 20 + [2] * 30 + [0] * 14], 2, 0))
  np.testing.assert_allclose(
      _logits("cudnn", segment_ids=segments)[:, :50],
      _logits("xla", segment_ids=segments)[:, :50], atol=5e-2, rtol=5e-2)


def test_host_offload_keeps_loss_and_gradients():
  ids = jax.random.randint(jax.random.key(2), (2, 33), 0, CFG.vocab_size)

  def loss_and_grads(offload):
    model = CausalLM(CFG, jnp.float32, jnp.float32, True,
                     "attention" if offload else "none", "xla",
                     ("gate_proj", "up_proj") if offload else ())
    params = model.init(jax.random.key(0), ids[:, :1])["params"]
    lp = jlora.apply(params, rank=4, key=jax.random.key(3))
    trainable, frozen = jlora.partition(lp)
    forward = jlora.wrap(model.apply)

    def loss(t):
      logits = forward({"params": jlora.combine(t, frozen)}, ids[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, ids[:, 1:]).mean()
    return jax.jit(jax.value_and_grad(loss))(trainable)

  (l0, g0), (l1, g1) = loss_and_grads(False), loss_and_grads(True)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fp8_gemm_path_matches_its_emulation():
  if jax.devices()[0].compute_capability < "8.9":
    pytest.skip("FP8 GEMMs need compute capability 8.9 or newer")
  w = 0.02 * jax.random.normal(jax.random.key(0), (256, 512), jnp.float32)
  x = jax.random.normal(jax.random.key(1), (64, 256), jnp.bfloat16)
  lp = jlora.apply(jlora.quant.quantize_fp8({"w": w}, targets="w"), rank=4,
                   targets="w", key=jax.random.key(2))
  fn = lambda p, x: x @ p["w"]
  gpu = jax.jit(jlora.wrap(fn))(jlora.quant.set_fp8_product(lp, "auto"), x)
  emulated = jax.jit(jlora.wrap(fn))(jlora.quant.set_fp8_product(lp, "fp8"),
                                     x)
  # The GEMM accumulates in its own order: equal up to float32 rounding of
  # the e4m3 products, far below FP8's own error (3.8% RMS).
  err = jnp.linalg.norm(gpu.astype(jnp.float32) - emulated.astype(
      jnp.float32)) / jnp.linalg.norm(emulated.astype(jnp.float32))
  assert float(err) < 1e-2
  hlo = jax.jit(jlora.wrap(fn)).lower(lp, x).compile().as_text()
  assert "f8e4m3" in hlo
