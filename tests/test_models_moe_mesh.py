"""Mixture-of-Experts blocks on a batch-sharded mesh (8 CPU devices).

Under `jax.set_mesh`, each device routes, sorts and runs its own tokens.
References: the same model with its adapters merged (`jlora.merge`, no
`jlora.wrap`) and no mesh set, for the loss and its gradient; the compiled
step's HLO for the size of every sort (the step compiled without the mesh
set is the negative control: its sort spans the global batch).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.models import from_config
from jlora.models import sharding
from jlora.models._moe import batch_axes

from helpers import randomize_b
from test_experts import assert_factored
from test_models_moe import EXPERTS, K, hf_config

ROWS, T = 8, 12
IDS = np.random.RandomState(1).randint(0, 128, (ROWS, T + 1))
ALL = r"self_attn/(q|k|v|o)_proj/kernel|" + EXPERTS


def _model(spec, scan, family="qwen3_moe", dropout=0.0, targets=ALL,
           remat="none"):
  mesh = sharding.make_mesh(spec, jax.devices()[:8])
  model, params = from_config(hf_config(family), jax.random.key(0),
                              scan_layers=scan, remat=remat,
                              shardings=sharding.param_rule(mesh))
  lp = jlora.apply(params, rank=2, key=jax.random.key(1), dropout=dropout,
                   targets=targets)
  return mesh, model, randomize_b(lp, jax.random.key(2), std=0.3)


def _loss(apply, params, x, y):
  logits = apply({"params": params}, x)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.mean(jnp.take_along_axis(logp, y[..., None], -1))


def _sort_sizes(hlo: str) -> set[int]:
  """Element counts of the arrays the compiled step sorts."""
  shapes = re.findall(r"= \(?[su]32\[([\d,]+)\][^\n]*? sort\(", hlo)
  return {int(np.prod([int(d) for d in s.split(",")])) for s in shapes}


@pytest.mark.parametrize("spec, scan, family, remat", [
    ("data:8", True, "qwen3_moe", "mlp"),
    ("data:2,fsdp:4", False, "mixtral", "none")])
def test_each_device_routes_its_own_tokens(spec, scan, family, remat):
  mesh, model, lp = _model(spec, scan, family, remat=remat)
  trainable, frozen = jlora.partition(lp)
  x = sharding.global_batch(IDS[:, :-1], mesh)
  y = sharding.global_batch(IDS[:, 1:], mesh)
  step = jax.jit(jax.value_and_grad(
      lambda t, x, y: _loss(jlora.wrap(model.apply), jlora.combine(t, frozen),
                            x, y)))
  with jax.set_mesh(mesh):
    hlo = step.lower(trainable, x, y).compile().as_text()
    loss, grad = step(trainable, x, y)

  # Each device sorts its own tokens' (token, expert) pairs...
  pairs = ROWS * T * K
  assert _sort_sizes(hlo) == {pairs // 8}
  # ...where without the mesh set one sort spans the whole batch.
  assert pairs in _sort_sizes(step.lower(trainable, x, y).compile().as_text())

  def merged(t, x, y):
    return _loss(model.apply, jlora.merge(jlora.combine(t, frozen)), x, y)

  want_loss, want_grad = jax.jit(jax.value_and_grad(merged))(trainable, x, y)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  experts = grad["model"]["layers"]
  if not scan:
    experts = experts["0"]
  assert float(jnp.abs(experts["mlp"]["experts"]["down_proj"]["kernel"].b
                       ).max()) > 0
  for got, want in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_batch_axes_follow_the_mesh_set():
  assert batch_axes(ROWS * T) == ()  # no mesh set
  # spec: (axes for 96 tokens, for 12 tokens)
  for spec, (axes, axes_12) in {
      "data:8": (("data",), ()),
      "data:2,fsdp:4": (("data", "fsdp"), ()),
      "data:2,model:4": (("data",), ("data",)),
      "model:8": ((), ()),
  }.items():
    with jax.set_mesh(sharding.make_mesh(spec, jax.devices()[:8])):
      assert batch_axes(ROWS * T) == axes
      assert batch_axes(12) == axes_12
      assert batch_axes(1) == ()  # one token (decoding): routed whole


def test_adapters_stay_factored_inside_the_shard_map():
  # Rank 5: no factor (or its gradient) has the size of a kernel, of one
  # layer's experts or of one expert (see test_models_moe).
  mesh, model, lp = _model("data:8", scan=True)

  def fn(p, ids):
    return model.apply({"params": p}, ids)

  with jax.set_mesh(mesh):
    assert_factored(fn, jlora.apply(jlora.merge(lp), rank=5,
                                    targets=EXPERTS, key=jax.random.key(3)),
                    IDS[:, :4])


def test_dropout_masks_differ_between_devices():
  # Adapters on the experts only: everything else is the same on each row.
  mesh, model, lp = _model("data:8", scan=True, dropout=0.5,
                           targets=EXPERTS)
  same = np.repeat(IDS[:1, :-1], ROWS, axis=0)  # one row on every device
  x = sharding.global_batch(same, mesh)
  forward = jax.jit(jlora.wrap(model.apply))
  with jax.set_mesh(mesh):
    plain = np.asarray(forward({"params": lp}, x))
    dropped = np.asarray(forward({"params": lp}, x,
                                 lora_rng=jax.random.key(4)))
  assert all(np.array_equal(plain[0], row) for row in plain)
  assert len({row.tobytes() for row in dropped}) == ROWS


def test_mixed_adapters_inside_the_shard_map_are_refused():
  mesh, model, lp = _model("data:8", scan=True)
  s = jlora.AdapterSet(jlora.merge(lp), {}, None)
  for k in range(2):
    s = jlora.add_adapter(s, f"a{k}", randomize_b(
        jlora.apply(s.base, rank=2, targets=EXPERTS, key=jax.random.key(k)),
        jax.random.key(10 + k)))
  forward = jax.jit(jlora.wrap(model.apply))
  x = sharding.global_batch(IDS[:, :-1], mesh)
  with jax.set_mesh(mesh), pytest.raises(
      NotImplementedError, match=r"experts/gate_up_proj/kernel.*jlora.select"):
    forward({"params": jlora.stack_adapters(s)}, x,
            adapter_ids=np.zeros(ROWS, np.int32))


def test_finetune_steps_trace_under_their_mesh(monkeypatch):
  import optax

  from jlora.finetune import _steps
  from jlora.models import _moe

  seen = []
  monkeypatch.setattr(_moe, "batch_axes",
                      lambda rows: seen.append(batch_axes(rows)) or seen[-1])
  mesh, model, lp = _model("data:8", scan=True)
  trainable, frozen = jlora.partition(lp)
  tx = optax.sgd(0.1)
  positions = np.broadcast_to(np.arange(T), (ROWS, T))
  batch = sharding.global_batch(dict(
      input_ids=IDS[:, :-1], targets=IDS[:, 1:], positions=positions,
      segment_ids=np.ones((ROWS, T), np.int32),
      loss_mask=np.ones((ROWS, T), np.float32)), mesh)
  for on_mesh, axes in ((mesh, ("data",)), (None, ())):
    seen.clear()
    train_step, eval_step, _ = _steps.make_steps(model, tx, mesh=on_mesh)
    eval_step(trainable, frozen, batch)
    t = jax.tree.map(jnp.copy, trainable)  # the step donates it
    train_step(t, frozen, tx.init(t), batch, 1)
    assert seen and set(seen) == {axes}
