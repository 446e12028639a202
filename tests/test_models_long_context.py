"""Long-context options of CausalLM give the plain path's numbers.

attention="chunked" (flash attention in XLA), mlp_chunk (the MLP a chunk of
tokens at a time) and offload_fraction (part of the layer input in host
memory) change only where values live: LoRA loss, gradients and logits must
match the default XLA attention / unchunked / on-device path to float32
rounding, and bad settings must raise errors that name the fix.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randomize_b, rel_err

import jlora
from jlora.models import CausalLM, ModelConfig, _chunked_attention
from jlora.models.losses import causal_lm_loss

TARGETS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=80,
                  num_layers=2, num_heads=4, num_kv_heads=2, qkv_bias=True,
                  initializer_range=0.3)
# Gemma 2's ingredients: soft-caps, sandwich norms, (1 + w) norms, a window
# (3) shorter than the sequence on alternate layers.
GEMMA2 = dataclasses.replace(
  CFG, sliding_windows=(3, None), attn_softcap=2.0, final_softcap=5.0,
  sandwich_norms=True, norm_offset=1.0, hidden_act="gelu_tanh",
  embed_scale=32 ** 0.5)
B, T = 2, 11


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
  """Blocks of 4 tokens, so an 11-token row spans several (and a tail)."""
  monkeypatch.setattr(_chunked_attention, "DEFAULT_BLOCK", 4)


def data(cfg=CFG, seed=1):
  ids = jax.random.randint(jax.random.key(seed), (B, T + 1), 0,
                           cfg.vocab_size)
  return ids[:, :-1], ids[:, 1:]


def lora_state(model, x, targets=TARGETS):
  params = model.init(jax.random.key(0), x)["params"]
  lp = jlora.apply(params, rank=4, alpha=8, key=jax.random.key(1),
                   targets=targets)
  return jlora.partition(randomize_b(lp, jax.random.key(2), std=0.2))


def loss_and_grads(model, trainable, frozen, x, y, **kw):
  forward = jlora.wrap(model.apply)

  def loss(t):
    p = jlora.combine(t, frozen)
    h = forward({"params": p}, x, return_hidden=True, **kw)
    return causal_lm_loss(model.config, p, h, y, chunk_size=8)

  return jax.jit(jax.value_and_grad(loss))(trainable)


def assert_same(got, want, tol):
  np.testing.assert_allclose(got[0], want[0], rtol=tol)
  errs = jax.tree.leaves(jax.tree.map(rel_err, got[1], want[1]))
  assert errs and max(errs) < tol, max(errs)


@pytest.mark.parametrize("cfg, scan", [(CFG, True), (GEMMA2, True),
                                       (GEMMA2, False)],
                         ids=["llama_scan", "gemma2_scan", "gemma2_unrolled"])
def test_chunked_attention_equals_xla(cfg, scan):
  x, y = data(cfg)
  xla = CausalLM(cfg, scan_layers=scan, attention="xla")
  chunked = dataclasses.replace(xla, attention="chunked", remat="full")
  t, f = lora_state(xla, x)
  params = jlora.merge(jlora.combine(t, f))
  # The chunked kernel runs (no silent fallback to the masked XLA path).
  assert "custom_vjp_call" in str(
    jax.make_jaxpr(chunked.apply)({"params": params}, x))
  np.testing.assert_allclose(
    jax.jit(chunked.apply)({"params": params}, x),
    jax.jit(xla.apply)({"params": params}, x), atol=3e-5, rtol=3e-5)
  assert_same(loss_and_grads(chunked, t, f, x, y),
              loss_and_grads(xla, t, f, x, y), 2e-5)


def test_chunked_attention_bf16_within_bf16_rounding():
  x, y = data()
  xla = CausalLM(CFG, jnp.bfloat16, jnp.bfloat16, scan_layers=True)
  chunked = dataclasses.replace(xla, attention="chunked")
  t, f = lora_state(xla, x)
  got = loss_and_grads(chunked, t, f, x, y)
  want = loss_and_grads(xla, t, f, x, y)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-2)
  errs = jax.tree.leaves(jax.tree.map(rel_err, got[1], want[1]))
  assert max(errs) < 5e-2, max(errs)


def test_chunked_attention_packed_and_padded_rows():
  """segment_ids and attention_mask: equal to the XLA mask on real tokens,
  zeros-in, finite gradients out for padding."""
  x, y = data(GEMMA2)
  seg = np.array([[1] * 4 + [2] * 5 + [0] * 2, [1] * 11], np.int32)
  pad = np.array([[1] * 11, [0] * 3 + [1] * 8], np.int32)
  xla = CausalLM(GEMMA2, scan_layers=True, attention="xla")
  chunked = dataclasses.replace(xla, attention="chunked")
  t, f = lora_state(xla, x)
  params = jlora.merge(jlora.combine(t, f))
  for kw, real in ((dict(segment_ids=jnp.asarray(seg)), seg != 0),
                   (dict(attention_mask=jnp.asarray(pad)), pad != 0)):
    got = jax.jit(chunked.apply)({"params": params}, x, **kw)
    want = jax.jit(xla.apply)({"params": params}, x, **kw)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real],
                               atol=3e-5, rtol=3e-5)
  # Packed training: the loss over real tokens only, same gradients.
  forward = {m.attention: jlora.wrap(m.apply) for m in (xla, chunked)}
  weights = jnp.asarray(seg != 0, jnp.float32)

  def loss(t, impl):
    p = jlora.combine(t, f)
    logits = forward[impl]({"params": p}, x, segment_ids=jnp.asarray(seg))
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, y[..., None], -1)[..., 0]
    return jnp.sum(nll * weights) / jnp.sum(weights)

  got = jax.jit(jax.value_and_grad(lambda t: loss(t, "chunked")))(t)
  want = jax.jit(jax.value_and_grad(lambda t: loss(t, "xla")))(t)
  assert_same(got, want, 2e-5)


@pytest.mark.parametrize("chunk, remat", [(4, "full"), (3, "none"),
                                          (5, "attention")])
def test_mlp_chunk_same_loss_and_grads(chunk, remat):
  x, y = data()
  plain = CausalLM(CFG, scan_layers=True)
  t, f = lora_state(plain, x)
  chunked = dataclasses.replace(plain, mlp_chunk=chunk, remat=remat)
  assert_same(loss_and_grads(chunked, t, f, x, y),
              loss_and_grads(plain, t, f, x, y), 1e-5)


def test_mlp_chunk_fused_gate_up_unrolled():
  """Phi-3's fused gate_up_proj, unrolled layers, chunked attention too."""
  cfg = dataclasses.replace(CFG, fused_gate_up=True, fused_qkv=True)
  x, y = data(cfg)
  plain = CausalLM(cfg)
  t, f = lora_state(plain, x, targets="qkv_proj|o_proj|gate_up_proj|down_proj")
  fast = dataclasses.replace(plain, mlp_chunk=4, remat="full",
                             attention="chunked")
  assert_same(loss_and_grads(fast, t, f, x, y),
              loss_and_grads(plain, t, f, x, y), 2e-5)


def stacked(jaxpr, shape, found):
  """Memory spaces of scan outputs of `shape` (stacked layer residuals)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      found += [str(v.aval.memory_space) for v in eqn.outvars
                if v.aval.shape == shape]
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      stacked(sub, shape, found)
  return found


def test_offload_fraction_same_loss_and_grads_and_splits_the_input():
  x, y = data()
  plain = CausalLM(CFG, scan_layers=True)
  t, f = lora_state(plain, x)
  part = dataclasses.replace(plain, remat="full", offload=("decoder_input",),
                             offload_fraction=0.25)
  assert_same(loss_and_grads(part, t, f, x, y),
              loss_and_grads(plain, t, f, x, y), 1e-5)
  forward = jlora.wrap(part.apply)

  def loss(t):
    p = jlora.combine(t, f)
    return causal_lm_loss(CFG, p, forward({"params": p}, x,
                                          return_hidden=True), y)

  jaxpr = jax.make_jaxpr(jax.grad(loss))(t).jaxpr
  # hidden 32: 8 features (a quarter) in host memory, 24 kept on the device;
  # no whole (L, B, T, 32) input is stored.
  layers = CFG.num_layers
  assert stacked(jaxpr, (layers, B, T, 8), []) == ["MemorySpace.Host"]
  assert stacked(jaxpr, (layers, B, T, 24), []) == ["MemorySpace.Device"]
  assert stacked(jaxpr, (layers, B, T, 32), []) == []


@pytest.mark.parametrize("kw, match", [
  (dict(mlp_chunk=0), r"mlp_chunk=0; use a positive number of tokens"),
  (dict(mlp_chunk=2.5), r"mlp_chunk=2.5; use a positive number of tokens"),
  (dict(mlp_chunk=4, remat="matmuls"),
   r"keeps \['gate_proj', 'up_proj', 'gate_up_proj'\].*use remat='full'"),
  (dict(mlp_chunk=4, remat="full", offload=("down_proj",)),
   r"keeps \['down_proj'\]"),
  (dict(mlp_chunk=4, remat="dots"), r"every matmul output"),
  (dict(offload_fraction=0.0, remat="full", offload=("decoder_input",)),
   r"offload_fraction=0.0; use a share in \(0, 1\]"),
  (dict(offload_fraction=0.5, remat="full"),
   r"does not name 'decoder_input'; add it"),
])
def test_bad_long_context_options_raise(kw, match):
  x, _ = data()
  with pytest.raises(ValueError, match=match):
    CausalLM(CFG, **kw).init(jax.random.key(0), x)


@pytest.mark.parametrize("method", ["nf4", "fp8"])
def test_long_context_options_compose_with_quantized_bases(method):
  """Every long-context option at once, on an NF4 and an FP8 frozen base."""
  x, y = data()
  plain = CausalLM(CFG, scan_layers=True)
  params = jlora.quantize(plain.init(jax.random.key(0), x)["params"], method)
  quantized = [leaf for leaf in jax.tree.leaves(
    params, is_leaf=jlora.quant.is_quantized) if jlora.quant.is_quantized(leaf)]
  assert len(quantized) == 7  # every projection, stacked over the layers
  lp = jlora.apply(params, rank=4, alpha=8, key=jax.random.key(1),
                   targets=TARGETS)
  t, f = jlora.partition(randomize_b(lp, jax.random.key(2), std=0.2))
  fast = dataclasses.replace(
    plain, attention="chunked", mlp_chunk=4, remat="full",
    offload=("decoder_input",), offload_fraction=0.5)
  got, want = loss_and_grads(fast, t, f, x, y), loss_and_grads(plain, t, f, x, y)
  assert_same(got, want, 2e-5)
  # The base really is quantized: its loss differs from the float base's.
  dense = jlora.partition(jlora.apply(
    plain.init(jax.random.key(0), x)["params"], rank=4, alpha=8,
    key=jax.random.key(1), targets=TARGETS))[1]
  assert abs(float(loss_and_grads(plain, t, dense, x, y)[0])
             - float(want[0])) > 1e-4
