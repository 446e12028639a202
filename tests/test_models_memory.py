"""`plan_memory` against XLA's own memory analysis of the compiled step.

The step is the one the planner models (jlora.wrap, return_hidden,
causal_lm_loss, AdamW, scan_layers), compiled on CPU in float32 (CPU's XLA
computes bf16 through float32 copies, so float32 is its honest case) at a
shape whose activations dominate, and compared by XLA's
arguments + outputs + temporaries - aliased bytes. The shape and lengths
differ from the ones the CPU buffer counts were read from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import jlora
from jlora.models import CausalLM, ModelConfig, plan_memory
from jlora.models.losses import causal_lm_loss
from jlora.models.memory import TARGETS, format_plans

CFG = ModelConfig(vocab_size=384, hidden_size=192, intermediate_size=320,
                  num_layers=3, num_heads=6, num_kv_heads=2,
                  max_position_embeddings=8192)
T = 3072
TOLERANCE = 0.25


def xla_bytes(setting, t=T):
  model = CausalLM(CFG, jnp.float32, jnp.float32, True, **setting)
  tx = optax.adamw(1e-4)
  forward = jlora.wrap(model.apply)

  def loss_fn(tr, frozen, x, y):
    p = jlora.combine(tr, frozen)
    h = forward({"params": p}, x, return_hidden=True)
    return causal_lm_loss(CFG, p, h, y, chunk_size=256)

  def step(tr, opt, frozen, x, y):
    loss, g = jax.value_and_grad(loss_fn)(tr, frozen, x, y)
    updates, opt = tx.update(g, opt, tr)
    return optax.apply_updates(tr, updates), opt, loss

  def make(key):
    params = model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]
    tr, frozen = jlora.partition(
      jlora.apply(params, rank=16, key=key, targets=TARGETS))
    return tr, tx.init(tr), frozen

  tr, opt, frozen = jax.eval_shape(make, jax.random.key(0))
  x = jax.ShapeDtypeStruct((1, t), jnp.int32)
  m = jax.jit(step, donate_argnums=(0, 1)).lower(
    tr, opt, frozen, x, x).compile().memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes
          + m.temp_size_in_bytes - m.alias_size_in_bytes)


SETTINGS = [
  dict(remat="full", attention="xla"),
  dict(remat="full", attention="chunked"),
  dict(remat="full", attention="chunked", mlp_chunk=512),
  dict(remat="matmuls", attention="chunked"),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(
  str(v) for v in s.values()))
def test_estimate_within_tolerance_of_xla(setting):
  (plan,) = plan_memory(CFG, T, dtype=jnp.float32, settings=[setting],
                        backend="cpu")
  want = xla_bytes(setting)
  assert abs(plan.device_bytes - want) <= TOLERANCE * want, (
    plan.device_bytes, want, plan.parts)


def test_offload_moves_the_residual_stream_to_the_host():
  keep = dict(remat="full", attention="chunked")
  host = dict(keep, offload=("decoder_input",))
  part = dict(host, offload_fraction=0.25)
  on, off, quarter = plan_memory(CFG, T, dtype=jnp.bfloat16,
                                 settings=[keep, host, part])
  # L x B x T x hidden bf16 values, by hand.
  stream = 3 * 1 * T * 192 * 2
  assert off.host_bytes == stream and on.host_bytes == 0
  assert on.device_bytes - off.device_bytes == stream
  assert quarter.host_bytes == stream // 4


def test_budget_says_which_settings_fit():
  sizes = [p.device_bytes for p in plan_memory(CFG, T)]
  budget = sorted(sizes)[2] / 0.9  # the three smallest fit, exactly
  plans = plan_memory(CFG, T, device_bytes=budget, host_bytes=2**30)
  assert [p.device_bytes for p in plans] == sizes
  assert [p.fits for p in plans] == [s <= 0.9 * budget for s in sizes]
  assert 3 <= sum(p.fits for p in plans) < len(plans)
  # A host too small for the offloaded stream: offloading settings fail.
  tight = plan_memory(CFG, T, device_bytes=2**40, host_bytes=2**10)
  assert [p.fits for p in tight] == [not p.setting["offload"] for p in tight]
  assert "decoder_input" in format_plans(plans)
  with pytest.raises(ValueError, match="remat='dots'.*use 'full'"):
    plan_memory(CFG, T, settings=[dict(remat="dots")])
