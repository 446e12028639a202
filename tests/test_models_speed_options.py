"""Speed and memory options of jlora.models give the plain path's numbers.

Every option (rematerialisation policies, host offload, hidden states plus
chunked cross-entropy, causal attention without a mask) must leave the LoRA
training loss and gradients unchanged: to float32 rounding in float32, to bf16
rounding in bf16.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randomize_b, rel_err

import jlora
from jlora.models import LlamaForCausalLM, ModelConfig, init_cache
from jlora.models.llama import CHECKPOINT_NAMES, REMAT_POLICIES, remat_policy
from jlora.models.losses import chunked_cross_entropy

TARGETS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
CFG = ModelConfig(
  vocab_size=96,
  hidden_size=32,
  intermediate_size=80,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  qkv_bias=True,
)


def batch(cfg=CFG, b=2, t=9, seed=1):
  ids = jax.random.randint(jax.random.key(seed), (b, t + 1), 0, cfg.vocab_size)
  return ids[:, :-1], ids[:, 1:]


def lora_state(model, x, key=0):
  params = model.init(jax.random.key(key), x)["params"]
  lp = jlora.apply(
    params, rank=4, alpha=8, key=jax.random.key(key + 1), targets=TARGETS
  )
  return jlora.partition(randomize_b(lp, jax.random.key(key + 2), std=0.2))


def loss_and_grads(model, trainable, frozen, x, y, chunk=None):
  """LoRA loss and gradients; `chunk` selects hidden + chunked CE."""
  forward = jlora.wrap(model.apply)

  def loss(t):
    p = jlora.combine(t, frozen)
    if chunk:
      h = forward({"params": p}, x, return_hidden=True)
      return chunked_cross_entropy(
        h, p["lm_head"]["kernel"], y, chunk_size=chunk
      )
    logp = jax.nn.log_softmax(forward({"params": p}, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[..., None], -1))

  return jax.jit(jax.value_and_grad(loss))(trainable)


def assert_same(got, want, tol):
  (l1, g1), (l0, g0) = got, want
  np.testing.assert_allclose(l1, l0, rtol=tol)
  errs = jax.tree.leaves(jax.tree.map(rel_err, g1, g0))
  assert errs and max(errs) < tol, max(errs)


@pytest.fixture(scope="module")
def plain_f32():
  model = LlamaForCausalLM(CFG, scan_layers=True)
  x, y = batch()
  t, f = lora_state(model, x)
  return model, t, f, x, y, loss_and_grads(model, t, f, x, y)


@pytest.mark.parametrize(
  "remat, offload",
  [
    ("full", ()),
    ("dots", ()),
    ("attention", ()),
    ("attention+gate", ()),
    ("mlp", ()),
    ("matmuls", ()),
    (("q_proj", "attention", "up_proj"), ()),
    ("attention", ("gate_proj", "up_proj")),
    ("full", ("down_proj",)),
  ],
)
def test_remat_policies_same_loss_and_grads(plain_f32, remat, offload):
  model, t, f, x, y, want = plain_f32
  rematted = dataclasses.replace(model, remat=remat, offload=offload)
  assert_same(loss_and_grads(rematted, t, f, x, y), want, 1e-5)


def test_remat_unrolled_layers(plain_f32):
  model, t, f, x, y, _ = plain_f32
  # Unrolled layers name their parameters 0, 1, ...: re-initialise.
  unrolled = LlamaForCausalLM(CFG, scan_layers=False)
  t, f = lora_state(unrolled, x)
  want = loss_and_grads(unrolled, t, f, x, y)
  rematted = dataclasses.replace(unrolled, remat="attention+gate")
  assert_same(loss_and_grads(rematted, t, f, x, y), want, 1e-5)


@pytest.mark.parametrize("chunk", [5, 8, 1000])
def test_hidden_and_chunked_cross_entropy(plain_f32, chunk):
  model, t, f, x, y, want = plain_f32
  assert_same(loss_and_grads(model, t, f, x, y, chunk=chunk), want, 1e-5)


def test_everything_together_bf16():
  """bf16 model: remat + chunked CE within bf16 rounding of the plain path."""
  model = LlamaForCausalLM(
    CFG, jnp.bfloat16, jnp.bfloat16, scan_layers=True
  )
  x, y = batch(t=16)
  t, f = lora_state(model, x)
  want = loss_and_grads(model, t, f, x, y)
  fast = dataclasses.replace(model, remat="matmuls", attention="auto")
  got = loss_and_grads(fast, t, f, x, y, chunk=8)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-2)
  errs = jax.tree.leaves(jax.tree.map(rel_err, got[1], want[1]))
  assert max(errs) < 5e-2, max(errs)


@pytest.mark.parametrize("window", [None, 3])
def test_causal_without_mask_equals_explicit_mask(window):
  """No mask and no cache takes the is_causal path; it equals the masked one."""
  cfg = dataclasses.replace(CFG, sliding_windows=(window,) * CFG.num_layers)
  xla = LlamaForCausalLM(cfg, scan_layers=True, attention="xla")
  x, _ = batch(cfg, t=7)
  params = xla.init(jax.random.key(0), x)["params"]
  masked = jax.jit(xla.apply)(
    {"params": params}, x, attention_mask=jnp.ones_like(x)
  )
  for attention in ("xla", "auto"):
    model = dataclasses.replace(xla, attention=attention)
    fast = jax.jit(model.apply)({"params": params}, x)
    np.testing.assert_allclose(fast, masked, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["xla", "auto"])
def test_mixed_windows_without_mask_equal_explicit_mask(attention):
  """Scanned layers with different windows: XLA builds each layer's mask from
  its scanned window, the fused paths switch between one static-window kernel
  per window; both equal the explicit mask."""
  cfg = dataclasses.replace(CFG, sliding_windows=(None, 3))
  model = LlamaForCausalLM(cfg, scan_layers=True, attention=attention)
  x, _ = batch(cfg, t=7)
  params = model.init(jax.random.key(0), x)["params"]
  fast = model.apply({"params": params}, x)
  masked = model.apply({"params": params}, x, attention_mask=jnp.ones_like(x))
  np.testing.assert_allclose(fast, masked, atol=2e-6)
  if attention == "auto":
    jaxpr = str(jax.make_jaxpr(model.apply)({"params": params}, x))
    assert "cond[" in jaxpr or "switch" in jaxpr


def test_return_hidden():
  model = LlamaForCausalLM(CFG)
  x, _ = batch()
  # init with return_hidden=True still creates the head's parameters
  params = model.init(jax.random.key(0), x, return_hidden=True)["params"]
  assert params["lm_head"]["kernel"].shape == (32, 96)
  h = model.apply({"params": params}, x, return_hidden=True)
  assert h.shape == (*x.shape, 32)
  logits = model.apply({"params": params}, x)
  np.testing.assert_allclose(
    h @ params["lm_head"]["kernel"], logits, atol=1e-5, rtol=1e-5
  )
  np.testing.assert_allclose(
    model.apply({"params": params}, h, method="logits"), logits, atol=1e-6
  )
  cache = init_cache(model, 2, 12)
  h2, cache = model.apply(
    {"params": params}, x, cache=cache, return_hidden=True
  )
  np.testing.assert_allclose(h2, h, atol=1e-5)
  assert int(cache.index) == x.shape[1]


def test_policies_save_what_they_say():
  name = jax.extend.core.Primitive("name")
  attn_fwd = jax.extend.core.Primitive("dot_product_attention_fwd_wrapper")
  matmul = jax.extend.core.Primitive("dot_general")
  saved = lambda policy: {
    n for n in CHECKPOINT_NAMES if policy(name, name=n) is True
  }
  assert remat_policy("full") is None
  # Phi-3's fused projections are kept wherever their parts are.
  assert saved(remat_policy("attention")) == {
    "q_proj", "k_proj", "v_proj", "qkv_proj", "attention", "o_proj"
  }
  assert saved(remat_policy("attention+gate")) == saved(
    remat_policy("attention")
  ) | {"gate_proj", "gate_up_proj"}
  # The layer input is every policy's residual already (the remat's input).
  assert saved(remat_policy("matmuls")) == set(CHECKPOINT_NAMES) - {
    "down_proj", "decoder_input"
  }
  assert saved(remat_policy("mlp")) == {
    "o_proj", "gate_proj", "up_proj", "gate_up_proj"
  }
  assert remat_policy("mlp")(attn_fwd) is False  # attention is recomputed
  # cuDNN attention's own residuals (output and softmax statistics) go with
  # the "attention" name; matmuls are never saved by a names policy.
  assert remat_policy("attention")(attn_fwd) is True
  assert remat_policy(("gate_proj",))(attn_fwd) is False
  assert remat_policy("matmuls")(matmul) is False
  off = remat_policy("attention", ("up_proj",))
  assert isinstance(off(name, name="up_proj"), jax.ad_checkpoint.Offloadable)
  assert set(REMAT_POLICIES) >= {"none", "full", "dots", "matmuls"}


def test_bad_remat_options_raise():
  x, _ = batch()
  with pytest.raises(ValueError, match=r"unknown checkpoint names \['qproj'\]"):
    LlamaForCausalLM(CFG, remat=("qproj",)).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="needs a named remat policy"):
    LlamaForCausalLM(CFG, offload=("up_proj",)).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"\['gate_proj'\] are both saved"):
    LlamaForCausalLM(
      CFG, remat="matmuls", offload=("gate_proj",)
    ).init(jax.random.key(0), x)
