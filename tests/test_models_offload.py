"""Offloading the residual stream (`decoder_input`) for long and 70B steps.

With remat="full" a scanned decoder keeps only each layer's input for the
backward pass; offloading that name puts those inputs in pinned host memory,
so device memory no longer grows with layers x tokens. Loss and gradients
must not change, on a QLoRA (NF4) base too, and no device copy of the
stacked inputs may remain.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randomize_b, rel_err

import jlora
from jlora import quant
from jlora.models import CausalLM, ModelConfig
from jlora.models.losses import causal_lm_loss

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=80,
                  num_layers=3, num_heads=4, num_kv_heads=2)
B, T = 2, 9


def model(remat="none", offload=()):
  return CausalLM(CFG, jnp.float32, jnp.float32, True, remat, "xla", offload)


@pytest.fixture(scope="module")
def qlora():
  x = jax.random.randint(jax.random.key(1), (B, T + 1), 0, CFG.vocab_size)
  params = model().init(jax.random.key(0), x[:, :-1])["params"]
  qparams = quant.quantize(params, "nf4", compute_dtype=jnp.float32)
  lp = randomize_b(jlora.apply(qparams, rank=4, key=jax.random.key(2)),
                   jax.random.key(3), std=0.2)
  return jlora.partition(lp), x[:, :-1], x[:, 1:]


def loss_fn(m, frozen, x, y):
  forward = jlora.wrap(m.apply)

  def loss(t):
    p = jlora.combine(t, frozen)
    h = forward({"params": p}, x, return_hidden=True)
    return causal_lm_loss(CFG, p, h, y, chunk_size=8)

  return loss


@pytest.mark.parametrize("offload", [("decoder_input",),
                                     ("decoder_input", "gate_proj",
                                      "up_proj")])
def test_offloaded_layer_input_same_loss_and_grads(qlora, offload):
  (trainable, frozen), x, y = qlora
  want = jax.jit(jax.value_and_grad(loss_fn(model(), frozen, x, y)))(
      trainable)
  got = jax.jit(jax.value_and_grad(loss_fn(model("full", offload), frozen, x,
                                           y)))(trainable)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  errs = jax.tree.leaves(jax.tree.map(rel_err, got[1], want[1]))
  assert errs and max(errs) < 1e-5, max(errs)


def stacked_inputs(jaxpr, found):
  """Memory spaces of every scan output shaped like the stacked layer
  inputs (layers, B, T, hidden)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      for v in eqn.outvars:
        if v.aval.shape == (CFG.num_layers, B, T, CFG.hidden_size):
          found.append(str(v.aval.memory_space))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      stacked_inputs(sub, found)
  return found


@pytest.mark.parametrize("offload", [(), ("decoder_input",)])
def test_offloaded_layer_inputs_live_in_host_memory_only(qlora, offload):
  (trainable, frozen), x, y = qlora
  loss = loss_fn(model("full", offload), frozen, x, y)
  spaces = stacked_inputs(jax.make_jaxpr(jax.grad(loss))(trainable).jaxpr, [])
  if offload:
    assert spaces == ["MemorySpace.Host"]
  else:  # the check sees the device copy that offloading removes
    assert spaces == ["MemorySpace.Device"]
