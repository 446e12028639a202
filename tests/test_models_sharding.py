"""Training strategies on a mesh (jlora.models.sharding), 8 CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from jax.sharding import NamedSharding, PartitionSpec as P

import jlora
from jlora import models
from jlora.models import sharding

from helpers import TINY_HF

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")

CFG = transformers.LlamaConfig(**TINY_HF)
KEY = jax.random.key(0)


def _train(spec, steps=3):
  """Losses and final adapters of a few AdamW steps under `spec`."""
  mesh = None if spec is None else sharding.make_mesh(spec,
                                                      jax.devices()[:8])
  rule = None if mesh is None else sharding.param_rule(mesh)
  model, params = models.from_config(CFG, KEY, scan_layers=True,
                                     shardings=rule)
  lp = jlora.apply(params, rank=4, alpha=8.0, key=jax.random.key(1))
  trainable, frozen = jlora.partition(lp)
  tx = optax.adamw(1e-2)
  opt_state = tx.init(trainable)
  forward = jlora.wrap(model.apply)

  def loss_fn(t, batch):
    logits = forward({"params": jlora.combine(t, frozen)}, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch[:, 1:]).mean()

  @jax.jit
  def step(t, s, batch):
    loss, g = jax.value_and_grad(loss_fn)(t, batch)
    u, s = tx.update(g, s, t)
    return optax.apply_updates(t, u), s, loss

  rng = np.random.default_rng(0)
  losses = []
  for _ in range(steps):
    rows = rng.integers(0, CFG.vocab_size, (8, 17), dtype=np.int32)
    batch = jnp.asarray(rows) if mesh is None else sharding.global_batch(
        rows, mesh)
    trainable, opt_state, loss = step(trainable, opt_state, batch)
    losses.append(float(loss))
  return losses, trainable, params, mesh


@functools.lru_cache(maxsize=None)
def _reference():
  losses, trainable, _, _ = _train(None)
  return losses, jax.device_get(trainable)


@pytest.mark.parametrize("spec", ["data:8", "fsdp:8", "data:2,fsdp:2,model:2",
                                  "fsdp:4,model:2"])
def test_strategy_matches_one_device(spec):
  ref_losses, ref_trainable = _reference()
  losses, trainable, params, mesh = _train(spec)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, atol=2e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(trainable)),
                  jax.tree.leaves(ref_trainable)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # The strategy really shards: FSDP and tensor-parallel kernels are split.
  q = params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  spec_q = q.sharding.spec
  if "fsdp" in spec:
    assert "fsdp" in tuple(spec_q)
  if "model" in spec:
    assert tuple(spec_q)[-1] == "model"
    o = params["model"]["layers"]["self_attn"]["o_proj"]["kernel"]
    assert tuple(o.sharding.spec)[1] == "model"
  if spec == "data:8":
    assert all(s is None for s in tuple(spec_q))
  # FSDP: each device holds 1/8 of a kernel.
  if spec == "fsdp:8":
    shard = q.addressable_shards[0].data
    assert shard.size * 8 == q.size


def test_kernel_spec_rules():
  mesh = sharding.make_mesh("data:2,fsdp:2,model:2", jax.devices()[:8])
  # Column-parallel: output over model, the larger free axis over fsdp.
  assert sharding.kernel_spec("l/q_proj/kernel", (4, 64, 32), mesh) == P(
      None, "fsdp", "model")
  # Row-parallel: input over model.
  assert sharding.kernel_spec("l/down_proj/kernel", (4, 128, 64), mesh) == P(
      None, "model", "fsdp")
  assert sharding.kernel_spec("embed_tokens/embedding", (128, 64), mesh) == P(
      "model", "fsdp")
  assert sharding.kernel_spec("norm/scale", (64,), mesh) == P()
  # An axis that does not divide stays whole.
  assert sharding.kernel_spec("x/q_proj/kernel", (3, 5), mesh) == P(None, None)
  assert sharding.batch_spec(mesh) == P(("data", "fsdp"), None)


@pytest.mark.parametrize("spec, message", [
    ("data", "axis:size"), ("pipe:2", "unknown axis"), ("data:2,data:4", "twice"),
    ("data:3", "needs 3 devices"), ("", "a mesh spec is a string"),
    ("fsdp:0", "positive"),
])
def test_bad_specs(spec, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(spec, jax.devices()[:8])


def test_batch_must_divide():
  mesh = sharding.make_mesh("data:2,fsdp:4", jax.devices()[:8])
  with pytest.raises(ValueError, match="multiple of 8"):
    sharding.batch_size_per_process(12, mesh)
  assert sharding.batch_size_per_process(16, mesh) == 16
  batch = sharding.global_batch(np.arange(32).reshape(16, 2), mesh)
  assert batch.sharding == NamedSharding(mesh, P(("data", "fsdp"), None))
  np.testing.assert_array_equal(np.asarray(batch), np.arange(32).reshape(16, 2))
