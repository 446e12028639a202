"""AdaLoRA: regulariser, budget schedule and rank allocation.

References: float64 NumPy, and PEFT's own ``RankAllocator`` run step by step
on the same parameters and gradients.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import _paths, variants
from jlora.variants import adalora

JIT = [False, True]


def _tree(shapes=((12, 10), (3, 10, 8)), rank=4, seed=0):
  rng = np.random.default_rng(seed)
  params = {f"l{i}": {"kernel": jnp.asarray(rng.standard_normal(s),
                                            jnp.float32)}
            for i, s in enumerate(shapes)}
  lp = jlora.apply(params, rank, alpha=8.0, key=jax.random.key(seed))
  return params, adalora.prepare(lp, jax.random.key(seed + 1))


@jax.jit
def _randomize(tree, key):
  """Every a, b, e of `tree` replaced by fresh normals (w kept)."""
  def fill(path, x):
    nonlocal key
    if not isinstance(x, jlora.LoRA):
      return x
    key, ka, kb, ke = jax.random.split(key, 4)
    return dataclasses.replace(
        x, a=jax.random.normal(ka, x.a.shape), b=jax.random.normal(kb, x.b.shape),
        e=jax.random.normal(ke, x.e.shape))
  return _paths.map_with_path(fill, tree)


def test_prepare_starts_at_the_base():
  params, lp = _tree()
  node = lp["l1"]["kernel"]
  assert node.e.shape == (3, 4) and float(jnp.abs(node.e).max()) == 0
  assert abs(float(jnp.std(node.a)) - 0.02) < 0.005
  fused = jlora.merge(lp)
  for k in params:
    np.testing.assert_array_equal(fused[k]["kernel"], params[k]["kernel"])


@pytest.mark.parametrize("jit", JIT)
def test_regularizer_and_its_gradient(jit):
  _, lp = _tree()
  lp = _randomize(lp, jax.random.key(3))
  reg = jax.jit(adalora.regularizer) if jit else adalora.regularizer
  want, grads = 0.0, []
  for k in ("l0", "l1"):
    node = lp[k]["kernel"]
    a, b = np.asarray(node.a, np.float64), np.asarray(node.b, np.float64)
    ga = np.swapaxes(a, -1, -2) @ a - np.eye(4)
    gb = b @ np.swapaxes(b, -1, -2) - np.eye(4)
    want += np.sum(ga ** 2) + np.sum(gb ** 2)
    # d/da ||a^T a - I||^2 = 4 a (a^T a - I); d/db ||b b^T - I||^2 = 4 (b b^T - I) b
    grads.append((4 * a @ ga, 4 * gb @ b))
  np.testing.assert_allclose(reg(lp), want, rtol=1e-5)
  g = (jax.jit(jax.grad(adalora.regularizer)) if jit else
       jax.grad(adalora.regularizer))(lp)
  for k, (ga, gb) in zip(("l0", "l1"), grads):
    np.testing.assert_allclose(g[k]["kernel"].a, ga, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g[k]["kernel"].b, gb, rtol=1e-4, atol=1e-4)


def test_regularizer_steps_pull_towards_orthogonality():
  _, lp = _tree()
  lp = _randomize(lp, jax.random.key(4))
  lp = jax.tree.map(lambda x: x * 0.3, lp)

  def gap(t):
    node = t["l0"]["kernel"]
    return float(jnp.linalg.norm(node.a.T @ node.a - jnp.eye(4)))

  step = jax.jit(lambda t: jax.tree.map(
      lambda x, g: x - 1e-2 * g, t, jax.grad(adalora.regularizer)(t)))
  gaps = [gap(lp)]
  for _ in range(300):
    lp = step(lp)
    gaps.append(gap(lp))
  assert all(b <= a + 1e-6 for a, b in zip(gaps, gaps[1:]))
  assert gaps[-1] < 1e-2 * gaps[0]


def _budget_reference(step, init, target, total, tinit, tfinal, delta_t):
  """PEFT's RankAllocator.budget_schedule, transcribed."""
  if step <= tinit:
    return init, False
  if step > total - tfinal:
    return target, True
  coeff = 1 - (step - tinit) / (total - tfinal - tinit)
  return int((init - target) * coeff ** 3 + target), step % delta_t == 0


@pytest.mark.parametrize("jit", JIT)
def test_budget_schedule(jit):
  _, lp = _tree()
  state = adalora.init(lp, target_r=2, total_step=300, tinit=20, tfinal=50,
                       delta_t=3)
  assert state.init_budget == 4 + 3 * 4 and state.target_budget == 2 * 4
  fn = (jax.jit(adalora.budget) if jit else adalora.budget)
  steps = range(0, 320) if jit else range(0, 320, 11)
  for t in steps:
    got = fn(state, t)
    want = _budget_reference(t, 16, 8, 300, 20, 50, 3)
    assert (int(got.budget), bool(got.mask_now)) == want, t


def _run_schedule(lp, state, steps, jit, key=jax.random.key(9)):
  update = jax.jit(adalora.update) if jit else adalora.update
  counts = []
  for t in range(steps):
    key, k1, k2 = jax.random.split(key, 3)
    lp = _randomize(lp, k1)  # parameters after an optimizer step
    grads = _randomize(lp, k2)
    lp, state = update(lp, grads, state, jnp.int32(t))
    counts.append((int(adalora.live_count(state)),
                   sum(int(jnp.sum(lp[k]["kernel"].e != 0)) for k in lp)))
  return lp, state, counts


@pytest.mark.parametrize("jit", JIT)
def test_live_singular_values_follow_the_budget(jit):
  _, lp = _tree()
  total, tinit, tfinal = 14, 2, 4
  state = adalora.init(lp, target_r=2, total_step=total, tinit=tinit,
                       tfinal=tfinal)
  lp, state, counts = _run_schedule(lp, state, total + 2, jit)
  for t, (live, nonzero) in enumerate(counts):
    budget, mask_now = _budget_reference(t, 16, 8, total, tinit, tfinal, 1)
    if t > tinit:  # every step reallocates with delta_t = 1
      assert live == budget and nonzero == budget, (t, live, nonzero)
    else:
      assert live == 16
  assert counts[-1] == (8, 8)
  pattern = adalora.rank_pattern(lp, state)
  assert sum(int(jnp.sum(v)) for v in pattern.values()) == 8
  assert pattern["l1/kernel"].shape == (3,)


def test_update_matches_peft_rank_allocator():
  torch = pytest.importorskip("torch")
  from peft import AdaLoraConfig
  from peft.tuners.adalora.layer import RankAllocator

  rank, total, tinit, tfinal, delta_t = 4, 16, 2, 4, 2
  _, lp = _tree(shapes=((12, 10), (9, 7)), rank=rank)

  class Layer(torch.nn.Module):
    def __init__(self, fan_in, fan_out):
      super().__init__()
      self.lora_A = torch.nn.ParameterDict(
          {"default": torch.nn.Parameter(torch.zeros(rank, fan_in))})
      self.lora_B = torch.nn.ParameterDict(
          {"default": torch.nn.Parameter(torch.zeros(fan_out, rank))})
      self.lora_E = torch.nn.ParameterDict(
          {"default": torch.nn.Parameter(torch.zeros(rank, 1))})

  model = torch.nn.ModuleDict({"l0": Layer(12, 10), "l1": Layer(9, 7)})
  config = AdaLoraConfig(init_r=rank, target_r=2, total_step=total,
                         tinit=tinit, tfinal=tfinal, deltaT=delta_t,
                         beta1=0.85, beta2=0.85)
  allocator = RankAllocator(model, config, "default")
  state = adalora.init(lp, target_r=2, total_step=total, tinit=tinit,
                       tfinal=tfinal, delta_t=delta_t)
  update = jax.jit(adalora.update)

  def to_torch(layer, node, grad):
    with torch.no_grad():
      for name, value, g, tr in (("lora_A", node.a, grad.a, True),
                                 ("lora_B", node.b, grad.b, True),
                                 ("lora_E", node.e, grad.e, False)):
        p = getattr(layer, name)["default"]
        v, g = np.asarray(value), np.asarray(g)
        v, g = (v.T, g.T) if tr else (v[:, None], g[:, None])
        p.copy_(torch.from_numpy(v.copy()))
        p.grad = torch.from_numpy(g.copy())

  key, pattern = jax.random.key(11), None
  for t in range(total + 3):
    key, k1, k2 = jax.random.split(key, 3)
    lp = _randomize(lp, k1)
    grads = _randomize(lp, k2)
    for name in ("l0", "l1"):
      to_torch(model[name], lp[name]["kernel"], grads[name]["kernel"])
    # PEFT's AdaLoraModel.update_and_allocate.
    if t < total - tfinal:
      _, rp = allocator.update_and_allocate(model, t)
      pattern = rp or pattern
    elif t == total - tfinal:
      _, pattern = allocator.update_and_allocate(model, t, force_mask=True)
      allocator.reset_ipt()
    else:
      allocator.mask_using_rank_pattern(model, pattern)
    lp, state = update(lp, grads, state, jnp.int32(t))
    for name in ("l0", "l1"):
      want = model[name].lora_E["default"].detach().numpy()[:, 0]
      np.testing.assert_allclose(lp[name]["kernel"].e, want, rtol=1e-6,
                                 err_msg=f"step {t} {name}")
    if 0 < t < total - tfinal:
      n = "l0.lora_B.default"
      np.testing.assert_allclose(state.ipt[0]["b"],
                                 allocator.exp_avg_ipt[n].numpy().T,
                                 rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(state.unc[0]["b"],
                                 allocator.exp_avg_unc[n].numpy().T,
                                 rtol=1e-5, atol=1e-7)
  # The final allocation keeps target_r = 2 of 4 triplets per matrix.
  assert sum(int(jnp.sum(lp[n]["kernel"].e == 0)) for n in ("l0", "l1")) == 4


def test_errors_name_the_fix():
  params = {"l": {"kernel": jnp.ones((6, 6))}}
  lp = jlora.apply(params, 2, key=jax.random.key(0))
  with pytest.raises(ValueError, match="prepare"):
    adalora.init(lp, target_r=1, total_step=10)
  lp = adalora.prepare(lp, jax.random.key(1))
  with pytest.raises(ValueError, match="budgeting phase"):
    adalora.init(lp, target_r=1, total_step=10, tinit=5, tfinal=5)
  with pytest.raises(ValueError, match="target_r"):
    adalora.init(lp, target_r=3, total_step=10)
  state = adalora.init(lp, target_r=1, total_step=10)
  trainable, _ = jlora.partition(lp)
  assert trainable["l"]["kernel"].e is not None  # e trains with a and b
  no_e = jax.tree.map(lambda x: x, trainable)
  no_e["l"]["kernel"] = dataclasses.replace(no_e["l"]["kernel"], e=None)
  with pytest.raises(ValueError, match="include e"):
    adalora.update(lp, no_e, state, 3)
  assert variants.AdaLoRAState is adalora.AdaLoRAState
